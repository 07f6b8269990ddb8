"""Tiny random Qwen2-VL / Qwen3-VL / LLaVA-1.5 / InternVL folders: they load with the Auto classes offline and run a
forward pass."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available

from silkie.dev.tiny_hf_vlm import (
    LLAVA_IMAGE_SIZE,
    PATCH_SIZE,
    QWEN2_VL_SPECIAL_TOKENS,
    build_tiny_llava,
    build_tiny_qwen2_vl,
    register_image_only_processors,
)
from silkie.dev.tiny_internvl import INTERNVL_ADDED_TOKENS, INTERNVL_TILE, build_tiny_internvl
from silkie.dev.tiny_qwen3_vl import QWEN3_ADDED_TOKENS, build_tiny_qwen3_vl
from tests.script_fixtures import load_script

FAMILIES = ("qwen2_vl", "qwen3_vl", "llava", "internvl")
BUILDERS = {
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "llava": build_tiny_llava,
    "internvl": build_tiny_internvl,
}
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}
PROMPT = "Describe the image."
ANSWER = "There are two red circles in the picture."


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory) -> Path:
    """One tiny folder per family, shared by this module's tests."""
    return BUILDERS[family](tmp_path_factory.mktemp(family), seed=0)


@pytest.fixture(scope="module")
def loaded(folder):
    """(processor, model) as the Auto classes load them from the folder."""
    register_image_only_processors()  # without torchvision, transformers cannot load Qwen2VLProcessor itself
    return AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder)


def picture() -> Image.Image:
    """A 80x64 (width x height) random RGB picture."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))


def conversation() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_folder_is_small_and_fp32(family, folder, loaded):
    processor, model = loaded
    assert (folder / "model.safetensors").is_file()
    assert sum(path.stat().st_size for path in folder.iterdir()) < 5 * 2**20
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert type(model).__name__ == MODEL_CLASSES[family]
    if not is_torchvision_available():
        assert type(processor.image_processor).__name__.endswith("Pil")


def test_chat_template_is_the_official_layout(family, loaded):
    processor, _ = loaded
    text = processor.apply_chat_template(conversation(), tokenize=False)
    expected = {
        "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>\n",
        "qwen3_vl": "<|im_start|>user\n"  # Qwen3-VL-Instruct writes no default system turn
        f"<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>\n",
        "llava": f"USER: <image>\n{PROMPT} ASSISTANT: {ANSWER}</s>",
        "internvl": f"<|im_start|>user\n<IMG_CONTEXT>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>\n",
    }[family]
    assert text == expected
    prompt = processor.apply_chat_template(conversation()[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)


def test_image_tokens_and_forward(family, loaded):
    processor, model = loaded
    text = processor.apply_chat_template(conversation(), tokenize=False)
    inputs = processor(text=[text], images=[picture()], return_tensors="pt")
    input_ids = inputs["input_ids"]
    placeholders = int((input_ids == model.config.image_token_id).sum())
    if family == "qwen2_vl":
        assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]  # 64x80 -> 56x84 pixels -> 4x6 patches
        assert placeholders == int(inputs["image_grid_thw"].prod()) // 4
    elif family == "qwen3_vl":
        assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64x80 -> 64x64 pixels -> 4x4 patches of 16 px
        assert placeholders == 4 and inputs["pixel_values"].shape[-1] == 3 * 2 * 16 * 16
    elif family == "internvl":  # 80x64 -> one 112 px tile (the closest aspect ratio, 1:1): 8x8 patches -> 16 tokens
        assert tuple(inputs["pixel_values"].shape) == (1, 3, INTERNVL_TILE, INTERNVL_TILE)
        assert placeholders == 16 and int((input_ids == processor.start_image_token_id).sum()) == 1
    else:
        assert tuple(inputs["pixel_values"].shape) == (1, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE)
        assert placeholders == (LLAVA_IMAGE_SIZE // PATCH_SIZE) ** 2
    with torch.no_grad():
        output = model(**inputs, labels=input_ids)
    assert torch.isfinite(output.loss)
    assert tuple(output.logits.shape) == (1, input_ids.shape[1], model.config.text_config.vocab_size)


def test_tokenizer_round_trip(loaded):
    tokenizer = loaded[0].tokenizer
    for sentence in (ANSWER, "What do you see in this image?\nThree yellow triangles, 42 naïve ones!"):
        assert tokenizer.decode(tokenizer.encode(sentence, add_special_tokens=False)) == sentence


def test_special_token_ids_match_the_config(family, loaded):
    processor, model = loaded
    tokenizer, config = processor.tokenizer, model.config
    ids = tokenizer.convert_tokens_to_ids
    assert config.image_token_id == processor.image_token_id
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) <= config.text_config.vocab_size
    if family == "internvl":  # Qwen2.5-VL's vocabulary, then InternVL's tokens, then the named <video>
        order = QWEN2_VL_SPECIAL_TOKENS + QWEN3_ADDED_TOKENS[:8] + INTERNVL_ADDED_TOKENS + ("<video>",)
        assert [ids(token) for token in order] == list(range(ids("<|endoftext|>"), len(tokenizer)))
        assert config.image_token_id == ids("<IMG_CONTEXT>") == ids("<img>") + 2
        assert (processor.start_image_token_id, processor.end_image_token_id) == (ids("<img>"), ids("</img>"))
        assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    elif family != "llava":
        order = QWEN2_VL_SPECIAL_TOKENS + (QWEN3_ADDED_TOKENS if family == "qwen3_vl" else ())
        assert [ids(token) for token in order] == list(range(ids("<|endoftext|>"), len(tokenizer)))
        assert config.image_token_id == ids("<|image_pad|>")
        assert config.video_token_id == ids("<|video_pad|>")
        assert config.vision_start_token_id == ids("<|vision_start|>")
        assert config.vision_end_token_id == ids("<|vision_end|>")
        assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
        assert config.text_config.bos_token_id == ids("<|endoftext|>")
        assert "<think>" not in tokenizer.all_special_tokens  # Qwen3's added tokens are ordinary text
    else:
        assert config.image_token_id == ids("<image>")
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token) == (1, 2, "<pad>")
        assert config.text_config.bos_token_id == tokenizer.bos_token_id
        assert tokenizer.encode(PROMPT)[0] == tokenizer.bos_token_id


def test_same_seed_same_folder(family, folder, tmp_path):
    again = BUILDERS[family](tmp_path / "again", seed=0)
    assert digests(again) == digests(folder)


def test_script_writes_a_folder(tmp_path, capsys):
    script = load_script("make_tiny_hf_vlm")
    assert script.main(["--family", "llava", "--seed", "1", str(tmp_path / "llava")]) == 0
    assert "written to" in capsys.readouterr().out
    assert (tmp_path / "llava" / "model.safetensors").is_file()
    assert (tmp_path / "llava" / "chat_template.jinja").is_file()
