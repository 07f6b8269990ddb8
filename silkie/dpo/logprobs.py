"""Answer-token log-probabilities in fp32, without full-vocabulary logits for whole sequences."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def is_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the module's parameters."""
    return any(hasattr(p, "ds_numel") for p in module.parameters())


def _score_chunk(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # the forward's outputs may come back in fp32 (accelerate's autocast wrapper): match the head's weights
    logits = lm_head(hidden.to(lm_head.weight.dtype)).float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return logps, logits.mean(-1).detach()


def chunked_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) and mean logit for predictor states [N, D], `chunk_size` rows at a time.

    Each chunk is checkpointed, so at most one chunk of [chunk, vocab] fp32 logits is alive in the
    forward and in the backward pass (under ZeRO-3 chunks are kept instead: answer positions only).
    """
    logps, means = [], []
    if is_partitioned(lm_head):
        # ZeRO-3: lm_head.weight is gathered per call and not for a checkpoint's recompute, and every rank must
        # make the same number of calls, so score all answer tokens in one call
        recompute, chunk_size = False, max(1, hidden.size(0))
    else:
        recompute = True
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute and torch.is_grad_enabled() and h.requires_grad:
            lp, mean = checkpoint(_score_chunk, h, t, lm_head, use_reentrant=False)
        else:
            lp, mean = _score_chunk(h, t, lm_head)
        logps.append(lp)
        means.append(mean)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(means)


def full_logits_token_logps(
    logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: log-softmax over all [R, L, V] logits in fp32, then pick answer positions."""
    logps = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))
    picked = logps[index].gather(-1, targets[:, None]).squeeze(-1)
    means = logits.reshape(-1, logits.size(-1))[index].float().mean(-1).detach()
    return picked, means


def sum_per_pair(values: torch.Tensor, pair: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Sum token values into their pairs -> [num_pairs]."""
    return torch.zeros(num_pairs, dtype=values.dtype, device=values.device).index_add(0, pair, values)
