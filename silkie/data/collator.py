"""Batch collation for DPO pairs: right padding, lazily opened images and videos, pairs with broken media weighted 0."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from silkie.data.corruption import corrupt_image
from silkie.data.images import ImageLoadError, ImageStore
from silkie.data.video import VideoSampling, blank_video, decode_video
from silkie.models.family import ImageBatch, VideoClip

SEQUENCE_KEYS = ("prompt", "chosen", "rejected")


BLANK_IMAGE_SIZE = (64, 64)  # stands in for a failed image; every family's processor resizes it


class DroppedPairWarning(UserWarning):
    """A pair got weight 0 in its batch because one of its images or videos could not be loaded."""


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest: (ids [B, L] long, attention_mask [B, L] long)."""
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def expand_markers(ids: Sequence[int], marker_id: int | None, counts: Sequence[int | Sequence[int]]) -> list[int]:
    """Replace the k-th `marker_id` in `ids` by `counts[k]` copies (that image's / video's feature tokens), or by the
    token ids `counts[k]` lists (a layout with text between the feature tokens, e.g. Qwen3-VL's frame timestamps);
    a layout that opens with text and has `joined(before)` also retokenizes the text before the marker with it
    (it returns how many ids before the marker it replaces, and the ids that replace them and the marker)."""
    ids = list(ids)
    if marker_id is None or not counts:
        return ids
    out, number = [], 0
    for token in ids:
        if token == marker_id and number < len(counts):
            count = counts[number]
            if isinstance(count, int):
                out.extend([marker_id] * count)
            elif hasattr(count, "joined"):
                replaced, joined = count.joined(out)
                del out[len(out) - replaced :]
                out.extend(joined)
            else:
                out.extend(count)
            number += 1
        else:
            out.append(token)
    return out


def expand_marker(ids: Sequence[int], marker_id: int | None, count: int) -> list[int]:
    """Replace the one image marker in `ids` by `count` copies (the image's feature tokens)."""
    return expand_markers(ids, marker_id, [count] if count else [])


def media_kinds(prompts: Sequence[Sequence[int]], image_marker: int | None, video_marker: int | None) -> torch.Tensor:
    """[B, M]: each prompt's media in the order of their markers (0 image, 1 video; -1 pads)."""
    kinds = [[0 if token == image_marker else 1 for token in ids if token in (image_marker, video_marker)]
             for ids in prompts]  # fmt: skip
    out = torch.full((len(kinds), max((len(k) for k in kinds), default=0)), -1, dtype=torch.long)
    for row, kind in enumerate(kinds):
        out[row, : len(kind)] = torch.tensor(kind, dtype=torch.long)
    return out


def media_keys(row: Mapping[str, Any], kind: str) -> list[str]:
    """A tokenized row's image (`kind` "image") or video keys, in order (a row with a single `image` too)."""
    keys = row.get(f"{kind}s")
    if keys is None:
        single = row.get(kind)
        keys = [single] if single else []
    return [str(key) for key in keys if key]


class PairCollator:
    """Tokenized pair rows -> padded tensors + the image (and video) tensors of the batch.

    Output: `{prompt,chosen,rejected}_input_ids` / `_attention_mask` [B, L] (right padded with `pad_token_id`),
    the family processor's tensors for every image of the batch in (pair, position) order (`pixel_values`
    [N_img, 3, S, S] for Qwen-VL; `pixel_values` patches + `image_grid_thw` for Qwen2-VL, with
    `pixel_values_videos` + `video_grid_thw` for videos), `image_counts` / `video_counts` [B] (a pair's images /
    videos) and `pair_weight` [B] (1.0, or 0.0 for a pair one of whose images or videos failed). When the processor
    returns an `ImageBatch` with token counts, each prompt's k-th image (video) marker is expanded to that
    image's (video's) count. Media are opened here, i.e. in the DataLoader worker. A pair whose media fail to load
    keeps its place with blank stand-ins and weight 0 (a `DroppedPairWarning` names it): the loss, metrics and
    cached reference leave it out, and the batch keeps its size and rows, so every rank runs the same work. With
    `corruption` (kind, seed) the batch also holds `corrupt_pixel_values` (and `corrupt_pixel_values_videos`):
    each image's (each video frame's) corrupted copy (`silkie.data.corruption`), processed alike.
    """

    def __init__(
        self,
        image_store: ImageStore | None,
        image_processor: Callable[..., torch.Tensor | ImageBatch],
        pad_token_id: int,
        corruption: tuple[str, int] | None = None,
        video_sampling: VideoSampling | None = None,
    ):
        self.image_store = image_store
        self.image_processor = image_processor
        self.pad_token_id = int(pad_token_id)
        self.corruption = corruption
        self.video_sampling = video_sampling or VideoSampling()

    def _store(self, key: str) -> ImageStore:
        if self.image_store is None:
            raise ImageLoadError(key, "the collator has no image store")
        return self.image_store

    def _load(self, key: str) -> Image.Image:
        image = self._store(key).open(key)
        problem = self.image_processor.check(image) if hasattr(self.image_processor, "check") else None
        if problem:  # the family's processor would fail on it: drop the pair like an unreadable image
            image.close()
            raise ImageLoadError(key, problem)
        return image

    def _load_video(self, key: str) -> VideoClip:
        try:
            data = self._store(key).read_bytes(key)
        except ImageLoadError as err:  # the store names every member an image
            raise ImageLoadError(key, err.reason, "video") from err
        clip = decode_video(key, data, self.video_sampling)
        problem = self.image_processor.check(clip.frames[0]) if hasattr(self.image_processor, "check") else None
        if problem:
            raise ImageLoadError(key, problem, "video")
        return clip

    def _pair_media(self, row: Mapping[str, Any]) -> tuple[list[Image.Image], list[VideoClip], float]:
        """The row's images and videos, or blank stand-ins (and weight 0) when one of them fails."""
        images: list[Image.Image] = []
        try:
            images = [self._load(key) for key in media_keys(row, "image")]
            return images, [self._load_video(key) for key in media_keys(row, "video")], 1.0
        except ImageLoadError as error:
            for image in images:
                image.close()
            warnings.warn(
                f"dropping pair {row.get('prompt_id')!r} (kept in the batch with weight 0): {error}",
                DroppedPairWarning,
                stacklevel=3,
            )
            blank_images = [Image.new("RGB", BLANK_IMAGE_SIZE) for _ in media_keys(row, "image")]
            frames = self.video_sampling.frame_multiple
            return blank_images, [blank_video(frames, BLANK_IMAGE_SIZE) for _ in media_keys(row, "video")], 0.0

    def _process(self, images: list[Image.Image], videos: list[VideoClip]) -> ImageBatch:
        processed = self.image_processor(images, videos=videos) if videos else self.image_processor(images)
        return processed if isinstance(processed, ImageBatch) else ImageBatch({"pixel_values": processed})

    def _corrupted(self, images: list, image_keys: list, videos: list, video_keys: list) -> ImageBatch:
        kind, seed = self.corruption
        images = [corrupt_image(im, kind, seed, key) for im, key in zip(images, image_keys)]
        videos = [
            VideoClip([corrupt_image(frame, kind, seed, key) for frame in clip.frames], clip.fps, clip.times)
            for clip, key in zip(videos, video_keys)
        ]
        return self._process(images, videos)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate `rows` (dicts with `prompt_id`, `images`, `videos`, `*_input_ids`) into a batch of tensors."""
        images, image_keys, videos, video_keys = [], [], [], []
        image_counts, video_counts, weights = [], [], []
        for row in rows:
            pair_images, pair_videos, weight = self._pair_media(row)
            images += pair_images
            videos += pair_videos
            image_keys += media_keys(row, "image")
            video_keys += media_keys(row, "video")
            image_counts.append(len(pair_images))
            video_counts.append(len(pair_videos))
            weights.append(weight)
        corrupted = None
        if self.corruption is not None and (images or videos):
            corrupted = self._corrupted(images, image_keys, videos, video_keys)
        processed = self._process(images, videos)
        for image in images:
            image.close()
        batch: dict[str, torch.Tensor] = {}
        if processed.media_in_prompt_order:
            prompts = [row["prompt_input_ids"] for row in rows]
            batch["media_kinds"] = media_kinds(prompts, processed.marker_id, processed.video_marker_id)
        for name in SEQUENCE_KEYS:
            sequences = [row[f"{name}_input_ids"] for row in rows]
            if name == "prompt":
                sequences = self._expanded(sequences, processed, image_counts, video_counts)
            ids, mask = pad_sequences(sequences, self.pad_token_id)
            batch[f"{name}_input_ids"] = ids
            batch[f"{name}_attention_mask"] = mask
        batch.update(processed.tensors)
        if corrupted is not None:
            batch["corrupt_pixel_values"] = corrupted.tensors["pixel_values"]
            if "pixel_values_videos" in corrupted.tensors:
                batch["corrupt_pixel_values_videos"] = corrupted.tensors["pixel_values_videos"]
        batch["image_counts"] = torch.tensor(image_counts, dtype=torch.long)
        batch["video_counts"] = torch.tensor(video_counts, dtype=torch.long)
        batch["pair_weight"] = torch.tensor(weights, dtype=torch.float32)
        if all("pair_index" in row for row in rows):  # lets the trainer look up cached reference log-probs
            batch["pair_index"] = torch.tensor([int(row["pair_index"]) for row in rows], dtype=torch.long)
        return batch

    @staticmethod
    def _expanded(sequences: list, processed: ImageBatch, image_counts: list, video_counts: list) -> list:
        """Each prompt with its image and video markers expanded to their feature-token counts."""
        spans = (
            (processed.marker_id, processed.tokens_per_image, image_counts),
            (processed.video_marker_id, processed.tokens_per_video, video_counts),
        )
        for marker, tokens, counts in spans:
            if tokens is None:
                continue
            starts = [sum(counts[:row]) for row in range(len(counts))]
            sequences = [
                expand_markers(seq, marker, tokens[start : start + count])
                for seq, start, count in zip(sequences, starts, counts)
            ]
        return sequences
