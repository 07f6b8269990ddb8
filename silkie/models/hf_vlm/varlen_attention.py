"""`model.attn_implementation: varlen` for the transformers families (Qwen2-VL, Qwen2.5-VL, LLaVA).

The language model's attention is registered with transformers' `AttentionInterface` under `varlen`: given a
`varlen_layout` keyword (the packed rows' `VarlenLayout`, passed down through the model's attention kwargs) it is
the padding-free kernel of `models.varlen`; without one (generation, the plain path) it is transformers' SDPA, with
SDPA's masks (registered for `varlen` too). The packed rows' dense block mask goes in as the attention mask beside
the layout (a 4-D mask is taken as given, so nothing is built per forward), so that a call the layout does not
reach would still attend correctly. The vision tower keeps SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import varlen

NAME = "varlen"
LAYOUT_KEY = "varlen_layout"


def hf_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    varlen_layout: varlen.VarlenLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function signature ([B, H, L, D] in, [B, L, H, D] out). With a layout the mask
    (the packed rows' dense block mask, passed too so that any call without the layout stays right) is not used."""
    if kwargs.get("sliding_window") is not None:
        raise ValueError("model.attn_implementation varlen: sliding-window attention layers are not supported")
    if varlen_layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = varlen.varlen_attention(query, key, value, varlen_layout, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `varlen` an attention implementation transformers accepts (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, hf_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_varlen(model: nn.Module) -> None:
    """Switch the language model of a loaded transformers VLM to `varlen` attention (the vision tower keeps its
    own)."""
    register()
    model.set_attn_implementation({"text_config": NAME})


def uses_varlen(model: nn.Module) -> bool:
    """Whether the language model of `model` runs `varlen` attention."""
    return getattr(model.config.get_text_config(), "_attn_implementation", None) == NAME
