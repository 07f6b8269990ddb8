"""Several images per pair and video on every family: the collated spans, and the efficient DPO step (images and
videos encoded once, shared prompt, chunked log-probs) equal to the plain path within 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

from silkie.config.names import VIDEO_FAMILIES
from silkie.dpo.batching import packed_rows
from silkie.dpo.objective import corrupted_view
from silkie.dpo.step import StepOptions, score_answers
from silkie.models.family import unwrap_causal_lm

from .conftest import tiny_config_kwargs
from .dpo_fixtures import random_pair_batch, step, tiny_lora_model
from .hf_fixtures import (
    BUILDERS,
    OPTION_SETS,
    PLAIN,
    grad_atol,
    join_space_and,
    lora_model,
    media_batch,
    media_pairs,
    run_step,
)  # fmt: skip


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def setup(request, tmp_path_factory):
    family = request.param
    folder = BUILDERS[family](tmp_path_factory.mktemp(family))
    model = lora_model(folder, family)
    batch, pad = media_batch(folder, family, model, corruption=("crop", 0))
    return family, model, batch, pad


def _assert_equal(plain, fast, family: str = ""):
    for scores in (0, 1):  # policy, reference; summed fp32 log-probs reach ~-95 here, where one float step is 7.6e-6
        for kind in ("chosen_logps", "rejected_logps"):  # (rtol: a few steps of summation order, no more)
            torch.testing.assert_close(getattr(fast[scores], kind), getattr(plain[scores], kind), atol=1e-5, rtol=5e-7)
    torch.testing.assert_close(fast[2], plain[2], atol=1e-5, rtol=0)
    assert plain[3] and set(fast[3]) == set(plain[3])
    for param in plain[3]:
        torch.testing.assert_close(fast[3][param], plain[3][param], atol=grad_atol(family), rtol=1e-4)
    assert (plain[0].chosen_logps - plain[1].chosen_logps).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_several_images_and_videos_score_as_the_plain_path(setup, name):
    family, model, batch, pad = setup
    _assert_equal(run_step(model, batch, PLAIN, pad), run_step(model, batch, OPTION_SETS[name], pad), family)


def test_every_image_and_video_fills_its_own_span(setup):
    family, model, batch, pad = setup
    pairs = media_pairs(family)
    assert batch["image_counts"].tolist() == [len(p[3]) for p in pairs]
    assert batch["video_counts"].tolist() == [len(p[4]) for p in pairs]
    config = model.config
    image_tokens = (batch["prompt_input_ids"] == config.image_token_id).sum(1)
    if family in ("llava", "gemma3"):
        assert image_tokens.tolist() == [16 * len(p[3]) for p in pairs]
        if family == "gemma3":  # "\n\n<start_of_image>" + 16 tokens + "<end_of_image>\n\n" per image
            for token in (config.boi_token_id, config.eoi_token_id):
                assert (batch["prompt_input_ids"] == token).sum(1).tolist() == [len(p[3]) for p in pairs]
        return
    if family == "gemma4":  # 64x80 -> 63 tokens, 112x56 -> 55, the square ones 64 (test_hf_vlm_step); 56x56 frames:
        # 64 tokens each (at the video budget of 70: 192x192 px)
        assert image_tokens.tolist() == [63 + 55, 3 * 64, 0, 64, 0, 0]
        video_tokens = (batch["prompt_input_ids"] == config.video_token_id).sum(1)
        assert batch["num_frames_per_video"].tolist() == [8, 4, 16]
        assert video_tokens.tolist() == [0, 0, 8 * 64, 4 * 64, 16 * 64, 0]
        for token in (config.boi_token_id, config.eoi_token_id):  # "<|image>" ... "<image|>" per image and frame
            assert (batch["prompt_input_ids"] == token).sum(1).tolist() == [2, 3, 8, 1 + 4, 16, 0]
        assert batch["corrupt_pixel_values_videos"].shape == batch["pixel_values_videos"].shape == (28, 630, 192)
        return
    if family == "internvl":  # 16 context tokens per 112 px tile (a thumbnail where an image takes several) and frame
        assert batch["image_tiles"].tolist() == [1, 3, 1, 1, 1, 1] and batch["video_frames"].tolist() == [8, 4, 16]
        assert image_tokens.tolist() == [16 * n for n in (1 + 3, 3, 8, 1 + 4, 16, 0)]
        starts = (batch["prompt_input_ids"] == config.image_token_id - 2).sum(1)  # one <img> per image and frame
        assert starts.tolist() == [2, 3, 8, 1 + 4, 16, 0]
        assert batch["media_kinds"].tolist()[3] == [0, 1, -1]  # `Is <image> in the clip <video>?`: image, video
        assert batch["corrupt_pixel_values_videos"].shape == batch["pixel_values_videos"].shape == (28, 3, 112, 112)
        assert not torch.equal(batch["corrupt_pixel_values_videos"], batch["pixel_values_videos"])
        return
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    starts = torch.cumsum(torch.tensor([0] + [len(p[3]) for p in pairs]), 0).tolist()
    assert image_tokens.tolist() == [sum(per_image[a:b]) for a, b in zip(starts, starts[1:])]
    if family not in VIDEO_FAMILIES:
        assert "pixel_values_videos" not in batch and len(pairs) == 3  # the video pairs were left out
        return
    # 56x56 frames -> 4x4 patches -> 4 tokens per temporal patch of 2 frames
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4], [2, 4, 4], [8, 4, 4]]
    video_tokens = (batch["prompt_input_ids"] == config.video_token_id).sum(1)
    assert video_tokens.tolist() == [0, 0, 16, 8, 32, 0]
    assert batch["corrupt_pixel_values_videos"].shape == batch["pixel_values_videos"].shape
    assert not torch.equal(batch["corrupt_pixel_values_videos"], batch["pixel_values_videos"])


def test_the_marker_places_the_image_in_the_prompt(setup):
    """`Is <image> in the clip <video>?`: the image's span comes before the video's, the text between them."""
    family, model, batch, pad = setup
    if family not in VIDEO_FAMILIES:
        pytest.skip("no video (and llava-hf's template renders images first)")
    row = [p[0] for p in media_pairs(family)].index("Is <image> in the clip <video>?")
    ids = batch["prompt_input_ids"][row].tolist()
    config = model.config
    if family == "internvl":  # the image's <img>..</img>, then " in the clip Frame1: " and the frames' spans
        start, end = config.image_token_id - 2, config.image_token_id - 1
        starts, ends = [i for i, t in enumerate(ids) if t == start], [i for i, t in enumerate(ids) if t == end]
        assert len(starts) == 1 + 4 and starts[1] - ends[0] > 3 and batch["media_kinds"][row].tolist() == [0, 1, -1]
        return
    image_at, video_at = ids.index(config.image_token_id), ids.index(config.video_token_id)
    assert image_at < video_at and video_at - (image_at + ids.count(config.image_token_id)) > 3


def test_videos_and_their_corruption_change_the_scores(setup):
    family, model, batch, pad = setup
    if family == "llava":
        pytest.skip("no video")
    with torch.no_grad():
        plain = score_answers(model, batch, StepOptions(), pad, no_grad=True)
        corrupt = score_answers(model, corrupted_view(batch), StepOptions(), pad, no_grad=True)
    with_media = (batch["image_counts"] + batch["video_counts"]) > 0
    assert (plain.chosen_logps - corrupt.chosen_logps)[with_media].abs().min() > 1e-4
    torch.testing.assert_close(plain.chosen_logps[~with_media], corrupt.chosen_logps[~with_media])


def test_answers_continue_after_the_prompt_not_after_a_video_s_last_frame(setup):
    """Qwen2.5-VL spaces a video's temporal positions by its frame times: a 16-frame clip's positions run past the
    short text after it. The answer continues from the prompt's last position (as in its own row), not its largest."""
    family, model, batch, pad = setup
    if family != "qwen2_5_vl":
        pytest.skip("temporal spacing is Qwen2.5-VL's")
    base, fam = unwrap_causal_lm(model)
    row = [p[0] for p in media_pairs(family)].index("Go?")
    positions = fam.prompt_positions(base, batch)
    length = int(batch["prompt_attention_mask"][row].sum())
    assert positions[:, row, :length].max() > positions[:, row, length - 1].max()  # the case arises
    rows = packed_rows(batch, pad, positions)
    assert int(rows.position_ids[0, row, length]) == int(positions[0, row, length - 1]) + 1


@pytest.mark.parametrize("images", [[2, 0, 3], [1, 2, 1]])
def test_qwen_vl_several_pictures_score_as_the_plain_path(images):
    """Qwen-VL-Chat's `<img>` spans, several per prompt, through the efficient step (rows as `random_pair_batch`)."""
    from silkie.models.qwen_vl import QWenConfig

    model = tiny_lora_model()
    batch = random_pair_batch(QWenConfig(**tiny_config_kwargs()), [(5, 7, 4), (9, 3, 6), (2, 5, 5)], images, seed=3)
    assert batch["pixel_values"].size(0) == sum(images)

    plain = step(model, batch, StepOptions(image_once=False, share_prompt=False, chunked_logps=False))
    _assert_equal(plain, step(model, batch, StepOptions(chunk_size=4)))
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))  # the pictures swapped between spans
    with torch.no_grad():
        swapped = score_answers(model, other, StepOptions(), 0, no_grad=True)
    assert (swapped.chosen_logps - plain[0].chosen_logps).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("prompt", "merged"),
    [("What happens in the clip?", False), ("Is <image> in the clip <video>?", False),
     ("Is <image> in the clip <video>?", True)],
    ids=["video-first", "marker-after-a-space", "marker-after-a-space-joined"],
)  # fmt: skip
def test_qwen3_vl_videos_are_laid_out_as_its_processor_lays_them_out(prompt, merged, tmp_path):
    """Qwen3-VL: per temporal patch `<t seconds>` and a vision span of its own, where the template wrote one span;
    the prompt's ids equal the whole text tokenized as `Qwen3VLProcessor` writes it (images expanded, each video
    by `replace_video_token`), also where the tokenizer joins the space before a mid-sentence marker with the
    first timestamp's `<`."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    from silkie.models.loading import load_base_model, load_tokenizer

    from .hf_fixtures import MEDIA_PAIRS, model_section

    folder = BUILDERS["qwen3_vl"](tmp_path / "qwen3")
    if merged:
        join_space_and(folder, "<")  # Qwen's merge of a space and `<` (` <`), as its real vocabulary has
    model = load_base_model(model_section(folder, "qwen3_vl"))
    batch, pad = media_batch(folder, "qwen3_vl", model)
    codec = load_tokenizer(model_section(folder, "qwen3_vl"))
    assert (codec.tokenizer(" <", add_special_tokens=False)["input_ids"].__len__() == 1) == merged
    pairs = media_pairs("qwen3_vl")
    row = [p[0] for p in pairs].index(prompt)
    i = MEDIA_PAIRS.index(pairs[row])
    sizes, clips = pairs[row][3], pairs[row][4]
    template = codec.prompt_text(prompt, [f"m{i}-{k}" for k in range(len(sizes))], [f"v{i}-0"])
    image = int(batch["image_counts"][:row].sum())  # this pair's first image and video among the batch's
    video = int(batch["video_counts"][:row].sum())
    for k in range(len(sizes)):
        tokens = int(batch["image_grid_thw"][image + k].prod()) // 4
        template = template.replace("<|image_pad|>", "<|placeholder|>" * tokens, 1)
    template = template.replace("<|placeholder|>", "<|image_pad|>")
    wrapper = "<|vision_start|><|video_pad|><|vision_end|>"
    assert template.count(wrapper) == 1
    template = template.replace(wrapper, "<|video_pad|>")  # as Qwen3VLProcessor.get_text_with_replacements
    fake = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2), video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
        _calculate_timestamps=lambda *args: Qwen3VLProcessor._calculate_timestamps(None, *args),
    )  # fmt: skip
    metadata = SimpleNamespace(fps=4.0, frames_indices=list(range(clips[0])))  # every frame of the 4 fps clip
    grids = batch["video_grid_thw"][video : video + 1]
    frames = Qwen3VLProcessor.replace_video_token(fake, {"video_grid_thw": grids, "video_metadata": [metadata]}, 0)
    assert frames.startswith("<0.1 seconds><|vision_start|><|video_pad|>")
    expected = codec.tokenizer(template.replace("<|video_pad|>", frames), add_special_tokens=False)["input_ids"]
    ids = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
    assert ids.tolist() == expected
    assert (codec.tokenizer.convert_tokens_to_ids("\u0120<") in expected) == merged  # the case joined
