"""Tiny Qwen2-VL / LLaVA stand-ins and pair batches for the transformers-native family tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from silkie.config import LoraSection, ModelSection
from silkie.data.collator import PairCollator
from silkie.dev.tiny_hf_vlm import build_tiny_llava, build_tiny_qwen2_5_vl, build_tiny_qwen2_vl
from silkie.models.family import get_family
from silkie.models.loading import apply_lora, load_base_model, load_tokenizer

BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen2_5_vl, "llava": build_tiny_llava}
# (prompt, chosen, rejected, image size (w, h) or None): sizes differ so Qwen2-VL grids (and M-RoPE) differ;
# answers stay short so summed fp32 log-probs stay under 64 in magnitude, where 1e-5 is above fp32 rounding
PAIRS = [
    ("Describe the image.", "There are two red circles.", "A blue square.", (64, 80)),
    ("What colour is the shape?", "It is green.", "A yellow triangle.", (112, 56)),
    ("How many shapes are there?", "Three.", "There is one.", None),
    ("Where is the circle?", "Top left.", "Bottom.", (90, 90)),
]


def pair_image(index: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic random RGB picture."""
    pixels = np.random.default_rng(index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


class MemoryImages:
    """An image store over in-memory pictures keyed `img{i}`."""

    def __init__(self):
        self.images = {f"img{i}": pair_image(i, size) for i, (*_, size) in enumerate(PAIRS) if size}

    def open(self, key: str) -> Image.Image:
        return self.images[key].copy()


def model_section(folder: Path, family: str) -> ModelSection:
    return ModelSection(path=str(folder), family=family, dtype="fp32")


def tokenized_rows(codec, pairs=PAIRS) -> list[dict]:
    """Collator input rows for `pairs` through the family codec."""
    rows = []
    for i, (prompt, chosen, rejected, size) in enumerate(pairs):
        image = f"img{i}" if size else None
        rows.append(
            {
                "prompt_id": f"p{i}",
                "image": image,
                "prompt_input_ids": codec.prompt_ids(prompt, image),
                "chosen_input_ids": codec.answer_ids(chosen),
                "rejected_input_ids": codec.answer_ids(rejected),
            }
        )
    return rows


def family_batch(folder: Path, family: str, model) -> tuple[dict, int]:
    """The collated batch of `PAIRS` and the pad id."""
    section = model_section(folder, family)
    codec = load_tokenizer(section)
    images = get_family(family).image_processor(model.config, section)
    collator = PairCollator(MemoryImages(), images, codec.pad_token_id)
    return collator(tokenized_rows(codec)), codec.pad_token_id


def lora_model(folder: Path, family: str, std: float = 0.3, seed: int = 0):
    """The tiny checkpoint with LoRA on every LLM linear, B initialised non-zero so the adapter matters."""
    torch.manual_seed(seed)
    model = apply_lora(load_base_model(model_section(folder, family)), LoraSection(r=8, alpha=16, dropout=0.0), family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)
    return model.train()
