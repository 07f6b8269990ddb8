"""`silkie chat` with several pictures and a video: the prompt the model sees (spans, order, token counts), the
answer equal to greedy generate() on the same inputs, and one-line errors for what a family cannot take."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from silkie.dev.clips import colour_clip
from silkie.tools.chat import GenerationOptions, chat_once
from silkie.tools.chat_inputs import build_prompt_ids, family_inputs, image_query, qwen_vl_inputs
from silkie.tools.cli import ToolError

from .hf_fixtures import BUILDERS


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    paths = {}
    for name, colour, size in (("red", "red", (60, 80)), ("blue", "blue", (90, 50))):
        paths[name] = root / f"{name}.png"
        Image.new("RGB", size, colour).save(paths[name])
    paths["clip"] = root / "clip.mkv"
    paths["clip"].write_bytes(colour_clip([(0, 200, 0)] * 4 + [(200, 0, 200)] * 4, size=(56, 56), fps=4))
    paths["broken"] = root / "broken.mp4"
    paths["broken"].write_bytes(b"not a video")
    return paths


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory):
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("qwen-vl") / "tiny-qwen-vl")


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    return BUILDERS["qwen2_vl"](tmp_path_factory.mktemp("qwen2-vl") / "tiny-qwen2-vl")


def test_qwen_vl_chat_numbers_the_pictures_as_the_original(qwen_vl, media):
    from silkie.tools.chat import load_chat_model
    from silkie.tools.chat_inputs import qwen_vl_tokenizer

    chat = load_chat_model(qwen_vl, device="cpu")
    tokenizer = qwen_vl_tokenizer(chat)
    pictures = [media["red"], media["blue"]]
    assert image_query(pictures, "Which is bluer?") == (
        f"Picture 1: <img>{media['red']}</img>\nPicture 2: <img>{media['blue']}</img>\nWhich is bluer?"
    )
    ids, images = qwen_vl_inputs(chat, tokenizer, pictures, "Which is bluer?", "You are a helpful assistant.", [])
    assert ids[0].tolist() == build_prompt_ids(tokenizer, pictures, "Which is bluer?")
    assert tokenizer.image_paths(ids[0].tolist()) == [str(media["red"]), str(media["blue"])]
    size = chat.config.visual["image_size"]
    pixels = images["pixel_values"]
    assert pixels.shape == (2, 3, size, size) and pixels[0, 0].mean() > pixels[1, 0].mean()  # red, then blue
    answers = chat_once(qwen_vl, pictures, "Which is bluer?", options=GenerationOptions(max_new_tokens=4), device="cpu")
    assert list(answers) == ["answer"]
    with pytest.raises(ToolError, match="Qwen-VL-Chat takes images, not video"):
        chat_once(qwen_vl, pictures, "Q", videos=[media["clip"]], device="cpu")


def test_qwen2_vl_chat_takes_two_pictures_and_a_video_in_marker_order(qwen2_vl, media):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl).eval()
    config = model.config
    question = "Is <image> the colour of the clip <video>, unlike <image>?"
    tokenizer, ids, tensors = family_inputs(
        qwen2_vl, None, config, [media["red"], media["blue"]], [media["clip"]], question
    )
    ids_list = ids[0].tolist()
    image_tokens = (tensors["image_grid_thw"].prod(-1) // 4).tolist()
    video_tokens = (tensors["video_grid_thw"].prod(-1) // 4).tolist()
    # 8 frames at 4 fps, sampled at 2 fps -> 4 frames = 2 temporal patches; 56x56 (the folder's bounds) -> 4x4
    assert tensors["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert ids_list.count(config.image_token_id) == sum(image_tokens)
    assert ids_list.count(config.video_token_id) == video_tokens[0] == 8
    first_image, video = ids_list.index(config.image_token_id), ids_list.index(config.video_token_id)
    last_image = len(ids_list) - 1 - ids_list[::-1].index(config.image_token_id)
    assert first_image < video < last_image  # image, video, image: the markers' order
    types = tensors["mm_token_type_ids"][0].tolist()
    assert types.count(1) == sum(image_tokens) and types.count(2) == video_tokens[0]
    answers = chat_once(
        qwen2_vl, [media["red"], media["blue"]], question, options=GenerationOptions(max_new_tokens=6),
        device="cpu", videos=[media["clip"]],
    )  # fmt: skip
    (answer,) = answers.values()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **tensors, max_new_tokens=6,
                             do_sample=False, eos_token_id=[tokenizer.eos_token_id])  # fmt: skip
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "You are a helpful assistant." in tokenizer.decode(ids[0])  # the template's default system turn
    _, told, _ = family_inputs(qwen2_vl, None, config, [media["red"]], [], "Which colour?", "Answer in one word.")
    text = tokenizer.decode(told[0])  # a system message as training rendered it (chat --system)
    assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in text and "helpful assistant" not in text


def test_chat_refuses_what_the_media_cannot_be(qwen2_vl, media, tmp_path):
    from silkie.tools.chat_cli import main

    with pytest.raises(ToolError, match="cannot load video .*broken.mp4.*corrupt video"):
        chat_once(qwen2_vl, [media["red"]], "Q", videos=[media["broken"]], device="cpu")
    with pytest.raises(ToolError, match="image_marker_mismatch|marker"):
        chat_once(qwen2_vl, [media["red"]], "<image> and <image>?", device="cpu")
    llava = BUILDERS["llava"](tmp_path / "tiny-llava")
    with pytest.raises(ToolError, match="llava.*video"):
        chat_once(llava, [media["red"]], "Q", videos=[media["clip"]], device="cpu")
    argv = ["--model", str(qwen2_vl), "--image", str(media["red"]), "--image", str(media["blue"]), "--video"]
    assert main([*argv, str(media["clip"]), "--question", "Q", "--max-new-tokens", "2", "--device", "cpu"]) == 0


def test_qwen_vl_chat_places_pictures_at_markers_as_training_does(media):
    question = "Compare <image>\nwith <image>: which is bluer?"
    assert image_query([media["red"], media["blue"]], question) == (
        f"Compare Picture 1: <img>{media['red']}</img>\nwith Picture 2: <img>{media['blue']}</img>\n: which is bluer?"
    )
    with pytest.raises(ToolError, match="qwen_vl: the prompt has 2 <image> marker"):
        image_query([media["red"]], question)


def test_chat_processes_media_as_the_adapter_s_run_did(qwen2_vl, media, tmp_path):
    """An adapter beside its run's config.yaml: that run's video frames and pixel bounds, not the defaults."""
    from transformers import AutoConfig

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"model: {{path: {qwen2_vl}, family: qwen2_vl, video_min_pixels: 784, video_max_pixels: 784}}\n"
        "data: {source: preference, path: pairs.jsonl, video_min_frames: 2, video_max_frames: 2}\n"
    )
    config = AutoConfig.from_pretrained(qwen2_vl)
    _, ids, tensors = family_inputs(qwen2_vl, run / "adapter", config, [], [media["clip"]], "Q")
    assert tensors["video_grid_thw"].tolist() == [[1, 2, 2]]  # 2 frames, 28x28
    assert ids[0].tolist().count(config.video_token_id) == 1
    _, _, defaults = family_inputs(qwen2_vl, None, config, [], [media["clip"]], "Q")
    assert defaults["video_grid_thw"].tolist() == [[2, 4, 4]]


def test_a_video_alone_is_enough_to_chat(qwen2_vl, media):
    """No picture: no (empty) image tensors reach generate(), which would encode them and fail."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl).eval()
    config = model.config
    tokenizer, ids, tensors = family_inputs(qwen2_vl, None, config, [], [media["clip"]], "What moves?")
    assert set(tensors) == {"pixel_values_videos", "video_grid_thw", "mm_token_type_ids"}
    assert ids[0].tolist().count(config.video_token_id) == 8 and config.image_token_id not in ids[0].tolist()
    answers = chat_once(
        qwen2_vl, [], "What moves?", videos=[media["clip"]], options=GenerationOptions(max_new_tokens=3), device="cpu"
    )
    (answer,) = answers.values()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **tensors, max_new_tokens=3,
                             do_sample=False, eos_token_id=[tokenizer.eos_token_id])  # fmt: skip
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_gemma4_chat_takes_a_picture_and_a_video(media, tmp_path):
    """Gemma 4: the picture and the clip's frames (`mm:ss` before each) reach `generate`, whose greedy answer is the
    chat's; 8 frames at 4 fps sampled at 2 fps -> 4 frames of 56x56 px, 64 soft tokens each."""
    from transformers import AutoModelForImageTextToText

    folder = BUILDERS["gemma4"](tmp_path / "tiny-gemma4")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    config = model.config
    question = "Is <image> the colour of <video>?"
    tokenizer, ids, tensors = family_inputs(folder, None, config, [media["red"]], [media["clip"]], question)
    assert tensors["num_frames_per_video"].tolist() == [4] and tensors["pixel_values_videos"].shape[0] == 4
    assert ids[0].tolist().count(config.video_token_id) == 4 * 64
    assert "00:00 <|image>" in tokenizer.decode(ids[0]) and " 00:01 <|image>" in tokenizer.decode(ids[0])
    options = GenerationOptions(max_new_tokens=4)
    answers = chat_once(folder, [media["red"]], question, videos=[media["clip"]], options=options, device="cpu")
    (answer,) = answers.values()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **tensors, max_new_tokens=4,
                             do_sample=False, eos_token_id=stops)  # fmt: skip
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
