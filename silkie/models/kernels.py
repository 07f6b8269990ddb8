"""The recipe's speed switches for a loaded model (`model.fp32_norm_rope`, `model.liger_kernels`,
`model.compile_blocks`): each one leaves the model's log-probs equal to the plain path within the tolerances of
the tests (fp32: 1e-5; bf16 numerics: see docs/benchmarks.md) and only changes how they are computed.

- `fp32_norm_rope: false` (qwen_vl): RMSNorm and the rotary embedding in the model's dtype, without the fp32
  copies the original makes of every hidden state.
- `liger_kernels`: liger-kernel's fused Triton kernels (RMSNorm, SwiGLU, rotary) in the language model; the native
  Qwen-VL gets them here, the transformers families through liger-kernel's own patch functions.
- `compile_blocks`: regional compilation, `torch.compile` of each decoder block (identical blocks reuse one graph),
  instead of the whole model; its compile time is paid in the first steps. `CompileWatch` says how many graphs
  were compiled and whether dynamo gave up on a block at its recompile limit (it then runs eager, silently).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from silkie.config import ModelSection
from silkie.errors import InputError

from .family import unwrap_causal_lm
from .qwen_vl.modeling import QWenAttention, QWenMLP, RMSNorm

logger = logging.getLogger(__name__)

LIGER_PATCHES = {  # family -> liger-kernel's patch function for a loaded model of it
    "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
    "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
    "qwen3_vl": "apply_liger_kernel_to_qwen3_vl",
    "qwen3_vl_moe": "apply_liger_kernel_to_qwen3_vl_moe",
    "llava": "apply_liger_kernel_to_llava",
    "internvl": "apply_liger_kernel_to_internvl",  # its language model's patch (+ the tower's norms)
    "gemma3": "apply_liger_kernel_to_gemma3",  # GEGLU, not SwiGLU (+ the SigLIP tower's layer norms)
    "qwen3_5": "apply_liger_kernel_to_qwen3_5",  # norms and MLPs: liger has no rotary kernel for its hybrid layers
    "qwen3_5_moe": "apply_liger_kernel_to_qwen3_5_moe",
}
GEGLU_FAMILIES = ("gemma3",)  # liger's patch names its MLP kernel `geglu`
NO_LIGER_ROPE_FAMILIES = ("qwen3_5", "qwen3_5_moe")  # liger's patch raises NotImplementedError on rope=True


class LigerRMSNorm(RMSNorm):
    """RMSNorm through liger's kernel: "llama" casting is the original's fp32 norm, cast back, times weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama" if self.upcast else "none", False)


class LigerQWenMLP(QWenMLP):
    """c_proj(silu(w2 x) * w1 x) with the gate product fused by liger (w2 is Qwen's gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerSiLUMulFunction

        return self.c_proj(LigerSiLUMulFunction.apply(self.w2(x), self.w1(x)))


class LigerQWenAttention(QWenAttention):
    """Qwen-VL attention whose rotary embedding is liger's fused kernel (queries and keys in one launch)."""

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return liger_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0])


LIGER_CLASSES = {RMSNorm: LigerRMSNorm, QWenMLP: LigerQWenMLP, QWenAttention: LigerQWenAttention}


def check_liger_available() -> None:
    """InputError unless liger-kernel is installed and its Triton kernels can run here (a CUDA device; liger's
    kernels do not run under Triton's CPU interpreter)."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise InputError("model.liger_kernels: liger-kernel is not installed (pip install -e '.[gpu]')")
    if not torch.cuda.is_available():
        raise InputError("model.liger_kernels: its Triton kernels need a CUDA device and this machine has none")


def use_liger(base: nn.Module, family: str) -> int:
    """Swap the language model's norms, MLPs and rotary for liger's kernels; returns how many modules changed.
    MoE experts that carry peft's parameter adapters (`lora.target_parameters`) keep their own forward: liger's
    expert kernel would read the weights past the adapters."""
    if family != "qwen_vl":
        import liger_kernel.transformers as liger

        patch = getattr(liger, LIGER_PATCHES[family])
        swiglu = not any(type(module).__name__ == "ParamWrapper" for module in base.modules())
        if not swiglu:
            logger.info("liger-kernel: the experts carry LoRA (lora.target_parameters) and keep their own forward")
        fused = {"cross_entropy": False, "fused_linear_cross_entropy": False}  # our log-probs are computed outside
        mlp = {"geglu" if family in GEGLU_FAMILIES else "swiglu": swiglu}
        rope = family not in NO_LIGER_ROPE_FAMILIES
        patch(model=base, rope=rope, rms_norm=True, **mlp, **fused)
        return len(base.model.language_model.layers)
    changed = 0
    for name, module in base.named_modules():
        swap = LIGER_CLASSES.get(type(module))
        if swap is not None and not name.startswith("transformer.visual"):
            module.__class__ = swap  # same parameters and state-dict names, another forward
            changed += 1
    return changed


def keep_native_precision(base: nn.Module) -> int:
    """qwen_vl: RMSNorm and rotary in the hidden dtype (no fp32 up-cast copies); returns the norms changed."""
    norms = [module for module in base.modules() if isinstance(module, RMSNorm)]
    for norm in norms:
        norm.upcast = False
    base.transformer.rotary_fp32 = False
    return len(norms)


BLOCK_RECOMPILE_LIMIT = 64
_GAVE_UP = "Dynamo recompile limit exceeded"  # the graph-break counter's key when dynamo stops compiling a code


def compile_blocks(base: nn.Module, family: str) -> int:
    """Compile each decoder block in place (regional compilation); returns the number of blocks."""
    from .family import get_family

    # Every block shares one code object, compiled once per variant: grad on/off (policy, reference, evaluation),
    # train/eval mode, adapters on/off, a static then a dynamic shape, and each model a process builds. A short
    # run with evaluations reaches dynamo's default limit of 8, past which the blocks run eager without an error;
    # the variants are bounded (shapes go dynamic after one recompile), so a higher limit only lets them all fit.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7: old name
    setattr(config, limit, max(getattr(config, limit), BLOCK_RECOMPILE_LIMIT))
    layers = get_family(family).decoder_layers(base)
    for layer in layers:
        layer.compile()
    return len(layers)


@contextmanager
def eager_blocks(*models: nn.Module) -> Iterator[None]:
    """Inside, the compiled modules of `models` run their plain forward: the same work, visible op by op (what a
    FLOP counter should see, whatever the torch version does with a compiled graph under it)."""
    modules = [m for model in models for m in model.modules()]
    compiled = [(m, m._compiled_call_impl) for m in modules if getattr(m, "_compiled_call_impl", None)]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call


def _compile_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    gave_up = sum(n for reason, n in counters["unimplemented"].items() if reason.startswith(_GAVE_UP))
    return counters["stats"]["unique_graphs"], gave_up


@dataclass
class CompileWatch:
    """What torch.compile did in this process since the watch was made (give-ups are counted from torch 2.7 on)."""

    start: tuple[int, int] = field(default_factory=_compile_counts)

    def graphs(self) -> int:
        """Graphs compiled since the start (every recompile, and each piece of a graph split by a break)."""
        return _compile_counts()[0] - self.start[0]

    def gave_up(self) -> int:
        """Code objects dynamo stopped compiling at its recompile limit since the start (they run eager)."""
        return _compile_counts()[1] - self.start[1]


def apply_kernels(model: nn.Module, section: ModelSection) -> list[str]:
    """Apply the recipe's `model.*` speed switches to `model` (a policy under peft/DeepSpeed wrappers, or a
    plain model) in place; returns what was applied, for the log."""
    base, _ = unwrap_causal_lm(model)
    applied = []
    if not section.fp32_norm_rope:
        applied.append(f"native-precision norms and rotary ({keep_native_precision(base)} norms)")
    if section.liger_kernels:
        check_liger_available()
        applied.append(f"liger-kernel ({use_liger(base, section.family)} modules)")
    if section.compile_blocks:
        applied.append(f"torch.compile per decoder block ({compile_blocks(base, section.family)} blocks)")
    return applied
