"""InternVL: prompts and pixels exactly as `InternVLProcessor` makes them, the recipe's tile bound, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from silkie.config import ModelSection
from silkie.data.collator import PairCollator
from silkie.errors import RecipeError
from silkie.models.family import get_family
from silkie.models.loading import load_tokenizer

from .hf_fixtures import BUILDERS, pair_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return BUILDERS["internvl"](tmp_path_factory.mktemp("internvl") / "tiny-internvl")


def test_prompt_ids_and_tiles_equal_the_processor_s(folder):
    """Two images of different shapes at their markers, a system message: the collator's expanded ids and the
    batch's tiles are what `InternVLProcessor` gives for the chat template's text (TRL's path)."""
    section = ModelSection(path=str(folder), family="internvl", dtype="fp32")
    codec = load_tokenizer(section)
    images = get_family("internvl").image_processor(AutoConfig.from_pretrained(folder), section)
    pictures = [pair_image(1, (112, 56)), pair_image(2, (300, 300))]
    ids = codec.prompt_ids("Compare <image> with <image>.", ["a", "b"], system="Be brief.")
    processed = images(pictures)
    (expanded,) = PairCollator._expanded([ids], processed, [2], [0])
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                     {"type": "text", "text": " with "}, {"type": "image"},
                                     {"type": "text", "text": "."}]},
    ]  # fmt: skip
    text = codec.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = codec.processor(images=pictures, text=[text], return_tensors="pt")
    assert expanded == reference["input_ids"][0].tolist()
    assert torch.equal(processed.tensors["pixel_values"], reference["pixel_values"])
    assert processed.tensors["image_tiles"].tolist() == [3, 5]  # 2x1 + thumbnail, 2x2 + thumbnail
    context = codec.image_marker_id
    assert expanded.count(context) == (3 + 5) * 16 and expanded.count(context - 2) == 2  # 16 per tile; two <img>


def test_a_processor_whose_tile_tokens_differ_from_the_model_s_is_refused(folder):
    from silkie.errors import InputError

    config = AutoConfig.from_pretrained(folder)
    config.downsample_ratio = 0.25  # the tower would give 4 tokens per tile, the processor writes 16
    section = ModelSection(path=str(folder), family="internvl", dtype="fp32")
    with pytest.raises(InputError, match="processor writes 16 tokens per tile .* the model makes 4 per 112 px tile"):
        get_family("internvl").image_processor(config, section)


def test_image_delimiters_written_in_a_prompt_drop_the_pair(folder):
    """`<img>` / `</img>` are the processor's special ids around an image's features: as text they would open a span
    with no features, so such a pair is dropped like one writing the image token itself."""
    from silkie.data.formatting import encode_pair

    codec = load_tokenizer(ModelSection(path=str(folder), family="internvl", dtype="fp32"))
    assert encode_pair("Look <img>here</img>", ["a"], "A.", "B.", codec) == (None, "image_tag_in_text")
    assert encode_pair("Look here", ["a"], "A.", "B.", codec)[1] is None


def test_an_original_internvl_folder_is_refused_with_the_conversion_to_run(tmp_path):
    import json

    from silkie.config.checkpoint import checkpoint_problem

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    problem = checkpoint_problem(tmp_path, "internvl")
    assert "'internvl_chat'" in problem and "convert_internvl_weights_to_hf.py" in problem


def test_max_tiles_bounds_each_image_and_the_token_budget(folder):
    section = ModelSection(path=str(folder), family="internvl", dtype="fp32", max_tiles=1)
    codec = load_tokenizer(section)
    assert codec.image_token_budget == 1 * 16 + 2
    images = get_family("internvl").image_processor(AutoConfig.from_pretrained(folder), section)
    processed = images([pair_image(1, (112, 56)), pair_image(2, (300, 300))])
    assert processed.tensors["image_tiles"].tolist() == [1, 1]  # one tile, no thumbnail
    assert [len(span) for span in processed.tokens_per_image] == [18, 18]
    default = get_family("internvl").image_processor(
        AutoConfig.from_pretrained(folder), ModelSection(path=str(folder), family="internvl", dtype="fp32")
    )
    assert default([pair_image(2, (300, 300))]).tensors["image_tiles"].tolist() == [5]  # the checkpoint's 4 + 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"family": "qwen2_vl", "max_tiles": 2}, "model.max_tiles.*only internvl"),
        ({"family": "internvl", "max_tiles": 0}, "model.max_tiles.*null or >= 1"),
        ({"family": "internvl", "max_pixels": 50176}, "model.max_pixels.*only qwen2_vl"),
    ],
)
def test_image_bounds_of_another_family_are_refused(fields, message):
    with pytest.raises(RecipeError, match=message):
        ModelSection(path="m", **fields).check()


def test_an_image_budget_over_max_length_names_the_tile_bound(folder, tmp_path):
    from silkie.config import load_recipe
    from silkie.train import run_training

    from .conftest import REPO_ROOT

    overrides = [f"model.path={folder}", "model.max_tiles=200", "data.path=none.jsonl", "training.report_to=none"]
    recipe = load_recipe(REPO_ROOT / "dpo_config" / "demo_internvl.yaml", overrides)
    with pytest.raises(ValueError, match=r"model.max_tiles: one image may take 3218 tokens.*dpo.max_length = 512"):
        run_training(recipe, tmp_path / "run")


def test_chat_inputs_hand_generate_only_the_model_s_tensors(folder, tmp_path):
    """The tile counts are the DPO step's; `generate()` gets the pixels, and the prompt its `<img>` span."""
    from silkie.tools.chat import GenerationOptions, chat_once
    from silkie.tools.chat_inputs import family_inputs

    picture = tmp_path / "wide.png"
    pair_image(3, (112, 56)).save(picture)
    config = AutoConfig.from_pretrained(folder)
    _, ids, tensors = family_inputs(folder, None, config, [picture], [], "What is it?")
    assert set(tensors) == {"pixel_values"} and tensors["pixel_values"].shape == (3, 3, 112, 112)
    assert ids[0].tolist().count(config.image_token_id) == 48
    options = GenerationOptions(max_new_tokens=3)
    answers = chat_once(folder, [picture], "What is it?", options=options, device="cpu", write=lambda _: None)
    assert list(answers) == ["answer"] and answers["answer"]


@pytest.mark.parametrize("merged", [False, True], ids=["plain-vocabulary", "space-joins-F"])
def test_a_video_is_laid_out_as_the_processor_lays_it_out(merged, tmp_path):
    """Per frame `Frame{k}: <img>` + its context tokens + `</img>`, newline-joined (`replace_video_token`), in place
    of the template's `<video>`: the prompt's ids equal the whole text tokenized, also where the vocabulary joins the
    space before a mid-sentence marker with `Frame1`'s `F`."""
    from silkie.data.video import decode_video

    from .hf_fixtures import MEDIA_SAMPLING, MediaStore, join_space_and

    folder = BUILDERS["internvl"](tmp_path / "internvl")
    if merged:
        join_space_and(folder, "F")
    section = ModelSection(path=str(folder), family="internvl", dtype="fp32")
    codec = load_tokenizer(section)
    assert (len(codec.tokenizer(" F", add_special_tokens=False)["input_ids"]) == 1) == merged
    media = get_family("internvl").image_processor(AutoConfig.from_pretrained(folder), section)
    store = MediaStore()
    clip = decode_video("v3-0", store.read_bytes("v3-0"), MEDIA_SAMPLING)  # 4 frames
    prompt = "Is <image> in the clip <video>?"
    ids = codec.prompt_ids(prompt, ["m3-0"], ["v3-0"])
    processed = media([store.open("m3-0")], videos=[clip])
    (expanded,) = PairCollator._expanded([ids], processed, [1], [1])
    processor = codec.processor
    text = codec.prompt_text(prompt, ["m3-0"], ["v3-0"])
    frames = processor.replace_video_token({"pixel_values_videos": [processed.tensors["pixel_values_videos"]]}, 0)
    assert frames.startswith("Frame1: <img><IMG_CONTEXT>") and frames.count("\nFrame") == 3
    whole = text.replace(processor.image_token, processor.replace_image_token({"num_patches": [1]}, 0), 1)
    expected = codec.tokenizer(whole.replace(processor.video_token, frames), add_special_tokens=False)["input_ids"]
    assert expanded == expected
    joined = codec.tokenizer.convert_tokens_to_ids("\u0120F")
    assert (joined in expected) == merged  # the case arises


def test_images_and_frames_fill_the_context_tokens_in_prompt_order(tmp_path):
    """An image before a video: the plain step scores the pair as the model scores it with the image's tiles, then
    the video's frames (one `pixel_values`, prompt order); the other order scores differently (the test can fail)."""
    from transformers import AutoModelForImageTextToText

    from silkie.dpo.step import StepOptions, score_answers

    from .hf_fixtures import media_batch, media_pairs

    folder = BUILDERS["internvl"](tmp_path / "internvl")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch, pad = media_batch(folder, "internvl", model)
    row = [p[0] for p in media_pairs("internvl")].index("Is <image> in the clip <video>?")
    with torch.no_grad():
        scored = score_answers(model, batch, StepOptions(image_once=False, share_prompt=False), pad, no_grad=True)
    image, video = int(batch["image_counts"][:row].sum()), int(batch["video_counts"][:row].sum())  # its first ones
    tiles = torch.split(batch["pixel_values"], batch["image_tiles"].tolist())[image]
    frames = torch.split(batch["pixel_values_videos"], batch["video_frames"].tolist())[video]
    prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
    chosen = batch["chosen_input_ids"][row][batch["chosen_attention_mask"][row].bool()]

    def chosen_logps(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, chosen])[None], pixel_values=pixels).logits[0]
        return logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, chosen[:, None]).sum()

    in_order = chosen_logps(torch.cat([tiles, frames]))
    torch.testing.assert_close(scored.chosen_logps[row], in_order, rtol=1e-5, atol=1e-5)
    assert (chosen_logps(torch.cat([frames, tiles])) - in_order).abs() > 1e-4


def test_frames_are_each_segment_s_middle_as_internvl_samples_them():
    from silkie.data.video import VideoSampling, sample_indices

    def middle(count: int) -> VideoSampling:
        return VideoSampling(fps=1.0, min_frames=count, max_frames=count, frame_multiple=1, spread="middle")

    # InternVL's get_index over frames 0..total-1: seg = (total - 1) / n, int(seg / 2 + round(seg * i))
    assert sample_indices(16, 4.0, middle(4)) == [1, 5, 9, 12]
    assert sample_indices(30, 1.0, middle(8)) == [1, 5, 8, 12, 15, 19, 23, 26]
    assert sample_indices(5, 1.0, middle(4)) == [0, 1, 2, 3]
    assert get_family("internvl").video_frame_spread == "middle"


@pytest.mark.parametrize(
    "before",
    ["<|im_start|>user\nIs the clip ", "<|im_start|>user\n", "<|im_start|> hello ", "Is the clip "],
    ids=["mid-sentence", "after-a-newline", "space-after-an-added-token", "input-start"],
)
def test_frame_texts_are_tokenized_in_place_by_a_sentencepiece_style_tokenizer(before, tmp_path):
    """InternVL2.5's Llama-style tokenizers mark only the input's start with `▁`: the frames' text (and the prompt
    text joined with `Frame1: `) must be tokenized where it stands, after an added token, not on its own."""
    from types import SimpleNamespace

    from silkie.dev.tiny_hf_vlm import train_tiny_tokenizer
    from silkie.models.hf_vlm.internvl_video import InternVLVideos

    specials = ("<pad>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    tokenizer = train_tiny_tokenizer(special_tokens=specials, style="llama")
    ids = tokenizer.convert_tokens_to_ids
    processor = SimpleNamespace(
        image_processor=SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3), tokenizer=tokenizer,
        video_token="<video>", start_image_token_id=ids("<img>"), end_image_token_id=ids("</img>"),
    )  # fmt: skip
    config = SimpleNamespace(image_token_id=ids("<IMG_CONTEXT>"), vision_config=SimpleNamespace(image_size=[112, 112]))
    videos = InternVLVideos(processor, config, SimpleNamespace(path=str(tmp_path)), per_frame=4)
    head = tokenizer(before, add_special_tokens=False)["input_ids"]
    replaced, joined = videos.layout(3).joined(head)
    frames = "\n".join(f"Frame{k + 1}: <img>{'<IMG_CONTEXT>' * 4}</img>" for k in range(3))  # replace_video_token
    expected = tokenizer(before + frames, add_special_tokens=False)["input_ids"]
    assert head[: len(head) - replaced] + joined == expected
    assert len(joined) - replaced <= videos.most_tokens(3)


def test_a_pair_s_generation_inputs_from_a_collated_batch_hold_its_media_in_prompt_order(tmp_path):
    """`prompt_generation_inputs` (evaluation samples) for one pair of a batch of several: that pair's image tiles,
    then its video's frames."""
    from transformers import AutoModelForImageTextToText

    from silkie.models.generation import prompt_generation_inputs

    from .hf_fixtures import media_batch, media_pairs

    folder = BUILDERS["internvl"](tmp_path / "internvl")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch, _ = media_batch(folder, "internvl", model)
    row = [p[0] for p in media_pairs("internvl")].index("Is <image> in the clip <video>?")
    image, video = int(batch["image_counts"][:row].sum()), int(batch["video_counts"][:row].sum())
    tiles = torch.split(batch["pixel_values"], batch["image_tiles"].tolist())[image]
    frames = torch.split(batch["pixel_values_videos"], batch["video_frames"].tolist())[video]
    inputs = prompt_generation_inputs(model, batch, row)
    assert torch.equal(inputs["pixel_values"], torch.cat([tiles, frames]))
    videos_only = [p[0] for p in media_pairs("internvl")].index("Go?")  # a 16-frame clip alone
    clip = torch.split(batch["pixel_values_videos"], batch["video_frames"].tolist())[-1]
    assert torch.equal(prompt_generation_inputs(model, batch, videos_only)["pixel_values"], clip)


def test_chat_hands_generate_the_image_tiles_and_video_frames_in_prompt_order(folder, tmp_path):
    from transformers import AutoTokenizer

    from silkie.dev.clips import noise_clip
    from silkie.tools.chat import GenerationOptions, chat_once
    from silkie.tools.chat_inputs import family_inputs

    picture, clip = tmp_path / "wide.png", tmp_path / "clip.mkv"
    pair_image(3, (112, 56)).save(picture)
    clip.write_bytes(noise_clip(8, (56, 56), fps=4, seed=1))  # 2 s at 4 fps: 4 frames at the default 2 fps
    config = AutoConfig.from_pretrained(folder)
    _, ids, tensors = family_inputs(folder, None, config, [picture], [clip], "Is <video> like <image>?")
    assert set(tensors) == {"pixel_values"} and tensors["pixel_values"].shape == (4 + 3, 3, 112, 112)
    assert ids[0].tolist().count(config.image_token_id) == (4 + 3) * 16
    first = ids[0].tolist().index(config.image_token_id - 2)  # the first <img>: the video's first frame
    assert AutoTokenizer.from_pretrained(folder).decode(ids[0].tolist()[:first]).endswith("Is Frame1: ")
    answers = chat_once(folder, [picture], "Is <video> like <image>?", videos=[clip], device="cpu",
                        options=GenerationOptions(max_new_tokens=2), write=lambda _: None)  # fmt: skip
    assert list(answers) == ["answer"]
