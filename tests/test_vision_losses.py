"""Vision-aware objectives: mDPO's terms against the paper's equations, the seeded image corruption, and the
corrupted-image view on the efficient step (equal to the plain path)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image

from silkie.data.corruption import CROP_AREA, corrupt_image
from silkie.dpo.losses import DPOObjective
from silkie.dpo.objective import batch_metrics, score_batch
from silkie.dpo.step import StepOptions
from silkie.models.qwen_vl import QWenConfig

from .conftest import tiny_config_kwargs
from .dpo_fixtures import random_pair_batch, tiny_lora_model


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _random_logps(seed: int, n: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n, generator=gen, dtype=torch.float64) - 1 for _ in range(6)]


def test_mdpo_terms_equal_the_papers_equations():
    """L = L_DPO + L_CoPO + L_AncPO (mDPO eqs. 3-5): each term from the equations on random log-probs, 1e-6."""
    pc, pr, rc, rr, pc_bad, rc_bad = _random_logps(0)
    beta = 0.3

    def reference(i: int) -> tuple[float, float, float]:
        dpo = -logsigmoid(beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item())
        copo = -logsigmoid(beta * ((pc[i] - pc_bad[i]) - (rc[i] - rc_bad[i])).item())
        anchor = -logsigmoid(beta * (pc[i] - rc[i]).item() - 0.5)
        return dpo, copo, anchor

    terms = [reference(i) for i in range(6)]
    bad = (pc_bad, rc_bad)
    conditional = DPOObjective(beta=beta, loss_type="image_conditional")(pc, pr, rc, rr, corrupted_chosen=bad)
    assert conditional.per_pair.tolist() == pytest.approx([t[1] for t in terms], rel=1e-6, abs=1e-9)
    mdpo = DPOObjective(beta=beta, loss_type="mdpo", mdpo_anchor_delta=0.5)(pc, pr, rc, rr, corrupted_chosen=bad)
    assert mdpo.per_pair.tolist() == pytest.approx([sum(t) for t in terms], rel=1e-6)
    weighted = DPOObjective(
        beta=beta, loss_type="mdpo", mdpo_conditional_weight=0.25, mdpo_anchor_weight=2.0, mdpo_anchor_delta=0.5
    )(pc, pr, rc, rr, corrupted_chosen=bad)
    assert weighted.per_pair.tolist() == pytest.approx([t[0] + 0.25 * t[1] + 2 * t[2] for t in terms], rel=1e-6)
    # each part is logged on its own, unweighted (loss/dpo, loss/image_conditional, loss/anchor)
    for index, name in enumerate(("loss/dpo", "loss/image_conditional", "loss/anchor")):
        assert weighted.terms[name].tolist() == pytest.approx([t[index] for t in terms], rel=1e-6)
    assert conditional.terms == {}  # a loss of one part: `loss` says it all
    # CHiP's response + image terms: DPO + the conditional term, as a weighted list
    chip = DPOObjective(beta=beta, loss_type=("sigmoid", "image_conditional"), loss_weights=(1.0, 0.5))
    chip_out = chip(pc, pr, rc, rr, corrupted_chosen=bad)
    assert chip_out.per_pair.tolist() == pytest.approx([t[0] + 0.5 * t[1] for t in terms], rel=1e-6)
    assert chip_out.terms["loss/image_conditional"].tolist() == pytest.approx([t[1] for t in terms], rel=1e-6)
    assert chip_out.terms["loss/sigmoid"].tolist() == pytest.approx([t[0] for t in terms], rel=1e-6)
    # label smoothing is cDPO's on the DPO term only
    smoothed = DPOObjective(beta=beta, loss_type="mdpo", label_smoothing=0.1)(pc, pr, rc, rr, corrupted_chosen=bad)
    d = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(6)]
    expected = [
        -0.9 * logsigmoid(d[i]) - 0.1 * logsigmoid(-d[i]) + terms[i][1] - logsigmoid(beta * (pc[i] - rc[i]).item())
        for i in range(6)
    ]  # noqa: E501
    assert smoothed.per_pair.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="need corrupted_chosen"):
        DPOObjective(loss_type="mdpo")(pc, pr, rc, rr)


def test_a_left_out_pair_of_a_vision_loss_stays_finite():
    pc, pr, rc, rr, pc_bad, rc_bad = _random_logps(1, n=2)
    rc_bad = rc_bad.clone()
    rc_bad[0] = 0.0  # placeholder reference of a pair whose image failed
    weights = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = DPOObjective(loss_type="mdpo")(pc, pr, rc, rr, pair_weights=weights, corrupted_chosen=(pc_bad, rc_bad))
    alone = DPOObjective(loss_type="mdpo")(pc[1:], pr[1:], rc[1:], rr[1:], corrupted_chosen=(pc_bad[1:], rc_bad[1:]))
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(alone.loss.item(), rel=1e-9)


def test_the_corruption_is_seeded_by_the_image_and_keeps_its_size():
    picture = Image.new("RGB", (64, 48), (200, 30, 30))
    for x in range(0, 64, 8):
        picture.paste((20, 200, 20), (x, 0, x + 4, 48))
    for kind in ("crop", "mask", "noise", "blank"):
        first, again = corrupt_image(picture, kind, 0, "a.jpg"), corrupt_image(picture, kind, 0, "a.jpg")
        assert first.size == picture.size and first.tobytes() == again.tobytes(), kind
        assert first.tobytes() != picture.tobytes(), kind
        if kind != "blank":
            others = {corrupt_image(picture, kind, seed, key).tobytes() for seed, key in ((1, "a.jpg"), (0, "b.jpg"))}
            assert first.tobytes() not in others, kind  # another seed or another image: another corruption
    with pytest.raises(ValueError, match="unknown image corruption 'blur'"):
        corrupt_image(picture, "blur", 0, "a.jpg")


def test_a_crop_keeps_at_most_a_fifth_of_the_image(monkeypatch):
    """mDPO's corruption: a random crop of 0-20% of the image's area, scaled back to its size."""
    shares = []
    original = Image.Image.crop

    def recording(self, box=None):
        shares.append((box[2] - box[0]) * (box[3] - box[1]) / (self.size[0] * self.size[1]))
        return original(self, box)

    monkeypatch.setattr(Image.Image, "crop", recording)
    picture = Image.new("RGB", (200, 100))
    for index in range(200):
        corrupt_image(picture, "crop", 3, f"{index}.jpg")
    assert len(shares) == 200 and min(shares) >= CROP_AREA[0] * 0.8 and max(shares) <= CROP_AREA[1] * 1.05
    assert max(shares) > 0.15 and min(shares) < 0.05  # the range is used, not one size


def test_the_collator_adds_each_images_corrupted_copy(tmp_path):
    from silkie.data.collator import PairCollator
    from silkie.data.images import open_image_store
    from silkie.models.qwen_vl import QWenVLImageProcessor

    for name, colour in (("a.png", (250, 0, 0)), ("b.png", (0, 0, 250))):
        Image.new("RGB", (56, 56), colour).save(tmp_path / name)
    rows = [
        {"prompt_id": p, "image": img, "prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4]}
        for p, img in (("p", "a.png"), ("q", None), ("r", "b.png"))
    ]
    processor = QWenVLImageProcessor(56)
    batch = PairCollator(open_image_store(tmp_path), processor, 0, corruption=("noise", 7))(rows)
    expected = processor([corrupt_image(Image.open(tmp_path / n), "noise", 7, n) for n in ("a.png", "b.png")])
    assert torch.equal(batch["corrupt_pixel_values"], expected)
    assert batch["corrupt_pixel_values"].shape == batch["pixel_values"].shape == (2, 3, 56, 56)
    plain = PairCollator(open_image_store(tmp_path), processor, 0)(rows)
    assert "corrupt_pixel_values" not in plain and torch.equal(plain["pixel_values"], batch["pixel_values"])


PLAIN = StepOptions(image_once=False, share_prompt=False, chunked_logps=False)
EFFICIENT = StepOptions(chunk_size=4)


@pytest.fixture(scope="module")
def lora_model():
    return tiny_lora_model()


@pytest.fixture(scope="module")
def batch():
    config = QWenConfig(**tiny_config_kwargs())
    batch = random_pair_batch(config, [(5, 7, 4), (9, 3, 6), (2, 5, 5)], [True, False, True], seed=1)
    gen = torch.Generator().manual_seed(9)
    batch["corrupt_pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=gen)
    return batch


def _mdpo_step(model, batch, options):
    def reference(view, features):
        with model.disable_adapter():
            from silkie.dpo.step import score_answers

            ref = score_answers(model, view, options, 0, features, no_grad=True)
        return ref.chosen_logps.detach(), ref.rejected_logps.detach()

    model.zero_grad()
    scores = score_batch(model, batch, options, DPOObjective(beta=0.1, loss_type="mdpo"), 0, reference)
    scores.out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores, grads


def test_the_efficient_step_scores_the_corrupted_view_as_the_plain_path(lora_model, batch):
    plain, plain_grads = _mdpo_step(lora_model, batch, PLAIN)
    fast, grads = _mdpo_step(lora_model, batch, EFFICIENT)
    for name in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(fast.corrupted.policy, name), getattr(plain.corrupted.policy, name),
                                   atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(fast.corrupted.ref_chosen, plain.corrupted.ref_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.out.loss, plain.out.loss, atol=1e-5, rtol=0)
    assert grads.keys() == plain_grads.keys() and len(grads) == 16
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    # the picture matters: the pairs with an image score differently under the corrupted one; the text-only pair not
    gain = (fast.policy.chosen_logps - fast.corrupted.policy.chosen_logps).detach()
    assert gain[0].abs() > 1e-4 and gain[2].abs() > 1e-4 and gain[1].abs() < 1e-6
    metrics = batch_metrics(fast)
    torch.testing.assert_close(metrics["logps/chosen_image_gain"], gain)
    assert metrics["rewards/imageless_accuracies"].shape == (3,)
    # the text-only pair (row 1) has no picture to take away: it is out of the imageless means
    for name in ("rewards/imageless_accuracies", "rewards/imageless_margins", "logps/chosen_image_gain"):
        assert metrics[f"weight:{name}"].tolist() == [1.0, 0.0, 1.0]


def test_the_corrupted_images_are_encoded_once_without_autograd(lora_model, batch):
    calls = []
    visual = lora_model.get_base_model().transformer.visual
    hook = visual.register_forward_hook(lambda module, args, out: calls.append(out.requires_grad))
    try:
        _mdpo_step(lora_model, batch, EFFICIENT)
    finally:
        hook.remove()
    assert calls == [False, False]  # the images, then their corrupted copies: once each, no graph


def test_a_batch_without_its_corrupted_images_is_refused(lora_model, batch):
    without = {k: v for k, v in batch.items() if k != "corrupt_pixel_values"}
    with pytest.raises(ValueError, match="no corrupt_pixel_values: its collator was not given an image corruption"):
        _mdpo_step(lora_model, without, EFFICIENT)


def test_random_is_not_used_unseeded():
    """The corruption must not depend on the global random state (a resume or another rank would differ)."""
    picture = Image.new("RGB", (32, 32), (10, 20, 30))
    random.seed(1)
    first = corrupt_image(picture, "mask", 0, "k").tobytes()
    random.seed(2)
    assert corrupt_image(picture, "mask", 0, "k").tobytes() == first
