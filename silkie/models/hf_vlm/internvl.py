"""InternVL (transformers-native, `InternVLForConditionalGeneration`: InternVL2.5 / InternVL3 "-hf" checkpoints).

An InternViT tower, a pixel-shuffle MLP projector and a Qwen2 / Qwen3 / Llama language model with 1-D positions.
An image is cut into tiles of the processor's size (448 px) on the grid of aspect ratios that fits it best, at most
`max_patches` (the recipe's `model.max_tiles`), plus a thumbnail of the whole image when it takes several; each tile
gives `image_seq_length` (256) feature tokens. The chat template writes one `<IMG_CONTEXT>` per image, which the
collator replaces, as `InternVLProcessor` does, by `<img>` + the image's context tokens + `</img>`; a video's
`<video>` becomes one such span per frame (`internvl_video`). Images and video frames share the context token, so
the model fills them in prompt order: the rows' pixels (or features) are interleaved by the pairs' `media_kinds`.
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
from .internvl_video import FRAME_COUNTS, InternVLVideos

TILE_COUNTS = "image_tiles"  # batch key: [N_img] tiles per image (their rows of `pixel_values`, in image order)
IMAGE = 0  # a `media_kinds` entry: 0 image, 1 video, -1 pads


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
    """InternVL "-hf": tiled images (each image's features the concatenation of its tiles', thumbnail last) and
    videos of one tile per frame, in prompt order."""

    class_names = ("InternVLForConditionalGeneration",)
    vision_lora_pattern = (
        r"model\.vision_tower\.encoder\.layer\.\d+\.(?:attention\.(?:q_proj|k_proj|v_proj|projection_layer)|mlp\.fc[12])"
    )
    vision_parts = ("vision_tower", "multi_modal_projector")
    projector_part = "multi_modal_projector"
    video_frame_spread = "middle"  # each segment's middle frame, as InternVL's own video loader

    def image_token_budget(self, processor: Any, path: str) -> int:
        tiles = most_tiles(processor.image_processor, call_defaults(processor))
        return tiles * processor.image_seq_length + 2  # + <img>, </img>

    def video_processor(self, processor: Any, section: Any) -> InternVLVideos:
        from transformers import AutoConfig

        return InternVLVideos(processor, AutoConfig.from_pretrained(section.path), section, processor.image_seq_length)

    def image_processor(self, model_config: Any, section: Any) -> Any:
        processor = load_processor(section.path, None, None, section.max_tiles)
        images = InternVLImages(processor, model_config)
        return InternVLMedia(images, InternVLVideos(processor, model_config, section, images.per_tile))

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

    def encode_images(self, base: nn.Module, batch: dict) -> dict[str, list[torch.Tensor]]:
        """Each image's and each video's features ([tiles or frames x tokens, D]), the tower run once on both."""
        parts = {"image": (batch.get("pixel_values"), batch.get(TILE_COUNTS))}
        parts["video"] = (batch.get("pixel_values_videos"), batch.get(FRAME_COUNTS))
        present = {kind: part for kind, part in parts.items() if part[0] is not None and part[0].numel()}
        tiles = self._tile_features(base, torch.cat([pixels for pixels, _ in present.values()]))
        features: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        for kind, (pixels, counts) in present.items():
            mine, tiles = tiles[: pixels.size(0)], tiles[pixels.size(0) :]
            features[kind] = [item.flatten(0, 1) for item in torch.split(mine, counts.tolist())]
        return features

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        height, width = base.config.vision_config.image_size
        device = next(base.model.vision_tower.parameters()).device
        return self._tile_features(base, torch.zeros(1, 3, height, width, device=device)).flatten(0, 1)

    def row_image_kwargs(
        self, base: nn.Module, batch: dict, order: torch.Tensor, features: Any, video_order: torch.Tensor | None = None
    ) -> dict:
        sequence = media_sequence(batch, order, video_order)
        if features is not None:  # the model scatters one [tokens, D] tensor over its context tokens, in order
            return image_encoder_outputs(torch.cat([features[kind][index] for kind, index in sequence]))
        return {"pixel_values": interleaved_pixels(batch, sequence)}

    def generation_inputs(self, tensors: dict, media_kinds: list[int]) -> dict:
        """One prompt's pixels for `generate()`: its images' tiles and videos' frames in prompt order."""
        if not media_kinds:
            return {}
        return {"pixel_values": interleaved_pixels(tensors, pair_sequences([media_kinds])[0])}


def media_sequence(batch: dict, order: torch.Tensor, video_order: torch.Tensor | None) -> list[tuple[str, int]]:
    """The rows' media as ("image" | "video", batch index), in the order their context tokens come: row-major
    spans hold each pair's media in prompt order (`media_kinds`), pairs in batch order, every block of rows
    (concatenated rows: chosen, then rejected) the whole batch again; or one pair's (a prompt to generate from).
    Which pair comes first cannot be read from the two index lists alone (a pair with only an image and one with
    only a video give the same lists in either order), so this layout is checked, not searched for."""
    images, videos = order.tolist(), video_order.tolist() if video_order is not None else []
    if not videos:
        return [("image", index) for index in images]
    per_pair = pair_sequences(batch["media_kinds"].tolist())
    blocks = (len(images) + len(videos)) // max(1, sum(map(len, per_pair)))
    candidates = [[item for _ in range(blocks) for pair in per_pair for item in pair], *per_pair]
    for sequence in candidates:
        if [i for kind, i in sequence if kind == "image"] == images and [
            i for kind, i in sequence if kind == "video"
        ] == videos:
            return sequence
    raise RuntimeError("InternVL: the rows' images and videos are not in the batch's pair order")


def pair_sequences(media_kinds: list[list[int]]) -> list[list[tuple[str, int]]]:
    """Each pair's media as ("image" | "video", batch index) in prompt order, from its `media_kinds` row (0 image,
    1 video, -1 pads); indices count each kind across the pairs, in batch order."""
    per_pair, seen = [], {"image": 0, "video": 0}
    for kinds in media_kinds:
        pair = []
        for kind in (("image" if entry == IMAGE else "video") for entry in kinds if entry >= 0):
            pair.append((kind, seen[kind]))
            seen[kind] += 1
        per_pair.append(pair)
    return per_pair


def interleaved_pixels(batch: dict, sequence: list[tuple[str, int]]) -> torch.Tensor:
    """The tiles of `sequence`'s images and frames of its videos, one tensor in that order."""
    chunks = {"image": (), "video": ()}
    if batch.get("pixel_values") is not None and batch["pixel_values"].numel():
        chunks["image"] = torch.split(batch["pixel_values"], batch[TILE_COUNTS].tolist())
    if batch.get("pixel_values_videos") is not None and batch["pixel_values_videos"].numel():
        chunks["video"] = torch.split(batch["pixel_values_videos"], batch[FRAME_COUNTS].tolist())
    return torch.cat([chunks[kind][index] for kind, index in sequence])


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

    def __call__(self, images: list) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """The tensors of `images` and each one's ids."""
        if not images:
            return {"pixel_values": torch.zeros(0, 3, *self.size), TILE_COUNTS: torch.zeros(0, dtype=torch.long)}, []
        out = self.image_processor(images=images, return_tensors="pt", **self.call_kwargs)
        tiles = [int(count) for count in out["num_patches"]]
        tensors = {"pixel_values": out["pixel_values"], TILE_COUNTS: torch.tensor(tiles, dtype=torch.long)}
        return tensors, self.spans(tiles)


class InternVLMedia:
    """The collator's processor: images (`InternVLImages`) and videos (`InternVLVideos`) as one `ImageBatch`, which
    asks the collator for each pair's media kinds in prompt order (images and frames share one placeholder)."""

    def __init__(self, images: InternVLImages, videos: InternVLVideos):
        self.images, self.videos = images, videos
        self.image_processor = images.image_processor  # the processor's, shared with the codec

    def fingerprint(self) -> str:
        """The image and video settings."""
        return f"{self.images.fingerprint()} {self.videos.fingerprint()}"

    def __call__(self, images: list, videos: list = ()) -> ImageBatch:
        tensors, spans = self.images(list(images))
        batch = ImageBatch(tensors, spans, self.images.marker_id, media_in_prompt_order=True)
        if videos:
            video_tensors, batch.tokens_per_video = self.videos(list(videos))
            batch.tensors |= video_tensors
            batch.video_marker_id = self.videos.marker_id
        return batch
