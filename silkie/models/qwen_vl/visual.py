"""Qwen-VL-Chat vision tower: ViT-bigG-style encoder + 256-query cross-attention resampler.

Parameter names follow the official checkpoint (`transformer.visual.*`).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .configuration import QWenConfig


def resize_abs_pos(abs_pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a square [N, D] position table to `num_tokens` rows (bicubic, fp32), as the original."""
    src = int(math.sqrt(abs_pos.size(0)))
    tgt = int(math.sqrt(num_tokens))
    if src == tgt:
        return abs_pos
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE-style 2-D sin-cos table [grid*grid, D]: first half columns, second half rows (fp32)."""
    coords = np.arange(grid_size, dtype=np.float32)
    cols, rows = np.meshgrid(coords, coords)  # cols varies fastest: token t -> column t % g, row t // g

    def encode(positions: np.ndarray, dim: int) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([encode(cols, embed_dim // 2), encode(rows, embed_dim // 2)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


class VisualAttention(nn.Module):
    """ViT block self-attention; the fused projection is grouped per head as [q_h | k_h | v_h]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        mixed = self.in_proj(x).view(batch, length, self.heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class VisualBlock(nn.Module):
    """Pre-LN transformer block of the vision tower (exact GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        mlp_width = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, width))]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """Stack of vision blocks (`resblocks`)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList([VisualBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ResamplerAttention(nn.Module):
    """Multi-head cross-attention with `nn.MultiheadAttention`'s parameter names and packed [Q; K; V] projection.

    Written out (instead of `nn.MultiheadAttention`) so every weight is used inside its own module's
    forward, which DeepSpeed ZeRO-3 needs to gather partitioned parameters.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        batch, dim = q.size(0), q.size(-1)
        q, k, v = (t.view(batch, -1, self.num_heads, dim // self.num_heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, -1, dim))


class Resampler(nn.Module):
    """One cross-attention from `n_queries` learned queries to the patch features (no residual, no MLP)."""

    def __init__(self, grid_size: int, embed_dim: int, kv_dim: int):
        super().__init__()
        self.num_queries = grid_size**2
        here = torch.empty(0).device  # honours a `with torch.device(...)` context, unlike from_numpy
        table = sincos_pos_embed_2d(embed_dim, grid_size).to(dtype=torch.get_default_dtype(), device=here)
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, embed_dim // 128)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))
        pos_embed = resize_abs_pos(self.pos_embed, x.size(1)).to(kv.dtype)
        q = self.ln_q(self.query)
        queries = (q + self.pos_embed.to(q.dtype)).unsqueeze(0).expand(x.size(0), -1, -1)
        return self.attn(queries, kv + pos_embed.unsqueeze(0), kv)


class VisionTransformer(nn.Module):
    """Qwen-VL vision tower: pixels [N, 3, S, S] -> image features [N, n_queries, hidden]."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        vis = config.visual
        width, patch = int(vis["width"]), int(vis["patch_size"])
        output_dim, n_queries = int(vis["output_dim"]), int(vis.get("n_queries", 256))
        self.image_size = int(vis["image_size"])
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = VisualTransformer(width, int(vis["layers"]), int(vis["heads"]), float(vis["mlp_ratio"]))
        self.attn_pool = Resampler(int(math.sqrt(n_queries)), output_dim, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(output_dim, output_dim))

    @property
    def num_queries(self) -> int:
        """Image tokens produced per image (the span between `<img>` and `</img>`)."""
        return self.attn_pool.num_queries

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode preprocessed images; pixels are cast to the tower's weight dtype."""
        x = pixel_values.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, patches, width], row-major patches
        x = x + resize_abs_pos(self.positional_embedding, x.size(1))
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj
