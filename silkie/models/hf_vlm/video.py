"""Qwen2-VL / Qwen2.5-VL video tensors without torchvision.

transformers 5 implements `Qwen2VLVideoProcessor` with torchvision only; this is the same computation on PIL and
torch: every frame resized to one `smart_resize` size within the video pixel bounds (bicubic, as the image path),
rescaled and normalised with the image processor's mean/std, the frame count padded to a multiple of the temporal
patch by repeating the last frame, and patchified in the processor's layout `(t, h/m, w/m, m, m, C, tp, p, p)`.
Frames are resized by PIL rather than torchvision, so pixels can differ from transformers' by interpolation
rounding; the layout, grid and token counts are the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from silkie.models.family import VideoClip

# Qwen2VLVideoProcessor's class defaults (qwen-vl-utils' per-frame bounds), in merged tokens ((patch x merge)^2
# pixels each); transformers' AutoProcessor uses the image bounds for a checkpoint without a video config: up to
# 12.8 M pixels a frame, far beyond a DPO budget
DEFAULT_VIDEO_MIN_TOKENS, DEFAULT_VIDEO_MAX_TOKENS = 128, 768


def folder_video_configs(path: str | Path) -> list[dict]:
    """The video processor settings a checkpoint folder records, where it may: `video_preprocessor_config.json`,
    then the `video_processor` entry of `processor_config.json` (the non-empty ones, in that order)."""
    folder, configs = Path(path), []
    for name, entry in (("video_preprocessor_config.json", None), ("processor_config.json", "video_processor")):
        file = folder / name
        if file.is_file():
            config = json.loads(file.read_text(encoding="utf-8"))
            configs.append(config.get(entry) or {} if entry else config)
    return [config for config in configs if config]


def folder_video_bounds(path: str | Path) -> tuple[int | None, int | None]:
    """The per-frame pixel bounds a checkpoint folder records for video (the first config with them), or
    (None, None)."""
    for config in folder_video_configs(path):
        size = config.get("size") or {}
        low = size.get("shortest_edge", config.get("min_pixels"))
        high = size.get("longest_edge", config.get("max_pixels"))
        if low is not None or high is not None:
            return low, high
    return None, None


def processed_frames(image_processor: Any, clips: list[VideoClip], frame_kwargs: dict) -> tuple[Any, list[int]]:
    """Every clip's frames (RGB, in clip order) through `image_processor` at `frame_kwargs`, and each clip's frame
    count (InternVL's and Gemma 4's videos: a frame is processed as an image)."""
    frames = [frame.convert("RGB") for clip in clips for frame in clip.frames]
    return image_processor(images=frames, return_tensors="pt", **frame_kwargs), [len(clip.frames) for clip in clips]


class Qwen2VLVideos:
    """`VideoClip`s -> `pixel_values_videos` patches + `video_grid_thw` (+ `second_per_grid_ts`), and the
    tokens each video fills (grid / merge^2)."""

    def __init__(self, image_processor: Any, model_config: Any, section: Any, timed: bool = False):
        vision = model_config.vision_config
        self.patch, self.merge = image_processor.patch_size, image_processor.merge_size
        self.temporal = vision.temporal_patch_size
        self.mean = np.asarray(image_processor.image_mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(image_processor.image_std, dtype=np.float32)[:, None, None]
        self.marker_id = model_config.video_token_id
        self.timed = timed  # Qwen2.5-VL: temporal positions spaced by the seconds each grid step spans
        self.min_pixels, self.max_pixels = self.frame_bounds(section)
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"model.video_min_pixels ({self.min_pixels}) is above the most ({self.max_pixels})")
        self.empty_width = vision.in_channels * self.temporal * self.patch**2

    def frame_bounds(self, section: Any) -> tuple[int, int]:
        """(fewest, most) pixels of a frame: the recipe's, else the folder's video config, else qwen-vl-utils'."""
        unit = (self.patch * self.merge) ** 2
        low, high = folder_video_bounds(section.path)
        low = section.video_min_pixels or low or DEFAULT_VIDEO_MIN_TOKENS * unit
        return low, section.video_max_pixels or high or DEFAULT_VIDEO_MAX_TOKENS * unit

    def tokens_per_slice(self) -> int:
        """Most tokens one temporal patch of frames takes (frames at the largest size)."""
        return self.max_pixels // (self.patch * self.merge) ** 2

    def most_tokens(self, max_frames: int) -> int:
        """Most tokens a video of at most `max_frames` sampled frames takes."""
        return math.ceil(max_frames / self.temporal) * self.tokens_per_slice()

    def slice_key(self) -> str:
        """What decides `most_tokens` (part of the tokenization cache's key)."""
        return str((self.temporal, self.tokens_per_slice()))

    def fingerprint(self) -> str:
        """The settings that decide a video's pixels and token count."""
        return f"video {self.min_pixels}-{self.max_pixels} px, patch {self.patch}x{self.merge}, t {self.temporal}"

    def frame_size(self, clip: VideoClip) -> tuple[int, int]:
        """(height, width) every frame of `clip` is resized to."""
        width, height = clip.frames[0].size
        return smart_resize(
            height, width, factor=self.patch * self.merge, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )

    def _frames(self, clip: VideoClip) -> np.ndarray:
        resized_height, resized_width = self.frame_size(clip)
        frames = []
        for frame in clip.frames:
            frame = frame.convert("RGB")
            if frame.size != (resized_width, resized_height):
                frame = frame.resize((resized_width, resized_height), Image.BICUBIC)
            pixels = np.asarray(frame, dtype=np.float32).transpose(2, 0, 1) / 255.0
            frames.append((pixels - self.mean) / self.std)
        if pad := -len(frames) % self.temporal:
            frames += [frames[-1]] * pad
        return np.stack(frames)

    def _patchify(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        count, channels, height, width = frames.shape
        t, h, w = count // self.temporal, height // self.patch, width // self.patch
        m, p = self.merge, self.patch
        patches = frames.reshape(t, self.temporal, channels, h // m, m, p, w // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return torch.from_numpy(np.ascontiguousarray(patches).reshape(t * h * w, -1)), [t, h, w]

    def __call__(self, clips: list[VideoClip]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The tensors of `clips` and each one's token count."""
        if not clips:
            empty = {"pixel_values_videos": torch.zeros(0, self.empty_width), "video_grid_thw": torch.zeros(0, 3)}
            return {name: value.long() if name.endswith("thw") else value for name, value in empty.items()}, []
        patches, grids = zip(*(self._patchify(self._frames(clip)) for clip in clips))
        grid = torch.tensor(grids, dtype=torch.long)
        tensors = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": grid}
        if self.timed:
            tensors["second_per_grid_ts"] = torch.tensor([self.temporal / clip.fps for clip in clips])
        return tensors, (grid.prod(-1) // self.merge**2).tolist()
