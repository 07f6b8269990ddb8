"""InternVL (transformers-native, `InternVLForConditionalGeneration`: InternVL2.5 / InternVL3 "-hf" checkpoints).

An InternViT tower, a pixel-shuffle MLP projector and a Qwen2 / Qwen3 / Llama language model with 1-D positions.
An image is cut into tiles of the processor's size (448 px) on the grid of aspect ratios that fits it best, at most
`max_patches` (the recipe's `model.max_tiles`), plus a thumbnail of the whole image when it takes several; each tile
gives `image_seq_length` (256) feature tokens. The chat template writes one `<IMG_CONTEXT>` per image, which the
collator replaces, as `InternVLProcessor` does, by `<img>` + the image's context tokens + `</img>`.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from silkie.errors import InputError
from silkie.models.family import ImageBatch

from .codec import load_processor
from .family import HFVisionFamily, image_encoder_outputs

TILE_COUNTS = "image_tiles"  # batch key: [N_img] tiles per image (their rows of `pixel_values`, in image order)


def tile_tokens(config: Any) -> int:
    """Feature tokens per tile: the tower's patches after the projector's pixel shuffle (256 at 448 px, patch 14)."""
    vision = config.vision_config
    patches = (vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
    return int(patches * config.downsample_ratio**2)


def most_tiles(image_processor: Any, call_kwargs: dict) -> int:
    """Most tiles one image takes: `max_patches` (+ the thumbnail) when the processor crops to tiles, else 1."""
    crops = call_kwargs.get("crop_to_patches", getattr(image_processor, "crop_to_patches", False))
    tiles = int(image_processor.max_patches) if crops else 1
    return tiles + 1 if tiles > 1 else tiles


class InternVLFamily(HFVisionFamily):
    """InternVL "-hf": tiled images, each image's features the concatenation of its tiles' (thumbnail last)."""

    class_names = ("InternVLForConditionalGeneration",)
    vision_lora_pattern = (
        r"model\.vision_tower\.encoder\.layer\.\d+\.(?:attention\.(?:q_proj|k_proj|v_proj|projection_layer)|mlp\.fc[12])"
    )
    vision_parts = ("vision_tower", "multi_modal_projector")
    projector_part = "multi_modal_projector"
    generation_skip_keys = (TILE_COUNTS,)

    def image_token_budget(self, processor: Any, path: str) -> int:
        tiles = most_tiles(processor.image_processor, call_defaults(processor))
        return tiles * processor.image_seq_length + 2  # + <img>, </img>

    def image_processor(self, model_config: Any, section: Any) -> Any:
        return InternVLImages(load_processor(section.path, None, None, section.max_tiles), model_config)

    def quantization_skip_modules(self) -> list[str]:
        return ["lm_head", "vision_tower", "multi_modal_projector"]

    def _tile_features(self, base: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, tokens per tile, D]: each tile's projected features."""
        config = base.config
        out = base.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return out.pooler_output

    def encode_images(self, base: nn.Module, batch: dict) -> list[torch.Tensor]:
        tiles = self._tile_features(base, batch["pixel_values"])
        return [image.flatten(0, 1) for image in torch.split(tiles, batch[TILE_COUNTS].tolist())]

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        height, width = base.config.vision_config.image_size
        device = next(base.model.vision_tower.parameters()).device
        return self._tile_features(base, torch.zeros(1, 3, height, width, device=device)).flatten(0, 1)

    def row_image_kwargs(
        self, base: nn.Module, batch: dict, order: torch.Tensor, features: Any, video_order: torch.Tensor | None = None
    ) -> dict:
        picks = order.tolist()
        if features is not None:  # the model scatters one [tokens, D] tensor over its context tokens, in order
            return image_encoder_outputs(torch.cat([features[i] for i in picks]))
        tiles = torch.split(batch["pixel_values"], batch[TILE_COUNTS].tolist())
        return {"pixel_values": torch.cat([tiles[i] for i in picks])}


def call_defaults(processor: Any) -> dict:
    """The image kwargs `InternVLProcessor` calls its image processor with (its class defaults: cut into tiles)."""
    return dict(getattr(processor, "images_kwargs", None) or {})


class InternVLImages:
    """PIL images -> `pixel_values` [T, 3, S, S] (every image's tiles, in image order) + `image_tiles` [N], and per
    image the ids that replace its marker: `<img>`, its tiles' context tokens, `</img>`."""

    def __init__(self, processor: Any, model_config: Any):
        self.image_processor = processor.image_processor
        self.call_kwargs = call_defaults(processor)
        self.marker_id = model_config.image_token_id
        self.start_id, self.end_id = processor.start_image_token_id, processor.end_image_token_id
        self.per_tile = tile_tokens(model_config)
        if processor.image_seq_length != self.per_tile:  # the spans would not match the features the model makes
            raise InputError(
                f"model.path: the processor writes {processor.image_seq_length} tokens per tile (image_seq_length) but "
                f"the model makes {self.per_tile} per {model_config.vision_config.image_size[0]} px tile"
            )
        self.size = tuple(model_config.vision_config.image_size)

    def fingerprint(self) -> str:
        """The image processor's settings, the call's tiling switch and the tokens per tile."""
        call = json.dumps(self.call_kwargs, sort_keys=True)
        return f"{self.image_processor.to_json_string()} call {call} tile tokens {self.per_tile}"

    def spans(self, tiles: list[int]) -> list[list[int]]:
        """The ids that replace each image's marker, for images of `tiles` tiles."""
        return [[self.start_id, *[self.marker_id] * (count * self.per_tile), self.end_id] for count in tiles]

    def __call__(self, images: list, videos: list = ()) -> ImageBatch:
        if videos:
            raise ValueError("InternVL takes images, not video (tokenization drops such pairs as video_unsupported)")
        if not images:
            empty = {"pixel_values": torch.zeros(0, 3, *self.size), TILE_COUNTS: torch.zeros(0, dtype=torch.long)}
            return ImageBatch(empty, [], self.marker_id)
        out = self.image_processor(images=images, return_tensors="pt", **self.call_kwargs)
        tiles = [int(count) for count in out["num_patches"]]
        tensors = {"pixel_values": out["pixel_values"], TILE_COUNTS: torch.tensor(tiles, dtype=torch.long)}
        return ImageBatch(tensors, self.spans(tiles), self.marker_id)
