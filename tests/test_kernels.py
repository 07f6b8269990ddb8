"""The recipe's speed switches (`model.fp32_norm_rope`, `model.liger_kernels`, `model.compile_blocks`): each equals
the plain path within tolerance, and each really changes how the model computes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from silkie.config import ModelSection
from silkie.dpo.step import StepOptions, score_answers
from silkie.errors import InputError
from silkie.models import kernels
from silkie.models.kernels import apply_kernels
from silkie.models.qwen_vl import QWenConfig, QWenLMHeadModel
from silkie.models.qwen_vl.modeling import RMSNorm

from .conftest import tiny_config_kwargs
from .dpo_fixtures import random_pair_batch, step, tiny_lora_model

SIZES = [(5, 7, 4), (9, 3, 6), (2, 5, 5)]


def section(**switches) -> ModelSection:
    return ModelSection(path="unused", family="qwen_vl", **switches)


@pytest.fixture(scope="module")
def batch():
    return random_pair_batch(QWenConfig(**tiny_config_kwargs()), SIZES, [True, False, True], seed=1)


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["chosen_input_ids"], use_cache=False).logits.float()


def test_native_precision_norms_are_the_original_in_fp32_and_close_in_bf16(batch):
    torch.manual_seed(0)
    reference = QWenLMHeadModel(QWenConfig(**tiny_config_kwargs())).eval()
    upcast = QWenLMHeadModel(QWenConfig(**tiny_config_kwargs())).eval()
    upcast.load_state_dict(reference.state_dict())
    native = QWenLMHeadModel(QWenConfig(**tiny_config_kwargs())).eval()
    native.load_state_dict(reference.state_dict())
    assert apply_kernels(native, section(fp32_norm_rope=False)) == ["native-precision norms and rotary (5 norms)"]
    assert all(not m.upcast for m in native.modules() if isinstance(m, RMSNorm))
    torch.testing.assert_close(_logits(native, batch), _logits(reference, batch), atol=1e-5, rtol=0)
    upcast.to(torch.bfloat16)
    native.to(torch.bfloat16)
    exact = _logits(reference, batch)
    upcast_error = (_logits(upcast, batch) - exact).abs().max().item()
    native_error = (_logits(native, batch) - exact).abs().max().item()
    assert not torch.equal(_logits(upcast, batch), _logits(native, batch))  # the switch changes the arithmetic
    assert native_error < 4 * upcast_error + 0.05, (native_error, upcast_error)  # ... and stays near bf16's noise


def test_fp32_norm_rope_is_a_qwen_vl_switch():
    with pytest.raises(Exception, match=r"model.fp32_norm_rope = False .*true for family qwen2_vl"):
        ModelSection(path="x", family="qwen2_vl", fp32_norm_rope=False).check()


def test_compiled_blocks_score_and_train_as_the_eager_model(batch, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # dynamo's default, whatever ran before
    torch._dynamo.reset()
    eager = tiny_lora_model()
    compiled = tiny_lora_model()
    applied = apply_kernels(compiled, section(compile_blocks=True))
    assert applied == ["torch.compile per decoder block (2 blocks)"]
    # grad on/off x train/eval x adapters on/off x static/dynamic shapes: more variants than dynamo's default 8
    assert torch._dynamo.config.recompile_limit >= kernels.BLOCK_RECOMPILE_LIMIT == 64
    blocks = compiled.get_base_model().transformer.h
    assert all(block._compiled_call_impl is not None for block in blocks)
    options = StepOptions(chunk_size=4, pairs_per_row=2)
    plain_policy, plain_ref, plain_loss, plain_grads = step(eager, batch, options)
    policy, ref, loss, grads = step(compiled, batch, options)
    torch.testing.assert_close(policy.chosen_logps, plain_policy.chosen_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.rejected_logps, plain_ref.rejected_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    # every batch has other lengths: after one recompile with dynamic shapes, new lengths compile nothing more
    # (a recompile per batch would reach dynamo's recompile limit, after which the blocks silently run eager)
    from torch._dynamo.utils import counters

    config = QWenConfig(**tiny_config_kwargs())
    graphs = []
    for seed, sizes in enumerate([[(7, 4, 9), (3, 8, 2)], [(11, 6, 3), (4, 2, 7)], [(6, 9, 5), (8, 3, 4)]]):
        step(compiled, random_pair_batch(config, sizes, [True, True], seed=seed), options)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[0], graphs
    torch._dynamo.reset()


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.linear(x))


@pytest.fixture
def fresh_dynamo():
    """An empty dynamo cache before and after (a failed test must not leave a code object given up)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_watch_sees_dynamo_give_up_and_the_run_warns_once(capsys, fresh_dynamo):
    """Past dynamo's recompile limit a compiled module runs eager without an error: the watch must see it."""
    from silkie.train.console import CompileWatchCallback

    toy = _Toy()
    toy.compile()
    callback = CompileWatchCallback()
    state = type("State", (), {"is_world_process_zero": True})()
    with torch._dynamo.config.patch(recompile_limit=2):
        for grad in (True, False):  # one graph per grad mode: the limit of 2 is not reached
            with torch.set_grad_enabled(grad):
                toy(torch.randn(2, 4))
        assert callback.watch.graphs() == 2 and callback.watch.gave_up() == 0
        callback.on_step_end(None, state, None)
        toy(torch.randn(3, 2, 4))  # a third variant (another rank): dynamo gives up, and the call runs eager
        assert callback.watch.graphs() == 2 and callback.watch.gave_up() == 1
        capsys.readouterr()
        callback.on_step_end(None, state, None)
        callback.on_evaluate(None, state, None)
        callback.on_train_end(None, state, None)
    assert capsys.readouterr().out.splitlines() == [
        "[silkie] warning: the compiled decoder blocks reached torch._dynamo's recompile limit (2): they run eager "
        "from here; TORCH_LOGS=recompiles shows each variant",
        "[silkie] torch.compile: 2 graphs compiled",
    ]


def test_eager_blocks_run_compiled_modules_plain_inside_and_compiled_after(fresh_dynamo):
    from silkie.models.kernels import CompileWatch, eager_blocks

    model = torch.nn.Sequential(_Toy(), _Toy())
    model[1].compile()
    x = torch.randn(2, 4)
    expected = model(x)
    watch = CompileWatch()
    with eager_blocks(model):
        assert model[1]._compiled_call_impl is None
        assert model(torch.randn(3, 5, 4)).shape == (3, 5, 4)  # a new rank: compiled, this would compile
    assert watch.graphs() == 0 and model[1]._compiled_call_impl is not None
    model(torch.randn(3, 5, 4))  # compiled again outside
    assert watch.graphs() == 1
    torch.testing.assert_close(model(x), expected)


def test_liger_kernels_without_the_package_say_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "liger_kernel" else real(name))
    with pytest.raises(InputError, match=r"model.liger_kernels: liger-kernel is not installed \(pip install"):
        apply_kernels(QWenLMHeadModel(QWenConfig(**tiny_config_kwargs())), section(liger_kernels=True))


def test_liger_kernels_need_cuda(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="need a CUDA device and this machine has none"):
        kernels.check_liger_available()


@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available(),
    reason="liger-kernel's Triton kernels need CUDA (not even Triton's interpreter runs them); gpu_session.sh perf",
)
def test_liger_kernels_score_as_the_plain_model(batch):
    device = "cuda"
    plain = tiny_lora_model().to(device)
    fused = tiny_lora_model().to(device)
    applied = apply_kernels(fused, section(liger_kernels=True))
    assert applied == ["liger-kernel (9 modules)"]  # 5 norms, 2 MLPs, 2 attentions of the LLM (not the tower)
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    a = score_answers(plain, on_device, StepOptions(), 0, no_grad=True)
    b = score_answers(fused, on_device, StepOptions(), 0, no_grad=True)
    torch.testing.assert_close(b.chosen_logps, a.chosen_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.rejected_logps, a.rejected_logps, atol=1e-4, rtol=0)
