"""LLM attention pieces of Qwen-VL-Chat: rotary embedding (with dynamic NTK), masks, SDPA/eager kernels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import varlen


def ntk_alpha_for_length(length: int, seq_length: int) -> float:
    """Dynamic-NTK scale of the original: 1 up to `seq_length`, then 3, 7, 15, ... per doubling."""
    context_value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


class QWenRotaryEmbedding(nn.Module):
    """Non-interleaved RoPE over the whole head; `ntk_alpha` is module state as in the original."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.ntk_alpha = 1.0

    def forward(self, position_ids: torch.Tensor, ntk_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, L, dim] in fp32 for integer positions [B, L]."""
        base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
        exponent = torch.arange(0, self.dim, 2, device=position_ids.device, dtype=torch.float32) / self.dim
        inv_freq = 1.0 / (base**exponent)
        angles = position_ids.float().unsqueeze(-1) * inv_freq
        emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x2, x1] for the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, L, D] in fp32 and cast back, as the original; in x's dtype when cos/sin are in it."""
    if cos.dtype == x.dtype:
        return x * cos + rotate_half(x) * sin
    x_float = x.float()
    return (x_float * cos + rotate_half(x_float) * sin).type_as(x)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Per-position query scale ln(p+1)/ln(seq_length) for p >= seq_length, else 1; shape [B, 1, L, 1]."""
    scale = torch.log(positions.float() + 1) / math.log(seq_length)
    scale = torch.where(positions + 1 > seq_length, scale, torch.ones_like(scale))
    return scale.unsqueeze(1).unsqueeze(-1)


def build_bool_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask [B, 1, Q, K] (True = attend): causal + key padding, or a 4-D custom mask as given."""
    key_length = past_length + query_length
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask.to(device)
        return attention_mask.to(device) == 0  # additive float mask: 0 keeps
    keys = torch.arange(key_length, device=device)
    queries = torch.arange(past_length, key_length, device=device)
    allowed = (keys[None, :] <= queries[:, None])[None, None].expand(batch, 1, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :key_length].to(device=device, dtype=torch.bool)
    return allowed


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive float mask [B, 1, Q, K] (0 keep, finfo.min drop), or None when plain causal suffices.

    `attention_mask` may be 2-D (1 keep / 0 pad over all K keys) or a 4-D custom mask
    ([B, 1, Q, K]; bool True = attend, or additive float) which is used as given.
    """
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
        return attention_mask.to(dtype)
    is_custom = attention_mask is not None and attention_mask.dim() == 4
    no_padding = attention_mask is None or (not is_custom and bool(attention_mask.all()))
    if no_padding and (past_length == 0 or query_length == 1):
        return None
    batch = attention_mask.size(0)
    allowed = build_bool_mask(attention_mask, query_length, past_length, batch, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def build_flex_block_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, batch: int, device: torch.device
):
    """flex-attention BlockMask for the same rule (blocks that are fully masked are skipped by the kernel)."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = build_bool_mask(attention_mask, query_length, past_length, batch, device)[:, 0]

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, None, query_length, past_length + query_length, device=device)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention; causal when no explicit mask is given and Q == K."""
    is_causal = mask is None and q.size(2) == k.size(2) and q.size(2) > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float = 0.0
) -> torch.Tensor:
    """Reference implementation: explicit scores, additive mask, softmax, weighted sum."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    if mask is None and q.size(2) == k.size(2) and q.size(2) > 1:
        causal = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)


_COMPILED_FLEX = {}


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout: float = 0.0) -> torch.Tensor:
    """PyTorch flex attention with a BlockMask (compiled on GPU; the unfused reference on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if dropout:
        raise ValueError("flex_attention does not support attention dropout; set attn_dropout_prob to 0")
    if q.is_cuda:
        if "fn" not in _COMPILED_FLEX:
            _COMPILED_FLEX["fn"] = torch.compile(flex, dynamic=False)
        flex = _COMPILED_FLEX["fn"]
    return flex(q, k, v, block_mask=mask)


def packed_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout: float = 0.0
) -> torch.Tensor:
    """Varlen attention when the mask is a `VarlenLayout` (packed DPO rows); SDPA for any other mask (generation)."""
    if isinstance(mask, varlen.VarlenLayout):
        return varlen.varlen_attention(q, k, v, mask, dropout)
    return sdpa_attention(q, k, v, mask, dropout)


ATTENTION_FUNCTIONS = {
    "sdpa": sdpa_attention,
    "eager": eager_attention,
    "flex_attention": flex_attention,
    "varlen": packed_varlen_attention,
}
