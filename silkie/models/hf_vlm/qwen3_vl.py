"""Qwen3-VL (dense: `Qwen3VLForConditionalGeneration`; mixture of experts: `Qwen3VLMoeForConditionalGeneration`)
behind `ModelFamily`.

Qwen2-VL's interface (the same image processor: pictures of any size within the pixel bounds, `pixel_values`
patches + `image_grid_thw`; 3-D M-RoPE positions from the model's `get_rope_index`) with two differences:
- DeepStack: the tower also hands features of some of its inner blocks (`deepstack_visual_indexes`) to the first
  decoder layers, which add them at the image tokens. A feature computed once per step therefore carries the
  merged output and those per-layer features; the shared-prompt rows and the cached reference put both back.
- Video (`Qwen3VLVideos`): the frames of a clip are sized together against its pixel budget (transformers'
  Qwen3-VL `smart_resize`), and each temporal patch is a `<t seconds>` text and a vision span of its own, as
  `Qwen3VLProcessor` lays it out: the template's one `<|vision_start|><|video_pad|><|vision_end|>` per video
  becomes the bare marker at tokenization, which the collator replaces by those ids.
The MoE variant (Qwen3-VL-30B-A3B, 235B-A22B) has the same tower, template and positions; its decoder layers route
each token to `num_experts_per_tok` of `num_experts` experts, whose weights are 3-D parameters (no linear layers:
LoRA reaches them through `lora.target_parameters`), and its routers get TRL's load-balancing loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from silkie.models.family import VideoClip

from .expert_layout import write_release_layout
from .family import Qwen2VLFamily
from .text_led import TextLedIds
from .video import DEFAULT_VIDEO_MAX_TOKENS, DEFAULT_VIDEO_MIN_TOKENS, Qwen2VLVideos, folder_video_bounds


class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL: Qwen2-VL's images and positions, plus the DeepStack features of the tower's inner blocks."""

    class_names = ("Qwen3VLForConditionalGeneration",)
    vision_lora_pattern = r"model\.visual\.blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.linear_fc[12])"
    video_span_collapsed = True
    video_frame_spread = "linspace"  # first to last frame, as Qwen3VLVideoProcessor.sample_frames

    def freeze_vision(self, model: nn.Module, keep_projector: bool = False) -> None:
        visual = model.model.visual
        visual.requires_grad_(False)
        if keep_projector:  # the merger and the DeepStack mergers project the tower into the LLM
            visual.merger.requires_grad_(True)
            visual.deepstack_merger_list.requires_grad_(True)

    def split_features(self, out: Any) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Per image / video: (merged features, its DeepStack features, one per injected decoder layer)."""
        per_layer = [tuple(layer) for layer in out.deepstack_features]
        return [(merged, tuple(layer[i] for layer in per_layer)) for i, merged in enumerate(out.pooler_output)]

    def encoder_outputs(self, picked: list, kind: str) -> dict:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        layers = len(picked[0][1])
        output = BaseModelOutputWithDeepstackFeatures(
            pooler_output=[merged for merged, _ in picked],
            deepstack_features=[[deep[layer] for _, deep in picked] for layer in range(layers)],
        )
        return {kind: output}

    def make_videos(self, processor: Any, model_config: Any, section: Any) -> Qwen3VLVideos:
        return Qwen3VLVideos(processor.image_processor, model_config, section, processor.tokenizer)

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        # the DeepStack mergers too: a rank's blank pass must gather (ZeRO-3) and reduce the same parameters
        out = self.blank_tower_output(base)
        return torch.cat([*out.pooler_output, *(part for layer in out.deepstack_features for part in layer)])


class RoutedExperts:
    """The mixture-of-experts half of a Qwen MoE family (mixed in before its dense family): each decoder layer's
    `mlp.gate` routes tokens to its experts, whose weights are 3-D parameters (LoRA reaches them through
    `lora.target_parameters`), and the routers get TRL's load-balancing loss."""

    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # the experts: lora.target_parameters

    def routers(self, base: nn.Module) -> list[nn.Module]:
        return [layer.mlp.gate for layer in self.decoder_layers(base) if hasattr(layer.mlp, "experts")]

    def router_aux_loss_coef(self, base: nn.Module) -> float:
        return float(base.config.text_config.router_aux_loss_coef)

    def router_top_k(self, base: nn.Module) -> int:
        return int(base.config.text_config.num_experts_per_tok)

    def row_kwargs(self, base: nn.Module, input_ids: torch.Tensor) -> dict:
        # a checkpoint saved with `output_router_logits: true` would have transformers compute its own balancing
        # loss from the attention mask, which packed rows give as a 4-D block mask (it fails there); ours is
        # computed from the routers' logits over TRL's tokens (`dpo.router_aux_loss_coef`)
        return {**super().row_kwargs(base, input_ids), "output_router_logits": False}


class Qwen3VLMoeFamily(RoutedExperts, Qwen3VLFamily):
    """Qwen3-VL MoE: Qwen3-VL's interface with routed experts; the experts are saved in the release's layout."""

    class_names = ("Qwen3VLMoeForConditionalGeneration",)

    def finish_saved_folder(self, folder: str) -> None:
        write_release_layout(folder)


class Qwen3VLVideos(Qwen2VLVideos):
    """`VideoClip`s -> `pixel_values_videos` + `video_grid_thw`, and for each video the ids that replace its marker:
    per temporal patch `<t seconds>` (the mean time of its frames, one decimal) + `<|vision_start|>` + its feature
    tokens + `<|vision_end|>`, as `Qwen3VLProcessor.replace_video_token` writes it.

    Frame sizes follow transformers' Qwen3-VL video processor with qwen-vl-utils' per-frame cap: all frames of a
    clip get one size within the clip's budget. The recipe's `model.video_min_pixels` / `video_max_pixels` bound a
    frame (the budget is then that many pixels per frame); left out, the folder's video config gives the clip's
    budget (`size`: shortest / longest edge, in pixels over all frames), each frame at most `max_video_tokens`
    tokens of it (768), else 128..768 tokens per frame.
    """

    def __init__(self, image_processor: Any, model_config: Any, section: Any, tokenizer: Any):
        super().__init__(image_processor, model_config, section)
        self.start_id, self.end_id = model_config.vision_start_token_id, model_config.vision_end_token_id
        self.tokenizer = tokenizer
        # ids a temporal patch adds beside its features: the vision span's two and the longest timestamp (< 28 h)
        self.patch_overhead = 2 + len(self._ids(_timestamp(99999.9)))

    def frame_bounds(self, section: Any) -> tuple[int, int]:
        """(fewest, most) pixels of a frame: the recipe's, else 128..768 tokens; also sets the clip's budget (pixels
        over all its frames) from the folder's video config when the recipe bounds no frame."""
        unit = (self.patch * self.merge) ** 2
        recipe = section.video_min_pixels is not None or section.video_max_pixels is not None
        self.clip_floor, self.clip_budget = (None, None) if recipe else folder_video_bounds(section.path)
        most = section.video_max_pixels or DEFAULT_VIDEO_MAX_TOKENS * unit  # the frame cap
        return section.video_min_pixels or min(DEFAULT_VIDEO_MIN_TOKENS * unit, most), most

    def fingerprint(self) -> str:
        clip = f"clip {self.clip_floor}-{self.clip_budget} px"
        return f"{super().fingerprint()}, {clip}, timestamps joined to the text before"

    def most_tokens(self, max_frames: int) -> int:
        """Most ids a video of at most `max_frames` sampled frames takes: per temporal patch its feature tokens, the
        vision span's two and the longest timestamp (`patch_overhead`); the largest over the frame counts, as the
        clip budget shrinks the frames of a longer clip."""
        unit, most = (self.patch * self.merge) ** 2, 0
        for frames in range(self.temporal, max(max_frames, self.temporal) + 1):
            patches = math.ceil(frames / self.temporal)
            most = max(most, patches * (self._frame_pixels(frames) // unit + self.patch_overhead))
        return most

    def slice_key(self) -> str:
        return f"{self.fingerprint()}; overhead {self.patch_overhead}"

    def _frame_pixels(self, frames: int) -> int:
        """Most pixels a frame of a `frames`-frame clip takes: the frame cap, or with the folder's clip budget
        qwen-vl-utils' share of it (at most the cap, at least 1.05 x the clip floor)."""
        if self.clip_budget is None:
            return self.max_pixels
        return max(min(self.max_pixels, self.clip_budget // frames), int((self.clip_floor or 0) * 1.05))

    def frame_size(self, clip: VideoClip) -> tuple[int, int]:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        frames = max(len(clip.frames), self.temporal)  # a clip under one temporal patch is padded to one
        per_frame = self._frame_pixels(frames)
        floor = self.clip_floor if self.clip_floor is not None else self.min_pixels * frames
        width, height = clip.frames[0].size
        return smart_resize(
            frames, height, width, temporal_factor=self.temporal, factor=self.patch * self.merge,
            min_pixels=floor, max_pixels=per_frame * frames,
        )  # fmt: skip

    def __call__(self, clips: list[VideoClip]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        tensors, counts = super().__call__(clips)
        layouts = []
        for clip, grid, count in zip(clips, tensors["video_grid_thw"].tolist(), counts):
            per_patch = count // grid[0]
            ids: list[int] = []
            stamps = [_timestamp(seconds) for seconds in self._patch_times(clip, grid[0])]
            for stamp in stamps:
                ids += [*self._ids(stamp), self.start_id, *[self.marker_id] * per_patch, self.end_id]
            # the first timestamp is tokenized with the prompt text before the marker (a space then `<`: ` <`)
            layouts.append(TextLedIds(ids, ids.index(self.start_id), stamps[0], self.tokenizer))
        return tensors, layouts

    def _patch_times(self, clip: VideoClip, patches: int) -> list[float]:
        """The time of each temporal patch: the mean of its first and last frame's (the last frame repeated to fill
        the final patch), as `Qwen3VLProcessor._calculate_timestamps`."""
        times = clip.frame_times()
        times += [times[-1]] * (patches * self.temporal - len(times))
        return [(times[i] + times[i + self.temporal - 1]) / 2 for i in range(0, patches * self.temporal, self.temporal)]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _timestamp(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"
