"""Qwen3-VL (dense: `Qwen3VLForConditionalGeneration`) behind `ModelFamily`.

Qwen2-VL's interface (the same image processor: pictures of any size within the pixel bounds, `pixel_values`
patches + `image_grid_thw`; 3-D M-RoPE positions from the model's `get_rope_index`) with two differences:
- DeepStack: the tower also hands features of some of its inner blocks (`deepstack_visual_indexes`) to the first
  decoder layers, which add them at the image tokens. A feature computed once per step therefore carries the
  merged output and those per-layer features; the shared-prompt rows and the cached reference put both back.
- Video: Qwen3-VL writes a timestamp text before each frame group, so a video is not one run of placeholder
  tokens; Silkie does not feed it video (such pairs are dropped as `video_unsupported`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .family import Qwen2VLFamily


class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL: Qwen2-VL's images and positions, plus the DeepStack features of the tower's inner blocks."""

    class_names = ("Qwen3VLForConditionalGeneration",)
    vision_lora_pattern = r"model\.visual\.blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.linear_fc[12])"

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

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        # the DeepStack mergers too: a rank's blank pass must gather (ZeRO-3) and reduce the same parameters
        out = self.blank_tower_output(base)
        return torch.cat([*out.pooler_output, *(part for layer in out.deepstack_features for part in layer)])
