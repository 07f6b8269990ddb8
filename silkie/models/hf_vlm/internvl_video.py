"""InternVL video without torchvision: frames as `InternVLVideoProcessor` makes them and ids as
`InternVLProcessor.replace_video_token` writes them.

Every sampled frame is one tile: resized whole to the tower's tile size (bicubic, through the PIL image processor;
transformers' torchvision resize can differ by interpolation rounding), rescaled and normalised with the folder's
video mean/std (the image processor's where the folder records none: InternVL normalises frames as images). A
video's marker becomes, per frame, `Frame{k}: ` + `<img>` + the frame's context tokens + `</img>`, the frames
joined by newlines; the first `Frame1: ` is tokenized together with the prompt text before the marker, as the
processor's whole-text tokenization does. Images and frames share one placeholder id, so the model fills them in
prompt order (the family interleaves their pixels or features by the batch's `media_kinds`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from silkie.models.family import VideoClip

from .text_led import TextLedIds, ids_after
from .video import folder_video_configs, processed_frames

FRAME_COUNTS = "video_frames"  # batch key: [N_video] frames per video (their rows of `pixel_values_videos`)
FIRST_FRAME = "Frame1: "


class InternVLVideos:
    """`VideoClip`s -> `pixel_values_videos` [F, 3, S, S] (every video's frames, in video order) + `video_frames`
    [N], and per video the ids that replace its marker (a `TextLedIds`)."""

    def __init__(self, processor: Any, model_config: Any, section: Any, per_frame: int):
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        self.marker_id = self.tokenizer.convert_tokens_to_ids(processor.video_token)
        self.context_id = model_config.image_token_id
        self.start_id, self.end_id = processor.start_image_token_id, processor.end_image_token_id
        self.per_frame = per_frame
        self._texts: dict[int, list[int]] = {}  # frame index -> its `Frame{k}: ` ids
        height, width = model_config.vision_config.image_size  # the only size whose token count the model makes
        settings = next(iter(folder_video_configs(section.path)), {})
        image = self.image_processor  # the folder records none: InternVL's own normalisation, the images' (ImageNet)
        self.frame_kwargs = {
            "crop_to_patches": False,
            "size": {"height": int(height), "width": int(width)},
            "image_mean": list(settings.get("image_mean", image.image_mean)),
            "image_std": list(settings.get("image_std", image.image_std)),
        }

    def _frame_text(self, index: int) -> list[int]:
        """The ids of frame `index`'s `Frame{k}: ` (after the previous frame's `</img>` and a newline), in place."""
        if index not in self._texts:
            text = f"\nFrame{index + 1}: " if index else FIRST_FRAME
            self._texts[index] = ids_after(self.tokenizer, self.end_id if index else None, text)
        return self._texts[index]

    def layout(self, frames: int) -> TextLedIds:
        """The ids that replace the marker of a `frames`-frame video (the first `Frame1: ` is tokenized with the
        prompt text before the marker when the collator expands it)."""
        ids: list[int] = []
        for index in range(frames):
            ids += [*self._frame_text(index), self.start_id, *[self.context_id] * self.per_frame, self.end_id]
        return TextLedIds(ids, len(self._frame_text(0)), FIRST_FRAME, self.tokenizer)

    def most_tokens(self, max_frames: int) -> int:
        """Most ids a video of at most `max_frames` frames takes (+1: joined with the text before, its first
        `Frame1: ` can take one token more)."""
        return len(self.layout(max(max_frames, 1))) + 1

    def slice_key(self) -> str:
        """What decides `most_tokens` (part of the tokenization cache's key)."""
        return f"internvl frames of {self.per_frame} tokens, {len(self.layout(1))} ids each"

    def fingerprint(self) -> str:
        """The settings that decide a frame's pixels and a video's ids."""
        return f"internvl video {json.dumps(self.frame_kwargs, sort_keys=True)} x {self.per_frame} tokens"

    def empty(self) -> dict[str, torch.Tensor]:
        """The tensors of a batch without video."""
        size = self.frame_kwargs["size"]
        return {
            "pixel_values_videos": torch.zeros(0, 3, size["height"], size["width"]),
            FRAME_COUNTS: torch.zeros(0, dtype=torch.long),
        }

    def __call__(self, clips: list[VideoClip]) -> tuple[dict[str, torch.Tensor], list[TextLedIds]]:
        """The tensors of `clips` and each one's ids."""
        if not clips:
            return self.empty(), []
        out, counts = processed_frames(self.image_processor, clips, self.frame_kwargs)
        tensors = {"pixel_values_videos": out["pixel_values"], FRAME_COUNTS: torch.tensor(counts, dtype=torch.long)}
        return tensors, [self.layout(count) for count in counts]
