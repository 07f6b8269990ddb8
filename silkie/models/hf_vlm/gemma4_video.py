"""Gemma 4 video without torchvision: frames as `Gemma4VideoProcessor` makes them and ids as
`Gemma4Processor.replace_video_token` writes them.

Every sampled frame is resized at its aspect ratio to fill at most the video budget (the folder's video
`max_soft_tokens`, 70 in the releases) x 9 patches, rescaled to [0, 1] (Gemma's tower normalises pixels itself),
patchified and padded as an image is, through the PIL image processor (bicubic; transformers' torchvision resize can
differ by interpolation rounding: sizes, patches and token counts are the same). A video's marker becomes, per
frame, its time as `mm:ss` + ` <|image>` + the frame's soft tokens (`<|video|>`) + `<image|>`, the frames joined by
spaces; the first time is tokenized with the prompt text before the marker, as the processor's whole-text
tokenization does. The tower's frames go in as `pixel_values_videos` + `video_position_ids`, split per video by
`num_frames_per_video`.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from silkie.models.family import VideoClip

from .text_led import TextLedIds, ids_after
from .video import folder_video_configs, processed_frames

FRAME_COUNTS = "num_frames_per_video"  # batch key (the model's argument): [N_video] frames per video
VIDEO_SOFT_TOKENS = 70  # Gemma4VideoProcessor's default budget per frame
LONGEST_TIME = 999 * 60 + 59  # the widest `mm:ss` written (from 100 minutes on the minutes take a third digit)


def frame_time(seconds: float) -> str:
    """A frame's time as `Gemma4Processor` writes it: whole minutes and seconds, two digits each."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


class Gemma4Videos:
    """`VideoClip`s -> `pixel_values_videos` [F, P, 3 * patch^2] + `video_position_ids` [F, P, 2] (every video's
    frames, in video order) + `num_frames_per_video` [N], and per video the ids that replace its marker (a
    `TextLedIds`)."""

    def __init__(self, processor: Any, model_config: Any, section: Any):
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        self.marker_id = model_config.video_token_id
        self.start_id, self.end_id = model_config.boi_token_id, model_config.eoi_token_id
        settings = next(iter(folder_video_configs(section.path)), {})
        image = self.image_processor
        self.frame_kwargs = {
            "patch_size": int(settings.get("patch_size", image.patch_size)),
            "pooling_kernel_size": int(settings.get("pooling_kernel_size", image.pooling_kernel_size)),
            "max_soft_tokens": int(settings.get("max_soft_tokens", VIDEO_SOFT_TOKENS)),
        }
        self.patches = self.frame_kwargs["max_soft_tokens"] * self.frame_kwargs["pooling_kernel_size"] ** 2
        self.width = 3 * self.frame_kwargs["patch_size"] ** 2
        self._texts: dict[tuple[bool, str], list[int]] = {}

    def _text(self, after_frame: bool, text: str) -> list[int]:
        """The ids of a time's text in place: after the previous frame's `<image|>`, or (the first) on its own."""
        key = (after_frame, text)
        if key not in self._texts:
            self._texts[key] = ids_after(self.tokenizer, self.end_id if after_frame else None, text)
        return self._texts[key]

    def layout(self, times: list[float], per_frame: int) -> TextLedIds:
        """The ids that replace the marker of a video whose frames are at `times` (seconds), `per_frame` soft
        tokens each (the first time is tokenized with the prompt text before the marker when the collator expands
        it)."""
        ids: list[int] = []
        for index, seconds in enumerate(times):
            text = f"{' ' if index else ''}{frame_time(seconds)} "
            ids += [*self._text(bool(index), text), self.start_id, *[self.marker_id] * per_frame, self.end_id]
        first = f"{frame_time(times[0])} "
        return TextLedIds(ids, len(self._text(False, first)), first, self.tokenizer)

    def most_tokens(self, max_frames: int) -> int:
        """Most ids a video of at most `max_frames` frames takes (+1: joined with the text before, its first time
        can take one token more)."""
        widest = [float(LONGEST_TIME)] * max(max_frames, 1)
        return len(self.layout(widest, self.frame_kwargs["max_soft_tokens"])) + 1

    def slice_key(self) -> str:
        """What decides `most_tokens` (part of the tokenization cache's key)."""
        return f"gemma4 frames {json.dumps(self.frame_kwargs, sort_keys=True)}, {len(self.layout([0.0], 0))} ids"

    def fingerprint(self) -> str:
        """The settings that decide a frame's pixels and a video's ids."""
        return f"gemma4 video {json.dumps(self.frame_kwargs, sort_keys=True)}, times as mm:ss"

    def empty(self) -> dict[str, torch.Tensor]:
        """The tensors of a batch without video."""
        return {
            "pixel_values_videos": torch.zeros(0, self.patches, self.width),
            "video_position_ids": torch.zeros(0, self.patches, 2, dtype=torch.long),
            FRAME_COUNTS: torch.zeros(0, dtype=torch.long),
        }

    def __call__(self, clips: list[VideoClip]) -> tuple[dict[str, torch.Tensor], list[TextLedIds]]:
        """The tensors of `clips` and each one's ids."""
        if not clips:
            return self.empty(), []
        out, counts = processed_frames(self.image_processor, clips, self.frame_kwargs)
        tensors = {
            "pixel_values_videos": out["pixel_values"],
            "video_position_ids": out["image_position_ids"],
            FRAME_COUNTS: torch.tensor(counts, dtype=torch.long),
        }
        firsts = torch.tensor([0, *counts[:-1]]).cumsum(0).tolist()  # each video's first frame
        per_frame = [int(out["num_soft_tokens_per_image"][first]) for first in firsts]
        return tensors, [self.layout(clip.frame_times(), n) for clip, n in zip(clips, per_frame)]
