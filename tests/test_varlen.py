"""`model.attn_implementation: varlen`: the packed rows as padding-free causal sequences (prompt+chosen, and rejected
over prompt+rejected keys) give the plain path's log-probs, loss and gradients (SDPA per sequence on CPU)."""

from __future__ import annotations

import pytest
import torch

from silkie.config import ModelSection, recipe_from_dict
from silkie.config.names import BIDIRECTIONAL_IMAGE_FAMILIES
from silkie.dpo.batching import packed_rows
from silkie.dpo.step import StepOptions
from silkie.errors import RecipeError
from silkie.models.qwen_vl import QWenConfig

from .conftest import tiny_config_kwargs
from .dpo_fixtures import random_pair_batch, step, tiny_lora_model
from .hf_fixtures import BUILDERS, assert_same_step, lora_model, media_batch, run_step
from .hf_fixtures import PLAIN as HF_PLAIN

SIZES = [(5, 7, 4), (9, 3, 6), (2, 5, 5)]
PLAIN = StepOptions(image_once=False, share_prompt=False, chunked_logps=False)


@pytest.fixture(scope="module")
def batch():
    return random_pair_batch(QWenConfig(**tiny_config_kwargs()), SIZES, [True, False, True], seed=1)


def test_layout_cuts_each_pair_into_two_sequences(batch):
    rows = packed_rows(batch, pad_token_id=0, pairs_per_row=2, varlen=True)
    layout = rows.layout
    prompts = batch["prompt_attention_mask"].sum(1).tolist()
    q_lengths, k_lengths = layout.cu_q.diff().tolist(), layout.cu_k.diff().tolist()
    expected_q, expected_k = [], []
    for (_, lc, lr), lp in zip(SIZES, prompts):
        expected_q += [lp + lc, lr]
        expected_k += [lp + lc, lp + lr]
    assert q_lengths == expected_q and k_lengths == expected_k
    assert layout.tokens.numel() == sum(expected_q) == int(rows.layout.cu_q[-1])
    assert (layout.rows, layout.width) == tuple(rows.input_ids.shape) and layout.max_k == max(expected_k)
    # pair 0's rejected sequence: the keys are its prompt tokens then its rejected tokens, never the chosen ones
    lp, lc, lr = prompts[0], SIZES[0][1], SIZES[0][2]
    second = layout.keys[k_lengths[0] : k_lengths[0] + k_lengths[1]].tolist()
    assert second == list(range(lp)) + list(range(lp + lc, lp + lc + lr))


@pytest.mark.parametrize("pairs_per_row", [1, 3])
def test_varlen_step_equals_the_plain_path(batch, pairs_per_row, monkeypatch):
    from silkie.models import varlen

    calls = []
    real = varlen.varlen_attention
    monkeypatch.setattr(varlen, "varlen_attention", lambda *args: calls.append(args[3].rows) or real(*args))
    plain_policy, plain_ref, plain_loss, plain_grads = step(tiny_lora_model(), batch, PLAIN)
    model = tiny_lora_model()
    model.get_base_model().config._attn_implementation = "varlen"
    from silkie.dpo import step as step_module

    dense = []  # the native model attends through the layout only: its dense block mask never goes to the device
    real_mask = step_module._attention_mask
    monkeypatch.setattr(step_module, "_attention_mask", lambda *args: dense.append(1) or real_mask(*args))
    policy, ref, loss, grads = step(model, batch, StepOptions(chunk_size=4, pairs_per_row=pairs_per_row))
    assert not dense
    for name in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(policy, name), getattr(plain_policy, name), atol=1e-5, rtol=0)
        torch.testing.assert_close(getattr(ref, name), getattr(plain_ref, name), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    assert (plain_policy.chosen_logps - plain_ref.chosen_logps).abs().max() > 1e-3  # the adapter matters
    rows = -(-len(SIZES) // pairs_per_row)
    assert calls and set(calls) == {rows}  # every layer of every pass went through the layout


def test_varlen_outside_packed_rows_is_sdpa(batch):
    model = tiny_lora_model()
    ids = batch["chosen_input_ids"]
    with torch.no_grad():
        sdpa = model(input_ids=ids, use_cache=False).logits
        model.get_base_model().config._attn_implementation = "varlen"
        varlen = model(input_ids=ids, use_cache=False).logits  # generation and the plain path: no layout
    torch.testing.assert_close(varlen, sdpa)


@pytest.mark.parametrize("family", sorted(set(BUILDERS) - set(BIDIRECTIONAL_IMAGE_FAMILIES)))
def test_varlen_equals_the_plain_path_for_transformers_families(family, tmp_path, monkeypatch):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (grouped-query attention, M-RoPE, images and videos), LLaVA and InternVL."""
    from silkie.models import varlen

    calls = []
    real = varlen.varlen_attention
    monkeypatch.setattr(varlen, "varlen_attention", lambda *args: calls.append(args[3].rows) or real(*args))
    folder = BUILDERS[family](tmp_path / family)
    model = lora_model(folder, family)
    batch, pad = media_batch(folder, family, model)
    plain = run_step(model, batch, HF_PLAIN, pad)
    fast_model = lora_model(folder, family, attn="varlen")
    assert fast_model.get_base_model().config.get_text_config()._attn_implementation == "varlen"
    assert fast_model.get_base_model().config.vision_config._attn_implementation == "sdpa"
    fast = run_step(fast_model, batch, StepOptions(chunk_size=4, pairs_per_row=2), pad)
    assert_same_step(fast, plain, family)
    rows = -(-batch["prompt_input_ids"].size(0) // 2)
    assert calls and set(calls) == {rows}  # every decoder layer of both passes went through the layout


@pytest.mark.parametrize("family", BIDIRECTIONAL_IMAGE_FAMILIES)
def test_varlen_is_refused_where_an_image_is_attended_both_ways(family):
    """Gemma 3: PyTorch's varlen kernel is causal only, so an image's tokens could not see each other both ways."""
    with pytest.raises(RecipeError, match=f"sdpa or eager for family {family}"):
        ModelSection(path="m", family=family, attn_implementation="varlen").check()


def test_varlen_outside_packed_rows_is_sdpa_for_transformers_families(tmp_path):
    """Generation and the plain path have no layout: the language model then runs SDPA with SDPA's masks
    (left padding included)."""
    folder = BUILDERS["qwen2_vl"](tmp_path / "qwen2_vl")
    sdpa, varlen = lora_model(folder, "qwen2_vl"), lora_model(folder, "qwen2_vl", attn="varlen")
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = varlen(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()])


def test_varlen_needs_the_shared_prompt_and_flex_needs_qwen_vl():
    base = {"model": {"path": "m", "attn_implementation": "varlen"}, "data": {"path": "d"}}
    with pytest.raises(RecipeError, match="'varlen' needs dpo.share_prompt = true"):
        recipe_from_dict({**base, "dpo": {"share_prompt": False}})
    llava = {"path": "m", "family": "llava"}
    assert recipe_from_dict({"model": {**llava, "attn_implementation": "varlen"}, "data": {"path": "d"}})
    with pytest.raises(RecipeError, match="flex_attention is implemented for qwen_vl"):
        recipe_from_dict({"model": {**llava, "attn_implementation": "flex_attention"}, "data": {"path": "d"}})


def _flash_rule(q, k, v, cu_q, cu_k, causal: bool, scale=None):
    """What flash attention's varlen kernel computes (causal aligned to the last key), one sequence at a time."""
    assert causal and q.size(1) == k.size(1)
    out = []
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril(diagonal=(k1 - k0) - (q1 - q0))
        seq = [t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1])]
        out.append(
            torch.nn.functional.scaled_dot_product_attention(*seq, attn_mask=allowed, scale=scale).transpose(0, 1)
        )
    return torch.cat(out)


def torch_2_10_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    return _flash_rule(query, key, value, cu_seq_q, cu_seq_k, is_causal)


def later_varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    if enable_gqa:
        key, value = (t.repeat_interleave(query.size(1) // t.size(1), dim=1) for t in (key, value))
    return _flash_rule(query, key, value, cu_seq_q, cu_seq_k, tuple(window_size) == (-1, 0), scale)


@pytest.mark.parametrize("spelling", [torch_2_10_varlen_attn, later_varlen_attn])
def test_kernel_call_fits_each_torch_spelling(batch, spelling):
    """Causal flag, scale and grouped-query heads reach either signature of varlen_attn and give the layout's
    attention (the CUDA kernel itself is checked on the card: lever_check, gpu_session.sh perf)."""
    from silkie.models.varlen import _reference_varlen, kernel_for

    layout = packed_rows(batch, pad_token_id=0, pairs_per_row=2, varlen=True).layout
    tokens = int(layout.cu_q[-1])
    torch.manual_seed(0)
    q, k, v = torch.randn(tokens, 4, 8), torch.randn(tokens, 2, 8), torch.randn(tokens, 2, 8)
    keys, values = k[layout.keys], v[layout.keys]
    args = (layout.cu_q, layout.cu_k, layout.max_q, layout.max_k)
    expected = _reference_varlen(q, keys, values, layout, 0.3)
    torch.testing.assert_close(kernel_for(spelling)(q, keys, values, *args, 0.3), expected)
    default = kernel_for(spelling)(q, keys, values, *args)
    torch.testing.assert_close(default, _reference_varlen(q, keys, values, layout, None))
    assert (default - expected).abs().max() > 1e-2  # the scale mattered


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_call_the_layout_misses_still_attends_right(family, tmp_path, monkeypatch):
    """The dense block mask goes in beside the layout: an attention call without the layout (SDPA then) gives the
    same answers, not a causal pass over the whole packed row (Qwen2-VL) or one cut at each position restart
    (LLaVA)."""
    from silkie.models.hf_vlm import varlen_attention

    real = varlen_attention.hf_varlen_attention
    monkeypatch.setattr(varlen_attention, "hf_varlen_attention", lambda *a, varlen_layout=None, **kw: real(*a, **kw))
    varlen_attention.register()  # the registry now holds the function that drops the layout
    try:
        folder = BUILDERS[family](tmp_path / family)
        model = lora_model(folder, family)
        batch, pad = media_batch(folder, family, model)
        plain = run_step(model, batch, HF_PLAIN, pad)
        varlen = lora_model(folder, family, attn="varlen")
        assert_same_step(run_step(varlen, batch, StepOptions(pairs_per_row=2), pad), plain)
    finally:
        monkeypatch.undo()
        varlen_attention.register()


def test_sliding_window_layers_are_refused():
    from silkie.models.hf_vlm.varlen_attention import hf_varlen_attention

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="sliding-window attention layers are not supported"):
        hf_varlen_attention(torch.nn.Module(), q, q, q, None, sliding_window=2, varlen_layout=object())
