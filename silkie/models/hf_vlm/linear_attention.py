"""Packed rows through linear-attention layers (gated DeltaNet: Qwen3.5's token mixers between its attention layers).

A block mask cannot tell a recurrence that the rejected answer continues from the prompt and not from the chosen
answer before it in the row: the state after the chosen answer already holds it. For packed rows these layers run
each pair's prompt from a zero state, then each answer from its prompt's final state, its causal convolution
reading the prompt's last inputs before the answer's first; the outputs go back to the rows' places. Each answer
gets the numbers of its own unpacked row, and each prompt is computed once. Other inputs (concatenated rows,
generation) take the layer's own forward.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass
class RecurrentRows:
    """Where the sequences of packed rows are, as flat indices into the rows' tokens ([R * L]; -1 past an end):
    each pair's prompt tokens in order, each answer's (the B chosen, then the B rejected: answer i continues prompt
    i mod B), and the tokens a causal convolution reads besides the token itself (`taps`: j = 1 .. width-1 steps
    back in its own sequence; -1 before a prompt's start and on padding)."""

    prompts: torch.Tensor  # [B, longest prompt]
    answers: torch.Tensor  # [2B, longest answer]
    taps: torch.Tensor  # [width - 1, R * L]

    def to(self, device: torch.device | str) -> RecurrentRows:
        """The same indices on `device`."""
        return RecurrentRows(*(getattr(self, f.name).to(device) for f in fields(self)))


def recurrent_rows(owner: torch.Tensor, segment: torch.Tensor, conv_width: int = 4) -> RecurrentRows:
    """The `RecurrentRows` of packed rows from each token's pair (`owner`, -1 padding) and `segment` (0 prompt,
    1 chosen, 2 rejected, -1 padding), both [R, L]: a pair's tokens are consecutive in its row, prompt first; taps
    for a causal convolution `conv_width` wide. Built where the tensors are (on the host, the step cuts them without
    waiting for the device)."""
    owner, segment = owner.reshape(-1), segment.reshape(-1)
    real = torch.nonzero(segment >= 0).squeeze(1)  # flat order: pairs in order, each prompt | chosen | rejected
    pairs = int(owner.max()) + 1 if real.numel() else 0
    group = owner[real] * 3 + segment[real]  # (pair, segment), non-decreasing along `real`
    counts = torch.bincount(group, minlength=3 * pairs)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(real.numel(), device=real.device) - starts[group]  # place within its sequence
    longest = int(counts.max()) if counts.numel() else 0
    grid = torch.full((3 * pairs, longest), -1, dtype=torch.long, device=owner.device)
    grid[group, rank] = real
    grid = grid.view(pairs, 3, longest)
    prompt_lengths = counts.view(pairs, 3)[:, 0]
    prompt_last = grid[:, 0].gather(1, (prompt_lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    previous = torch.full_like(owner, -1)
    previous[real] = torch.where(rank > 0, real - 1, -1)
    first_answers = rank.eq(0) & (segment[real] > 0)  # an answer's first token follows its prompt's last
    previous[real[first_answers]] = prompt_last[owner[real[first_answers]]]
    prompt_width = int(prompt_lengths.max()) if pairs else 0
    answer_width = int(counts.view(pairs, 3)[:, 1:].max()) if pairs else 0
    steps, back = [], torch.arange(previous.numel(), device=previous.device)
    for _ in range(conv_width - 1):  # j steps back: the token before the one j - 1 steps back
        back = torch.where(back >= 0, previous[back.clamp(min=0)], back)
        steps.append(back)
    return RecurrentRows(
        prompts=grid[:, 0, :prompt_width],
        answers=torch.cat([grid[:, 1, :answer_width], grid[:, 2, :answer_width]]),
        taps=torch.stack(steps) if steps else previous.new_zeros(0, previous.numel()),
    )


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] ([N, ...] -> [*index.shape, ...]), zero where index is -1 (no decay, no update, no read)."""
    picked = values[index.clamp(min=0)]
    keep = (index >= 0).view(*index.shape, *([1] * (values.dim() - 1)))
    return picked * keep.to(picked.dtype)


def _causal_conv(layer: nn.Module, mixed: torch.Tensor, rows: RecurrentRows) -> torch.Tensor:
    """The layer's depthwise causal convolution + activation over [N, C] token inputs, each token reading the ones
    before it in its own sequence (`RecurrentRows.taps`), as `causal_conv1d_fn` reads a row of its own: summed in
    fp32 and rounded once to the weights' dtype, as a convolution kernel accumulates."""
    weight = layer.conv1d.weight.squeeze(1)  # [C, width]: the last column weighs the token itself
    width = weight.size(-1)
    if rows.taps.size(0) != width - 1:
        raise ValueError(f"the rows' taps are for a width-{rows.taps.size(0) + 1} convolution, the layer's is {width}")
    wide = torch.promote_types(weight.dtype, torch.float32)  # bf16 / fp16 summed in fp32, fp64 kept
    inputs, weights = mixed.to(wide), weight.to(wide)
    out = inputs * weights[:, width - 1]
    for step, index in enumerate(rows.taps, start=1):
        out = out + _gather(inputs, index) * weights[:, width - 1 - step]
    if layer.conv1d.bias is not None:
        out = out + layer.conv1d.bias.to(wide)
    from transformers.activations import ACT2FN

    return ACT2FN[layer.activation](out.to(weight.dtype)).to(mixed.dtype)


def packed_forward(layer: nn.Module, hidden_states: torch.Tensor, rows: RecurrentRows) -> torch.Tensor:
    """A gated-DeltaNet layer (Qwen3.5's, dense or MoE) over packed rows [R, L, D]: each prompt from a zero state,
    each answer from its prompt's final state; padding positions come out zero."""
    size, length, _ = hidden_states.shape
    flat = hidden_states.reshape(size * length, -1)
    mixed = _causal_conv(layer, layer.in_proj_qkv(flat), rows)
    query, key, value = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    query = query.reshape(size * length, -1, layer.head_k_dim)
    key = key.reshape(size * length, -1, layer.head_k_dim)
    value = value.reshape(size * length, -1, layer.head_v_dim)
    beta = layer.in_proj_b(flat).sigmoid()
    # as the layer: in fp32, where fp16 would take A to -inf
    decay = -layer.A_log.float().exp() * nn.functional.softplus(layer.in_proj_a(flat).float() + layer.dt_bias)
    rule = sys.modules[type(layer).__module__].torch_chunk_gated_delta_rule  # the kernel the layer itself runs
    inputs = (query, key, value, decay, beta)
    prompt = [_gather(x, rows.prompts) for x in inputs]
    prompt_out, state = rule(*prompt[:3], g=prompt[3], beta=prompt[4], initial_state=None, output_final_state=True,
                             use_qk_l2norm_in_kernel=True)  # fmt: skip
    answer = [_gather(x, rows.answers) for x in inputs]
    answer_out, _ = rule(*answer[:3], g=answer[3], beta=answer[4], initial_state=torch.cat([state, state]),
                         output_final_state=False, use_qk_l2norm_in_kernel=True)  # fmt: skip
    tokens = size * length  # the places past an end write to a spare row, dropped after (no data-dependent shapes)
    core = value.new_zeros(tokens + 1, value.size(1), layer.head_v_dim)
    for index, out in ((rows.prompts, prompt_out), (rows.answers, answer_out)):
        places = torch.where(index >= 0, index, tokens).reshape(-1)
        core = core.index_put((places,), out.reshape(places.numel(), *out.shape[2:]).to(core.dtype))
    core = core[:tokens]
    gate = layer.in_proj_z(flat).reshape(-1, layer.head_v_dim)
    core = layer.norm(core.reshape(-1, layer.head_v_dim), gate).reshape(size, length, -1)
    return layer.out_proj(core)


LINEAR_ATTENTION_CLASSES = ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet")  # what `packed_forward` implements


def is_linear_attention(module: nn.Module) -> bool:
    """A transformers gated-DeltaNet layer of Qwen3.5 (dense or MoE)."""
    return type(module).__name__ in LINEAR_ATTENTION_CLASSES


def take_packed_rows(model: nn.Module) -> int:
    """Let the linear-attention layers of `model` take packed rows (a `RecurrentRows` as their attention mask);
    everything else goes to their own forward. Returns how many layers now do.

    The layer class's forward is wrapped (once per class): an instance attribute would not survive every wrapper
    put around the model, and the class's own forward carries transformers' kernel hooks. A model already seen
    returns at once (the step asks for every batch)."""
    if getattr(model, "_linear_attention_layers", None) is not None:
        return model._linear_attention_layers
    layers = [module for module in model.modules() if is_linear_attention(module)]
    for cls in {type(layer) for layer in layers}:
        if not getattr(cls.forward, "takes_packed_rows", False):
            cls.forward = _taking_packed_rows(cls.forward)
    model._linear_attention_layers = len(layers)
    return len(layers)


def _taking_packed_rows(own: Callable) -> Callable:
    @functools.wraps(own)
    def forward(self: nn.Module, hidden_states: torch.Tensor, *args, attention_mask: Any = None, **kwargs):
        if isinstance(attention_mask, RecurrentRows):
            return packed_forward(self, hidden_states, attention_mask)
        return own(self, hidden_states, *args, attention_mask=attention_mask, **kwargs)

    forward.takes_packed_rows = True
    return forward
