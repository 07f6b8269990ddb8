"""Qwen3.5 (dense: `Qwen3_5ForConditionalGeneration`, Qwen3.5-0.8B .. 27B; mixture of experts:
`Qwen3_5MoeForConditionalGeneration`, Qwen3.5-35B-A3B .. 397B-A17B) behind `ModelFamily`.

Qwen3-VL's interface (the same processor, `Qwen3VLProcessor`: images of any size within the pixel bounds, videos as
timestamped temporal patches; 3-D M-RoPE positions from the model's `get_rope_index`) without DeepStack, and a
hybrid language model: of every four decoder layers three are linear attention (gated DeltaNet, a recurrence with a
short causal convolution) and one is gated full attention. Packed rows give the attention layers the block mask
and the linear-attention layers a `RecurrentRows` (each answer continues from its prompt's state:
`linear_attention.py`). The MoE variant routes each token to `num_experts_per_tok` experts plus a shared expert;
its routers get TRL's load-balancing loss, its experts LoRA through `lora.target_parameters`.
"""

from __future__ import annotations

import torch
from torch import nn

from .family import Qwen2VLFamily
from .linear_attention import recurrent_rows, take_packed_rows
from .qwen3_vl import Qwen3VLFamily, RoutedExperts

# the linear-attention layers' projections: qkv (into the convolution), the output gate z, beta b, decay a, out
LINEAR_ATTENTION_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


class Qwen3_5Family(Qwen3VLFamily):
    """Qwen3.5: Qwen3-VL's images, videos and positions (no DeepStack features); a mask per layer kind for the
    packed rows (the block mask for attention, `RecurrentRows` for linear attention)."""

    class_names = ("Qwen3_5ForConditionalGeneration",)
    default_lora_targets = (*Qwen2VLFamily.default_lora_targets, *LINEAR_ATTENTION_TARGETS)

    # no DeepStack: the tower's merged output is all it hands the language model
    freeze_vision = Qwen2VLFamily.freeze_vision
    split_features = Qwen2VLFamily.split_features
    encoder_outputs = Qwen2VLFamily.encoder_outputs
    blank_image_features = Qwen2VLFamily.blank_image_features

    def attention_masks(
        self,
        base: nn.Module,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict:
        """Packed rows: the block mask for the attention layers, their sequences for the linear-attention ones;
        concatenated rows: the padding mask, from which the model builds both."""
        if segments is None:
            return mask
        take_packed_rows(base)  # once per model, whoever loaded it (the family, or transformers' Auto classes)
        width = base.config.get_text_config().linear_conv_kernel_dim
        rows = recurrent_rows(*segments, width)  # cut on the host, where the segments are, then copied over once
        return {"full_attention": mask, "linear_attention": rows.to(mask.device)}


class Qwen3_5MoeFamily(RoutedExperts, Qwen3_5Family):
    """Qwen3.5 MoE: Qwen3.5's interface with routed experts (and a shared expert beside them in each layer)."""

    class_names = ("Qwen3_5MoeForConditionalGeneration",)
    # the routed experts are 3-D weights (lora.target_parameters); the MLP names reach the shared expert
    default_lora_targets = Qwen3_5Family.default_lora_targets
