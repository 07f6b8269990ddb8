"""Batch collation for DPO pairs: right padding, lazily opened images, pairs with broken images weighted 0."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from silkie.data.corruption import corrupt_image
from silkie.data.images import ImageLoadError, ImageStore
from silkie.models.family import ImageBatch

SEQUENCE_KEYS = ("prompt", "chosen", "rejected")


BLANK_IMAGE_SIZE = (64, 64)  # stands in for a failed image; every family's processor resizes it


class DroppedPairWarning(UserWarning):
    """A pair got weight 0 in its batch because its image could not be loaded."""


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest: (ids [B, L] long, attention_mask [B, L] long)."""
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def expand_marker(ids: Sequence[int], marker_id: int | None, count: int) -> list[int]:
    """Replace the one image marker in `ids` by `count` copies (the image's feature tokens)."""
    ids = list(ids)
    if count == 0 or marker_id is None:
        return ids
    at = ids.index(marker_id)
    return ids[:at] + [marker_id] * count + ids[at + 1 :]


class PairCollator:
    """Tokenized pair rows -> padded tensors + `pixel_values` for the pairs with an image.

    Output: `{prompt,chosen,rejected}_input_ids` / `_attention_mask` [B, L] (right padded with
    `pad_token_id`), the image tensors of the family's processor (`pixel_values` [N_img, 3, S, S] for
    Qwen-VL; `pixel_values` patches + `image_grid_thw` for Qwen2-VL) for the images in batch order,
    `image_index` [B] (image number per pair, -1 without image) and `pair_weight` [B] (1.0, or 0.0 for a pair
    whose image failed). When the processor returns an `ImageBatch` with `tokens_per_image`, each prompt's
    single image marker is expanded to that many marker tokens. Images are opened here, i.e. in the DataLoader
    worker. A pair whose image fails to load keeps its place with a blank picture and weight 0 (a
    `DroppedPairWarning` names it): the loss, metrics and cached reference leave it out, and the batch keeps
    its size and rows, so every rank runs the same work. With `corruption` (kind, seed) the batch also holds
    `corrupt_pixel_values`: each image's corrupted copy (`silkie.data.corruption`), processed alike.
    """

    def __init__(
        self,
        image_store: ImageStore | None,
        image_processor: Callable[[list[Image.Image]], torch.Tensor | ImageBatch],
        pad_token_id: int,
        corruption: tuple[str, int] | None = None,
    ):
        self.image_store = image_store
        self.image_processor = image_processor
        self.pad_token_id = int(pad_token_id)
        self.corruption = corruption

    def _load(self, row: Mapping[str, Any]) -> Image.Image | None:
        key = row.get("image")
        if not key:
            return None
        if self.image_store is None:
            raise ImageLoadError(key, "the collator has no image store")
        image = self.image_store.open(key)
        problem = self.image_processor.check(image) if hasattr(self.image_processor, "check") else None
        if problem:  # the family's processor would fail on it: drop the pair like an unreadable image
            image.close()
            raise ImageLoadError(key, problem)
        return image

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate `rows` (dicts with `prompt_id`, `image`, `*_input_ids`) into a batch of tensors."""
        images: list[Image.Image] = []
        keys: list[str] = []
        image_index: list[int] = []
        weights: list[float] = []
        for row in rows:
            weight = 1.0
            try:
                image = self._load(row)
            except ImageLoadError as error:
                warnings.warn(
                    f"dropping pair {row.get('prompt_id')!r} (kept in the batch with weight 0): {error}",
                    DroppedPairWarning,
                    stacklevel=2,
                )
                image, weight = Image.new("RGB", BLANK_IMAGE_SIZE), 0.0
            image_index.append(len(images) if image is not None else -1)
            weights.append(weight)
            if image is not None:
                images.append(image)
                keys.append(str(row.get("image")))
        corrupted = None
        if self.corruption is not None and images:
            kind, seed = self.corruption
            corrupted = self.image_processor([corrupt_image(im, kind, seed, k) for im, k in zip(images, keys)])
        processed = self.image_processor(images)
        for image in images:
            image.close()
        if not isinstance(processed, ImageBatch):
            processed = ImageBatch({"pixel_values": processed})
        batch: dict[str, torch.Tensor] = {}
        for name in SEQUENCE_KEYS:
            sequences = [row[f"{name}_input_ids"] for row in rows]
            if name == "prompt" and processed.tokens_per_image is not None:
                sequences = [
                    expand_marker(seq, processed.marker_id, processed.tokens_per_image[i] if i >= 0 else 0)
                    for seq, i in zip(sequences, image_index)
                ]
            ids, mask = pad_sequences(sequences, self.pad_token_id)
            batch[f"{name}_input_ids"] = ids
            batch[f"{name}_attention_mask"] = mask
        batch.update(processed.tensors)
        if corrupted is not None:
            tensors = corrupted.tensors if isinstance(corrupted, ImageBatch) else {"pixel_values": corrupted}
            batch["corrupt_pixel_values"] = tensors["pixel_values"]
        batch["image_index"] = torch.tensor(image_index, dtype=torch.long)
        batch["pair_weight"] = torch.tensor(weights, dtype=torch.float32)
        if all("pair_index" in row for row in rows):  # lets the trainer look up cached reference log-probs
            batch["pair_index"] = torch.tensor([int(row["pair_index"]) for row in rows], dtype=torch.long)
        return batch
