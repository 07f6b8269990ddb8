"""Padding-free flash attention for packed DPO rows (`model.attn_implementation: varlen`).

A packed row holds, per pair, prompt | chosen | rejected. Flattened without padding, every pair gives two
variable-length causal sequences: queries prompt+chosen over keys prompt+chosen, and queries rejected over keys
prompt+rejected (the prompt's keys gathered a second time). Causal attention aligned to the last key (flash
attention's rule when there are more keys than queries) lets each rejected token see the whole prompt and the
rejected tokens up to itself, never the chosen answer: the same rule as the block mask of `packed_rows`, without a
mask or padding. The kernel is PyTorch's `varlen_attn` (CUDA); on CPU the same layout runs through SDPA per
sequence, which is what the tests compare. The native Qwen-VL takes the layout as its attention mask; the
transformers families get it through `hf_vlm.varlen_attention`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class VarlenLayout:
    """Where the packed rows' tokens go: `tokens` (flat indices of the R x W rows' non-padding tokens, in row
    order) are the queries, cut into sequences at `cu_q`; `keys` (indices into `tokens`) are the keys, cut at
    `cu_k`."""

    tokens: torch.Tensor
    keys: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    rows: int
    width: int

    def to(self, device: torch.device) -> VarlenLayout:
        """The same layout with its index tensors on `device`."""
        moved = {name: getattr(self, name).to(device) for name in ("tokens", "keys", "cu_q", "cu_k")}
        return VarlenLayout(**moved, max_q=self.max_q, max_k=self.max_k, rows=self.rows, width=self.width)


def layout_from_segments(owner: torch.Tensor, segment: torch.Tensor) -> VarlenLayout:
    """The layout of packed rows whose token `owner` (pair, -1 pad) and `segment` (0 prompt, 1 chosen, 2 rejected)
    are given per position [R, W]; a pair's tokens are consecutive, in prompt, chosen, rejected order."""
    rows, width = owner.shape
    flat_owner, flat_segment = owner.reshape(-1), segment.reshape(-1)
    tokens = torch.nonzero(flat_owner >= 0).squeeze(1)
    _, spans = torch.unique_consecutive(flat_owner[tokens], return_counts=True)
    pair_of = torch.repeat_interleave(torch.arange(spans.numel()), spans)
    parts = torch.bincount(pair_of * 3 + flat_segment[tokens], minlength=3 * spans.numel()).view(-1, 3)
    keys: list[torch.Tensor] = []
    q_lengths: list[int] = []
    k_lengths: list[int] = []
    for at, (prompt, chosen, rejected) in zip((spans.cumsum(0) - spans).tolist(), parts.tolist()):
        keys.append(torch.arange(at, at + prompt + chosen))  # prompt+chosen: its own keys
        q_lengths.append(prompt + chosen)
        k_lengths.append(prompt + chosen)
        if rejected:  # rejected: the prompt's keys again, then its own
            keys += [torch.arange(at, at + prompt), torch.arange(at + prompt + chosen, at + prompt + chosen + rejected)]
            q_lengths.append(rejected)
            k_lengths.append(prompt + rejected)
    return VarlenLayout(
        tokens=tokens,
        keys=torch.cat(keys),
        cu_q=torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32),
        cu_k=torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32),
        max_q=max(q_lengths),
        max_k=max(k_lengths),
        rows=rows,
        width=width,
    )


def _reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout, scale: float | None
) -> torch.Tensor:
    """The kernel's rule with SDPA, one sequence at a time: causal, aligned to the last key."""
    out = []
    bounds_q, bounds_k = layout.cu_q.tolist(), layout.cu_k.tolist()
    if q.size(1) != k.size(1):  # grouped-query heads (SDPA's enable_gqa needs torch >= 2.5)
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        lq, lk = q1 - q0, k1 - k0
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        seq = [t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1])]  # [1, H, L, D]
        attended = F.scaled_dot_product_attention(*seq, attn_mask=allowed, scale=scale)
        out.append(attended[0].transpose(0, 1))
    return torch.cat(out)


def constructible(attn_implementation: str) -> str:
    """The attention name transformers accepts when a model is built: `varlen` is ours, so such a model is built
    with `sdpa` (what it uses outside packed rows) and `config._attn_implementation` is set to `varlen` after."""
    return "sdpa" if attn_implementation == "varlen" else attn_implementation


_KERNEL: dict = {}  # "fn": the probed CUDA kernel (a plain dict, which torch.compile reads without a break)
FLASH_DTYPES = (torch.bfloat16, torch.float16)


def kernel_for(varlen_attn: Callable) -> Callable:
    """`varlen_attn` called causally with an optional scale and grouped-query heads, whichever of its spellings this
    torch has: `is_causal` (2.10) or `window_size`; `scale` and `enable_gqa` where it takes them (else the scale is
    folded into the queries and the key/value heads are repeated)."""
    accepted = inspect.signature(varlen_attn).parameters
    # plain constants, decided here: the closure below is traced by torch.compile
    causal = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    takes_scale, takes_gqa = "scale" in accepted, "enable_gqa" in accepted

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        options = dict(causal)
        if scale is not None:
            if takes_scale:
                options["scale"] = scale
            else:
                q = q * (scale * q.size(-1) ** 0.5)
        if k.size(1) != q.size(1):
            if takes_gqa:
                options["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    return kernel


def _cuda_kernel() -> Callable:
    """PyTorch's varlen_attn through `kernel_for`, after a one-time probe that its causal rule is aligned to the
    last key (else this layout would be wrong)."""
    if "fn" in _KERNEL:
        return _KERNEL["fn"]
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise RuntimeError(
            f"model.attn_implementation varlen needs torch.nn.attention.varlen (torch >= 2.10): {err}"
        ) from err
    kernel = kernel_for(varlen_attn)
    q = torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(2, 1, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.tensor([0.0, 1.0], device="cuda", dtype=torch.bfloat16).view(2, 1, 1).expand(2, 1, 64).contiguous()
    cu_q, cu_k = (torch.tensor(c, device="cuda", dtype=torch.int32) for c in ([0, 1], [0, 2]))
    seen = kernel(q, k, v, cu_q, cu_k, 1, 2)[0, 0, 0].item()  # 0.5: sees both keys (aligned to the last key)
    if abs(seen - 0.5) > 1e-2:
        raise RuntimeError("varlen_attn's causal rule is aligned to the first key here; use flex_attention or sdpa")
    _KERNEL["fn"] = kernel
    return kernel


def prepare_kernel(device: torch.device) -> None:
    """Probe the CUDA kernel once on `device`'s kind before the forward, so that the probe (a host sync) never runs
    inside a compiled decoder block."""
    if torch.device(device).type == "cuda":
        _cuda_kernel()


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VarlenLayout,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention [R, H, W, D] of packed rows through their `layout` (padding positions come back as zeros); `k`
    and `v` may have fewer heads than `q` (grouped-query attention); `scale` defaults to 1/sqrt(D)."""
    if dropout:
        raise ValueError("varlen attention does not support attention dropout; set attn_dropout_prob to 0")
    rows, heads, width, dim = q.shape
    back = q.dtype if q.is_cuda and q.dtype not in FLASH_DTYPES else None  # cast back to it at the end
    if back is not None:
        q, k, v = _flash_inputs(q, k, v)
    queries = q.transpose(1, 2).reshape(rows * width, heads, dim)[layout.tokens]
    key_tokens = layout.tokens[layout.keys]  # one gather of the keys (and one scatter in the backward)
    keys, values = (t.transpose(1, 2).reshape(rows * width, t.size(1), dim)[key_tokens] for t in (k, v))
    if q.is_cuda and q.dtype in FLASH_DTYPES:
        kernel = _cuda_kernel()
        out = kernel(queries, keys, values, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scale)
    else:
        out = _reference_varlen(queries, keys, values, layout, scale)
    full = out.new_zeros(rows * width, heads, dim).index_copy(0, layout.tokens, out)
    full = full.view(rows, width, heads, dim).transpose(1, 2)
    return full if back is None else full.to(back)


def _flash_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fp32 q/k/v on CUDA (fp32 weights under bf16 autocast: the rotary keeps fp32) in autocast's dtype, which
    the flash kernel takes; without autocast there is no half dtype to use, so that is refused."""
    if not torch.is_autocast_enabled("cuda"):
        raise RuntimeError(
            f"model.attn_implementation varlen on CUDA needs bf16 or fp16 (model.dtype); got {q.dtype} without autocast"
        )
    dtype = torch.get_autocast_dtype("cuda")
    return tuple(t.to(dtype) for t in (q, k, v))
