"""Build the policy (base checkpoint + LoRA, or full fine-tuning), the frozen reference copy and the codec.

Everything family-specific (checkpoint class, module names, tokenizer/processor) comes from the recipe's
`model.family` through `silkie.models.family`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from silkie.config import LoraSection, ModelSection
from silkie.config.checkpoint import checkpoint_problem
from silkie.config.lora_section import ALL_LINEAR
from silkie.config.names import HUB_ID
from silkie.errors import InputError
from silkie.models.family import ModelFamily, PairCodec, get_family
from silkie.models.qwen_vl.tokenization import VOCAB_FILE


def local_checkpoint(path: str, key: str = "model.path") -> str:
    """`path` when it is a folder; else a hub id's snapshot folder (downloaded when online, from the cache offline);
    errors name the recipe's `key`."""
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    if not HUB_ID.match(path):
        raise InputError(f"{key}: {path} does not exist (expected a checkpoint folder, or a hub id org/name)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path)
    except Exception as err:  # an invalid id, no network, offline without a cached copy
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"{key}: {path} is no local folder and the model hub cannot provide it ({type(err).__name__}: "
            f"{reason}; offline, a hub id must be in the local hub cache)"
        ) from err


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` -> bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_tokenizer(section: ModelSection) -> PairCodec:
    """The checkpoint's text codec: prompt/answer ids, pad id, image marker (tokenizer files in the model folder)."""
    return get_family(section.family).load_codec(section)


def load_base_model(section: ModelSection, load_in_4bit: bool = False) -> nn.Module:
    """The checkpoint in the recipe's dtype and attention implementation (LLM linears in 4 bit for QLoRA)."""
    family = get_family(section.family)
    dtype = resolve_dtype(section.dtype)
    quantization = qlora_quantization(dtype, family) if load_in_4bit else None
    return family.load_model(section, dtype, quantization)


def qlora_quantization(compute_dtype: torch.dtype, family: ModelFamily):
    """NF4 4-bit config for the language model's linears (vision tower and LM head stay in `compute_dtype`)."""
    if not torch.cuda.is_available():
        raise InputError("lora.load_in_4bit: 4-bit QLoRA needs a CUDA GPU (none is visible); set it to false")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise InputError("lora.load_in_4bit: 4-bit QLoRA needs `pip install bitsandbytes`; or set it to false") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=family.quantization_skip_modules(),
    )


def lora_target_regex(lora: LoraSection, family: str = "qwen_vl") -> str:
    """peft `target_modules` regex: the LLM modules named in the recipe (or the family's), plus vision if asked."""
    return get_family(family).lora_target_regex(lora)


def freeze_vision(model: nn.Module, keep_resampler: bool = False, family: str = "qwen_vl") -> None:
    """Freeze the vision tower; with `keep_resampler` its projector (Qwen-VL resampler, merger, ...) stays trainable."""
    get_family(family).freeze_vision(model, keep_projector=keep_resampler)


def apply_lora(
    model: nn.Module, lora: LoraSection, family: str = "qwen_vl", disable_dropout: bool = False
) -> nn.Module:
    """Wrap with peft LoRA adapters (frozen base); returns the PeftModel. With `disable_dropout` the adapters get
    no dropout (peft then skips the dropout op), whatever `lora.dropout` says."""
    from peft import LoraConfig, get_peft_model

    if lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = with_all_linear_targets(model, lora, family)
    check_lora_targets(model, lora, family)
    dropout = 0.0 if disable_dropout else lora.dropout
    check_lora_parameters(model, lora, family, dropout)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(lora, family),
        target_parameters=lora.target_parameters,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
    )
    peft_model = get_peft_model(model, config)
    if not lora.vision:
        freeze_vision(peft_model.get_base_model(), family=family)
    return peft_model


def with_all_linear_targets(model: nn.Module, lora: LoraSection, family: str = "qwen_vl") -> LoraSection:
    """`lora` with `target_modules: [all-linear]` spelled out: the names of every linear layer of the language model
    (the family's scope, as for any name) but the output head, as peft's `all-linear`."""
    from dataclasses import replace

    if lora.target_modules != [ALL_LINEAR]:
        return lora
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    return replace(lora, target_modules=[leaf for leaf in leaves if _matches_in_llm(lora, leaf, family, linears)])


def _matches_in_llm(lora: LoraSection, target: str, family: str, linears: list[str]) -> bool:
    """Whether `target` names one of the `linears` inside the language model (the family's LoRA scope)."""
    import re
    from dataclasses import replace

    pattern = re.compile(lora_target_regex(replace(lora, target_modules=[target], vision=False), family))
    return any(pattern.fullmatch(name) for name in linears)


def check_lora_targets(model: nn.Module, lora: LoraSection, family: str = "qwen_vl") -> None:
    """InputError naming each `lora.target_modules` entry that matches no linear layer of the language model (peft
    would only fail when none matches, and then with every module name)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for target in lora.target_modules or []:
        if not _matches_in_llm(lora, target, family, linears):
            leaves = sorted({leaf for name in linears if _matches_in_llm(lora, leaf := name.rsplit(".", 1)[-1],
                                                                        family, [name])})  # fmt: skip
            raise InputError(
                f"lora.target_modules: {target!r} matches no linear layer of the language model; its linear layers "
                f"are named {', '.join(leaves[:12])}{' ...' if len(leaves) > 12 else ''} (null: the family's "
                f"default {', '.join(get_family(family).default_lora_targets)})"
            )


def check_lora_parameters(model: nn.Module, lora: LoraSection, family: str, dropout: float) -> None:
    """InputError naming a `lora.target_parameters` entry that ends no parameter name of the language model's
    decoder layers or also one outside them (peft matches a name or its ending), or any entry with LoRA dropout on
    (peft's parameter adapters take none)."""
    if not lora.target_parameters:
        return
    if dropout:
        raise InputError(
            f"lora.target_parameters: peft's parameter adapters take no dropout, and lora.dropout is {dropout} with "
            "dpo.disable_dropout: false; set lora.dropout: 0 or dpo.disable_dropout: true"
        )
    named = dict(get_family(family).decoder_layers(model).named_parameters())  # "0.mlp.experts.down_proj": ...
    inside = {id(param) for param in named.values()}
    experts = sorted({name.split(".", 1)[1] for name, param in named.items() if param.dim() == 3})
    for target in lora.target_parameters:
        hits = {name: p for name, p in model.named_parameters() if name == target or name.endswith(f".{target}")}
        outside = [name for name, param in hits.items() if id(param) not in inside]
        if not hits or outside:
            where = f"also matches {outside[0]}, outside the language model's layers" if outside else (
                "ends no parameter name of the language model's layers")  # fmt: skip
            raise InputError(
                f"lora.target_parameters: {target!r} {where}; their 3-D (expert) parameters are "
                f"{', '.join(experts) or 'none (a dense model: use lora.target_modules)'}"
            )


def switch_off_dropout(model: nn.Module) -> int:
    """Set every dropout layer's probability to 0 (TRL's `disable_dropout_in_model`); returns how many were on."""
    active = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            active += module.p > 0
            module.p = 0.0
    return active


def build_policy(
    model_section: ModelSection, lora: LoraSection, disable_dropout: bool = False, seed: int | None = None
) -> nn.Module:
    """The recipe's checkpoint as the policy (`make_policy`, `seed` included)."""
    if lora.load_in_4bit and not lora.enabled:
        raise InputError("lora.load_in_4bit needs lora.enabled: true (4-bit weights cannot be fine-tuned directly)")
    model = load_base_model(model_section, load_in_4bit=lora.load_in_4bit)
    return make_policy(model, lora, model_section.family, disable_dropout, seed)


def make_policy(
    model: nn.Module, lora: LoraSection, family: str = "qwen_vl", disable_dropout: bool = False, seed: int | None = None
) -> nn.Module:
    """A base model as the policy: plus LoRA (vision frozen unless `lora.vision`), or the whole model for full
    fine-tuning; with `disable_dropout` (TRL's default for DPO) no dropout anywhere in it. With `seed` the random
    generators are seeded just before the adapter is made, so its initial weights depend on the seed alone: not on
    what ran before, a data cache hit or miss, or how the load went (under ZeRO-3 Qwen3.5's layers are built on the
    device, drawing numbers a plain load does not)."""
    if disable_dropout:
        switch_off_dropout(model)
    if lora.enabled:
        if seed is not None:
            from transformers import set_seed

            set_seed(seed)
        return apply_lora(model, lora, family, disable_dropout)
    if not lora.vision:  # full fine-tuning: LLM + projector, vision tower frozen (as VL-RLHF)
        freeze_vision(model, keep_resampler=True, family=family)
    return model


def build_frozen_reference(model_section: ModelSection, load_in_4bit: bool = False) -> nn.Module:
    """A separate frozen model as the reference: `model.ref_model` (a local folder) when the recipe names one, else
    a copy of `model.path` (full fine-tuning)."""
    section = model_section
    if model_section.ref_model:
        problem = checkpoint_problem(model_section.ref_model, model_section.family, "model.ref_model")
        if problem:
            raise InputError(problem)
        section = dataclasses.replace(model_section, path=model_section.ref_model, ref_model=None)
    model = load_base_model(section, load_in_4bit=load_in_4bit).eval()
    if load_in_4bit:  # the weights QLoRA's policy keeps in fp32 (norms, embeddings, head) in fp32 here too
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).eval()
    model.requires_grad_(False)
    return model


def check_reference(policy: nn.Module, reference: nn.Module, section: ModelSection) -> None:
    """`InputError` when `model.ref_model` cannot score the policy's token ids: another number of token
    embeddings, or tokenizer files whose vocabulary differs from model.path's."""
    rows, ref_rows = (m.get_input_embeddings().num_embeddings for m in (policy, reference))
    if rows != ref_rows:
        raise InputError(f"model.ref_model: {section.ref_model} has {ref_rows} token embeddings, model.path "
                         f"{rows}: the reference must share the policy's tokenizer")  # fmt: skip
    vocabularies = [_vocabulary(folder, section.family) for folder in (section.path, section.ref_model)]
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        raise InputError(f"model.ref_model: {section.ref_model}'s tokenizer has another vocabulary than model.path's "
                         f"({section.path}): the reference must score the same token ids")  # fmt: skip


def _vocabulary(folder: str | None, family: str) -> Any:
    """A folder's tokenizer vocabulary, comparable between folders (None: the folder holds no tokenizer files)."""
    folder = Path(folder or "")
    if family == "qwen_vl":
        ranks = folder / VOCAB_FILE
        return hashlib.sha256(ranks.read_bytes()).hexdigest() if ranks.is_file() else None
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()
