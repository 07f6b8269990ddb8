"""Transformers-native families (Qwen2-VL, LLaVA): the efficient DPO step equals the plain path."""

from __future__ import annotations

import pytest
import torch

from silkie.dpo.step import StepOptions, score_answers

from .hf_fixtures import BUILDERS, OPTION_SETS, PLAIN, assert_same_step, family_batch, lora_model, run_step


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def setup(request, tmp_path_factory):
    family = request.param
    folder = BUILDERS[family](tmp_path_factory.mktemp(family))
    model = lora_model(folder, family)
    batch, pad = family_batch(folder, family, model)
    return family, model, batch, pad


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_optimised_paths_equal_plain(setup, name):
    family, model, batch, pad = setup
    plain = run_step(model, batch, PLAIN, pad)
    fast = run_step(model, batch, OPTION_SETS[name], pad)
    assert_same_step(fast, plain, family)


def test_batch_expands_each_image_to_its_feature_tokens(setup):
    family, model, batch, pad = setup
    marker = model.config.image_token_id
    counts = (batch["prompt_input_ids"] == marker).sum(dim=1).tolist()
    if family.startswith("qwen"):  # 64x80 -> 56x84 px -> grid 4x6 -> 6 tokens; sizes differ, so do the counts
        per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
        # Qwen3-VL: 16 px patches, 32 px per token: 64x80 -> 64x64 px -> grid 4x4 -> 4 tokens
        sixteen_px = family.startswith(("qwen3_vl", "qwen3_5"))
        assert batch["image_grid_thw"].tolist()[0] == ([1, 4, 4] if sixteen_px else [1, 6, 4])
        assert len(set(per_image)) > 1
    elif family == "internvl":  # 112 px tiles of 16 tokens: 64x80 -> 1 tile; 112x56 -> 2 + a thumbnail; 90x90 -> 1
        assert batch["image_tiles"].tolist() == [1, 3, 1] and batch["pixel_values"].size(0) == 5
        per_image = [16, 48, 16]
        starts = batch["prompt_input_ids"] == model.config.image_token_id - 2  # <img>, </img> around each image
        assert starts.sum(dim=1).tolist() == [1, 1, 0, 1]
    elif family == "gemma4":  # sized to fill 630 patches of 8 px at 24 px multiples, pooled 3x3: 64x80 -> 168x216 px
        per_image = [63, 55, 64]  # -> 21x27 patches -> 63 tokens; 112x56 -> 264x120 -> 55; 90x90 -> 192x192 -> 64
        assert batch["pixel_values"].shape == (3, 630, 192)
        assert (batch["image_position_ids"][..., 0] >= 0).sum(dim=1).tolist() == [9 * n for n in per_image]
        starts = batch["prompt_input_ids"] == model.config.boi_token_id  # <|image> ... <image|> around each image
        assert starts.sum(dim=1).tolist() == (batch["prompt_input_ids"] == model.config.eoi_token_id).sum(1).tolist()
        assert starts.sum(dim=1).tolist() == [1, 1, 0, 1]
    else:
        per_image = [16] * int(batch["pixel_values"].size(0))
    assert batch["image_counts"].tolist() == [1, 1, 0, 1]
    assert counts == [per_image[0], per_image[1], 0, per_image[2]]


def test_packed_rows_need_mrope_positions(setup, monkeypatch):
    """Under prompt sharing, 1-D positions would give Qwen2-VL different (wrong) answers: the test can fail."""
    family, model, batch, pad = setup
    if not family.startswith("qwen"):
        pytest.skip("1-D positions are right for LLaVA")
    from silkie.models.hf_vlm.family import Qwen2VLFamily

    with torch.no_grad():
        right = score_answers(model, batch, StepOptions(), pad, no_grad=True)
        monkeypatch.setattr(Qwen2VLFamily, "prompt_positions", lambda self, base, batch: None)
        wrong = score_answers(model, batch, StepOptions(), pad, no_grad=True)
    assert (right.chosen_logps - wrong.chosen_logps).abs().max() > 1e-2


def test_images_change_the_answer_scores(setup):
    family, model, batch, pad = setup
    other = dict(batch)
    other["pixel_values"] = torch.randn_like(batch["pixel_values"])
    with torch.no_grad():
        a = score_answers(model, batch, StepOptions(), pad, no_grad=True)
        b = score_answers(model, other, StepOptions(), pad, no_grad=True)
    with_image = batch["image_counts"] > 0
    assert (a.chosen_logps - b.chosen_logps)[with_image].abs().min() > 1e-4
    torch.testing.assert_close(a.chosen_logps[~with_image], b.chosen_logps[~with_image])


def test_features_computed_once_carry_the_deepstack_features(setup, monkeypatch):
    """Qwen3-VL adds features of inner tower blocks in its first decoder layers: features computed once per step
    must carry them back (the plain path computes them from the pixels); without them the scores differ."""
    family, model, batch, pad = setup
    if not family.startswith("qwen3_vl"):
        pytest.skip("DeepStack is Qwen3-VL's")
    from silkie.dpo.step import encode_images_once

    once = StepOptions(image_once=True, share_prompt=False, chunked_logps=False)
    with torch.no_grad():
        plain = score_answers(model, batch, PLAIN, pad, no_grad=True)
        features = encode_images_once(model, batch)
        assert len(features["image"]) == 3 and len(features["image"][0][1]) == 2  # 3 images, 2 DeepStack layers
        right = score_answers(model, batch, once, pad, image_features=features, no_grad=True)
        flat = [(merged, tuple(torch.zeros_like(part) for part in deep)) for merged, deep in features["image"]]
        wrong = score_answers(model, batch, once, pad, image_features={"image": flat, "video": None}, no_grad=True)
    torch.testing.assert_close(right.chosen_logps, plain.chosen_logps, atol=1e-5, rtol=0)
    with_image = batch["image_counts"] > 0
    assert (wrong.chosen_logps - plain.chosen_logps)[with_image].abs().min() > 1e-3
