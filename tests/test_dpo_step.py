"""Efficient DPO step (image once, shared prompt, chunked log-probs) equals the plain TRL-style path."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from silkie.dpo.batching import packed_rows
from silkie.dpo.step import StepOptions, encode_images_once, score_answers
from silkie.models.qwen_vl import QWenConfig, QWenLMHeadModel

from .conftest import tiny_config_kwargs
from .dpo_fixtures import random_pair_batch, step, tiny_lora_model

PLAIN = StepOptions(image_once=False, share_prompt=False, chunked_logps=False)
SIZES = [(5, 7, 4), (9, 3, 6), (2, 5, 5)]


@pytest.fixture(scope="module")
def lora_model():
    return tiny_lora_model()


@pytest.fixture(scope="module")
def batch():
    return random_pair_batch(QWenConfig(**tiny_config_kwargs()), SIZES, [True, False, True], seed=1)


OPTION_SETS = [
    StepOptions(image_once=True, share_prompt=False, chunked_logps=False),
    StepOptions(image_once=False, share_prompt=True, chunked_logps=False),
    StepOptions(image_once=False, share_prompt=False, chunked_logps=True, chunk_size=5),
    StepOptions(image_once=True, share_prompt=True, chunked_logps=True, chunk_size=4),
    StepOptions(chunk_size=4, pairs_per_row=2),
    StepOptions(chunk_size=4, pairs_per_row=3),
]


@pytest.mark.parametrize(
    "options", OPTION_SETS, ids=["image_once", "share_prompt", "chunked", "all", "two_per_row", "one_row"]
)
def test_optimised_paths_equal_plain(lora_model, batch, options):
    plain_policy, plain_ref, plain_loss, plain_grads = step(lora_model, batch, PLAIN)
    policy, ref, loss, grads = step(lora_model, batch, options)
    for name in ("chosen_logps", "rejected_logps"):
        assert torch.allclose(getattr(policy, name), getattr(plain_policy, name), atol=1e-5, rtol=0), name
        assert torch.allclose(getattr(ref, name), getattr(plain_ref, name), atol=1e-5, rtol=0), name
    assert not torch.allclose(policy.chosen_logps, ref.chosen_logps, atol=1e-3)  # the adapter matters
    for name in ("entropy", "chosen_token_accuracy"):  # the policy's token statistics (metrics), not the reference's
        assert torch.allclose(getattr(policy, name), getattr(plain_policy, name), atol=1e-5, rtol=0), name
        assert getattr(ref, name) is None
    assert abs(loss.item() - plain_loss.item()) < 1e-5
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 4 * 2  # A and B of 4 modules x 2 layers
    for name in grads:
        assert torch.allclose(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4), name


def test_packed_rows_hide_the_other_answer(lora_model, batch):
    options = StepOptions()
    features = encode_images_once(lora_model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["chosen_input_ids"][:, :2] = 11
    a = score_answers(lora_model, batch, options, 0, features, no_grad=True)
    b = score_answers(lora_model, changed, options, 0, features, no_grad=True)
    assert torch.equal(a.rejected_logps, b.rejected_logps)
    assert (a.chosen_logps - b.chosen_logps).abs().max() > 1e-2


def test_packed_layout_positions_and_mask(batch):
    rows = packed_rows(batch, pad_token_id=0)
    lp = int(batch["prompt_attention_mask"][1].sum())
    lc, lr = SIZES[1][1], SIZES[1][2]
    assert rows.position_ids[1, : lp + lc].tolist() == list(range(lp + lc))
    assert rows.position_ids[1, lp + lc : lp + lc + lr].tolist() == list(range(lp, lp + lr))
    mask = rows.attention_mask_on()[1, 0]
    first_rejected = lp + lc
    assert mask[first_rejected, :lp].all() and not mask[first_rejected, lp:first_rejected].any()
    assert mask[first_rejected, first_rejected] and not mask[lp, lp + 1]
    # the first rejected token is predicted from the last prompt token, not from the chosen answer
    assert rows.rejected_index[rows.rejected_pair == 1][0].item() == 1 * rows.input_ids.size(1) + lp - 1


def test_packed_rows_keep_the_block_mask_off_the_host(batch, monkeypatch):
    """The [R, 1, W, W] block mask is derived from per-token owners and segments on the device that attends with
    it; the rows themselves hold nothing quadratic in the row width (on the host it dominated the step's host time)."""
    import dataclasses

    from silkie.dpo import batching

    rows = packed_rows(batch, pad_token_id=0, pairs_per_row=2, varlen=True)
    n_rows, width = rows.input_ids.shape
    tensors = [getattr(rows, f.name) for f in dataclasses.fields(rows) if f.name != "layout"]
    assert max(t.numel() for t in tensors if t is not None) <= 3 * n_rows * width  # no W x W tensor
    built_on = []
    real = batching.block_mask
    monkeypatch.setattr(batching, "block_mask", lambda owner, seg: built_on.append(owner.device) or real(owner, seg))
    mask = rows.attention_mask_on(torch.device("cpu"))
    assert built_on == [torch.device("cpu")] and mask.shape == (n_rows, 1, width, width) and mask.dtype == torch.bool
    # each query sees exactly its own pair's prompt, its own answer up to itself; padding sees only itself
    owner, segment = rows.owner[0], rows.segment[0]
    for q in range(width):
        expected = [
            k == q or (0 <= k <= q and owner[k] == owner[q] >= 0 and segment[k] in (0, segment[q]))
            for k in range(width)
        ]
        assert mask[0, 0, q].tolist() == expected, q


def test_several_pairs_per_row_see_only_themselves(lora_model, batch):
    rows = packed_rows(batch, pad_token_id=0, pairs_per_row=2)
    spans = [
        int(batch[f"{part}_attention_mask"][b].sum()) for b in range(3) for part in ("prompt", "chosen", "rejected")
    ]
    first, second = sum(spans[:3]), sum(spans[3:6])
    assert rows.input_ids.shape == (2, max(first + second, sum(spans[6:])))  # 3 pairs -> rows of 2 and 1
    mask = rows.attention_mask_on()[0, 0]
    assert not mask[first:, :first].any()  # the second pair never sees the first one
    assert mask[first + spans[3] - 1, first : first + spans[3]].all()  # its prompt is causal over itself
    assert rows.position_ids[0, first : first + spans[3]].tolist() == list(range(spans[3]))
    assert rows.chosen_index[rows.chosen_pair == 1][0].item() == first + spans[3] - 1
    changed = {k: v.clone() for k, v in batch.items()}
    lc = spans[1]  # pair 0 shares row 0 with pair 1: another chosen answer for pair 0 must not move pair 1's scores
    changed["chosen_input_ids"][0, :lc] = batch["chosen_input_ids"][0, :lc].flip(0) + 1
    options = StepOptions(pairs_per_row=2)
    a = score_answers(lora_model, batch, options, 0, no_grad=True)
    b = score_answers(lora_model, changed, options, 0, no_grad=True)
    assert torch.equal(a.chosen_logps[1:], b.chosen_logps[1:]) and torch.equal(a.rejected_logps, b.rejected_logps)
    assert (a.chosen_logps[0] - b.chosen_logps[0]).abs() > 1e-2


def test_image_once_encodes_without_autograd(lora_model, batch):
    calls = []
    visual = lora_model.get_base_model().transformer.visual
    hook = visual.register_forward_hook(lambda module, args, out: calls.append(out.requires_grad))
    try:
        step(lora_model, batch, StepOptions())
        assert calls == [False]  # one encoding per step, no graph, reused by policy and reference
        calls.clear()
        step(lora_model, batch, PLAIN)
        assert len(calls) == 2  # plain path: policy and reference each encode (chosen+rejected rows)
    finally:
        hook.remove()


def test_disabled_adapter_equals_frozen_copy(lora_model, batch):
    frozen = copy.deepcopy(lora_model.get_base_model())
    # a deep copy still holds the LoRA layers; merge-free reference = base weights with adapters off
    base = QWenLMHeadModel(lora_model.get_base_model().config)
    state = {k.replace("base_layer.", ""): v for k, v in frozen.state_dict().items() if "lora_" not in k}
    base.load_state_dict(state)
    base.requires_grad_(False)
    options = StepOptions()
    features = encode_images_once(lora_model, batch)
    with lora_model.disable_adapter():
        via_adapter = score_answers(lora_model, batch, options, 0, features, no_grad=True)
    via_copy = score_answers(base, batch, options, 0, features, no_grad=True)
    assert torch.allclose(via_adapter.chosen_logps, via_copy.chosen_logps, atol=1e-5, rtol=0)
    assert torch.allclose(via_adapter.rejected_logps, via_copy.rejected_logps, atol=1e-5, rtol=0)


def test_chunk_size_does_not_change_results(lora_model, batch):
    results = [
        score_answers(lora_model, batch, StepOptions(chunk_size=size), 0, no_grad=True).chosen_logps
        for size in (1, 3, 1000)
    ]
    for a, b in itertools.pairwise(results):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_zero3_partitioned_tower_runs_on_text_only_batches(lora_model, batch, monkeypatch):
    """Under ZeRO-3 every rank must call the vision tower as often as the others and at the same point of the
    forward (right after the token embeddings, where ranks with images run it), images or not."""
    import silkie.dpo.step as step_module

    text_only = {k: v for k, v in batch.items()}
    text_only["image_counts"] = torch.zeros_like(batch["image_counts"])
    text_only["pixel_values"] = batch["pixel_values"][:0]
    text_only["prompt_input_ids"] = torch.randint(0, 200, batch["prompt_input_ids"].shape)
    transformer = lora_model.get_base_model().transformer
    calls, order = [], []
    hooks = [
        transformer.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0])),
        *(
            module.register_forward_pre_hook(lambda module, args, name=name: order.append(name))
            for name, module in (("wte", transformer.wte), ("visual", transformer.visual), ("h0", transformer.h[0]))
        ),
    ]
    with torch.no_grad():
        reference = score_answers(lora_model, text_only, PLAIN, 0, no_grad=True)
        order.clear()
        score_answers(lora_model, batch, PLAIN, 0, no_grad=True)
        with_images = list(order)
    monkeypatch.setattr(step_module, "is_partitioned", lambda module: True)
    try:
        for options in (StepOptions(), PLAIN):
            calls.clear()
            order.clear()
            features = encode_images_once(lora_model, text_only) if options.image_once else None
            with_features = len(calls)
            score_answers(lora_model, text_only, options, 0, features, no_grad=True)
            scores = score_answers(lora_model, text_only, options, 0, features, no_grad=True)
            # optimized: one blank encoding per step; plain: one per scoring call, as with images
            assert (with_features, len(calls)) == ((1, 1) if options.image_once else (0, 2)), options
            assert set(calls) == {1}
            torch.testing.assert_close(scores.chosen_logps, reference.chosen_logps, atol=1e-5, rtol=0)
        assert with_images[:3] == ["wte", "visual", "h0"] and order[:3] == with_images[:3], order
    finally:
        for hook in hooks:
            hook.remove()


def test_token_entropy_and_top1_from_chunked_logits_under_checkpointing():
    """Entropy -sum p log p and top-1 hits per token, from checkpointed chunks, with gradients still flowing."""
    from silkie.dpo.logprobs import chunked_token_logps

    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    hidden = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], requires_grad=True)  # uniform, token 0, token 1
    targets = torch.tensor([2, 0, 0])
    scores = chunked_token_logps(hidden, targets, head, chunk_size=2, stats=True)
    logits = hidden.detach() @ head.weight.T
    probs = logits.softmax(-1)
    assert scores.entropy.tolist() == pytest.approx((-(probs * probs.log()).sum(-1)).tolist(), abs=1e-6)
    assert scores.entropy[0].item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert scores.top1.tolist() == [0.0, 1.0, 0.0]  # a uniform row's argmax is token 0, not the target 2
    scores.logps.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    plain = chunked_token_logps(hidden.detach(), targets, head, chunk_size=2)
    assert plain.entropy is None and torch.allclose(plain.logps, scores.logps.detach())
    from silkie.dpo.logprobs import _token_stats  # row blocks (one call for every token under ZeRO-3)

    blocked = _token_stats(logits, logits.log_softmax(-1), targets, rows=2)
    assert torch.allclose(blocked[0], scores.entropy) and blocked[1].tolist() == [0.0, 1.0, 0.0]
