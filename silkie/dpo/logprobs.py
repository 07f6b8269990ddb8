"""Answer-token log-probabilities in fp32, without full-vocabulary logits for whole sequences."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def is_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the module's parameters."""
    return any(hasattr(p, "ds_numel") for p in module.parameters())


class TokenScores(NamedTuple):
    """Per answer token: log p(target), the mean logit, and (policy pass only) the entropy and whether the target
    is the top-1 token (TRL's `entropy` and `mean_token_accuracy`), and for WPO log sum_v p_v^2."""

    logps: torch.Tensor
    logit_means: torch.Tensor
    entropy: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    log_sum_sq: torch.Tensor | None = None


def _token_stats(
    logits: torch.Tensor, logps: torch.Tensor, targets: torch.Tensor, sum_sq: bool = False, rows: int = 256
) -> list[torch.Tensor]:
    """Entropy (logsumexp - E_p[logit], finite even where a probability underflows) and top-1 hits (with `sum_sq`,
    also log sum_v p_v^2), no autograd; `rows` at a time: the temporaries are [rows, vocab] blocks, also when a call
    scores every token (ZeRO-3)."""
    columns: list[list[torch.Tensor]] = [[], [], []] if sum_sq else [[], []]
    with torch.no_grad():
        for start in range(0, logits.size(0), rows):
            z, lp = logits[start : start + rows], logps[start : start + rows]
            probs = lp.exp()
            if sum_sq:  # >= (1/vocab)^2, so the log stays finite in fp32
                columns[2].append(probs.square().sum(-1).log())
            columns[0].append(z[:, 0] - lp[:, 0] - probs.mul_(z).sum(-1))
            columns[1].append((z.argmax(-1) == targets[start : start + rows]).float())
    return [torch.cat(column) if column else logits.new_zeros(0) for column in columns]


def _score_chunk(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, stats: list | None = None, sum_sq: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    # the forward's outputs may come back in fp32 (accelerate's autocast wrapper): match the head's weights
    logits = lm_head(hidden.to(lm_head.weight.dtype)).float()
    logps = torch.log_softmax(logits, dim=-1)
    if stats is not None and not stats:  # filled on the first call: a checkpoint's recompute skips it
        stats.extend(_token_stats(logits, logps, targets, sum_sq))
    return logps.gather(-1, targets[:, None]).squeeze(-1), logits.mean(-1).detach()


def chunked_token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_head: nn.Module,
    chunk_size: int = 1024,
    stats: bool = False,
    sum_sq: bool = False,
) -> TokenScores:
    """Per-token log p(target) and mean logit for predictor states [N, D], `chunk_size` rows at a time (with
    `stats`, also the entropy and top-1 hits, and with `sum_sq` too, WPO's log sum_v p_v^2).

    Each chunk is checkpointed, so at most one chunk of [chunk, vocab] fp32 logits is alive in the
    forward and in the backward pass (under ZeRO-3 chunks are kept instead: answer positions only).
    """
    if is_partitioned(lm_head):
        # ZeRO-3: lm_head.weight is gathered per call and not for a checkpoint's recompute, and every rank must
        # make the same number of calls, so score all answer tokens in one call
        recompute, chunk_size = False, max(1, hidden.size(0))
    else:
        recompute = True
    parts = []
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        chunk_stats = [] if stats else None
        if recompute and torch.is_grad_enabled() and h.requires_grad:
            lp, mean = checkpoint(_score_chunk, h, t, lm_head, chunk_stats, sum_sq, use_reentrant=False)
        else:
            lp, mean = _score_chunk(h, t, lm_head, chunk_stats, sum_sq)
        parts.append((lp, mean, *(chunk_stats or ())))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenScores(empty, empty, *((empty,) * ((2 + sum_sq) if stats else 0)))
    return TokenScores(*(torch.cat(column) for column in zip(*parts)))


def full_logits_token_logps(
    logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, stats: bool = False, sum_sq: bool = False
) -> TokenScores:
    """Reference path: log-softmax over all [R, L, V] logits in fp32, then pick answer positions."""
    logps = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))
    picked = logps[index].gather(-1, targets[:, None]).squeeze(-1)
    rows = logits.reshape(-1, logits.size(-1))[index].float()
    extra = _token_stats(rows, logps[index], targets, sum_sq) if stats else ()
    return TokenScores(picked, rows.mean(-1).detach(), *extra)


def sum_per_pair(values: torch.Tensor, pair: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Sum token values into their pairs -> [num_pairs]."""
    return torch.zeros(num_pairs, dtype=values.dtype, device=values.device).index_add(0, pair, values)
