"""The DPO objective in one pure function (TRL names and formulas)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sft")


@dataclass
class DPOLossOutput:
    """Mean loss plus per-pair rewards (beta * policy/reference log-ratio)."""

    loss: torch.Tensor
    per_pair: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> DPOLossOutput:
    """Weighted sum of DPO losses, averaged over pairs; log-probs are per-sequence sums over answer tokens.

    `pair_weights` (0 or 1 per pair) leaves pairs out of the mean (a batch of only weight-0 pairs has loss 0).

    With d = (pi_c - pi_r) - (ref_c - ref_r):
    - sigmoid: -(1-ls) logsigmoid(beta d) - ls logsigmoid(-beta d)   (Silkie / DPO; ls > 0 is cDPO)
    - robust:  (-(1-ls) logsigmoid(beta d) + ls logsigmoid(-beta d)) / (1 - 2 ls)
    - hinge:   relu(1 - beta d)
    - ipo:     (d_avg - 1/(2 beta))^2 with log-ratios divided by answer lengths (as TRL)
    - sft:     `chosen_nll`, the mean negative log-likelihood per chosen token of the batch
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    per_pair = torch.zeros_like(delta)
    for name, weight in zip(loss_types, weights):
        if name == "sigmoid":
            term = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
        elif name == "robust":
            if not 0.0 <= label_smoothing < 0.5:
                raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
            term = -(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)
            term = term / (1 - 2 * label_smoothing)
        elif name == "hinge":
            term = torch.relu(1 - beta * delta)
        elif name == "ipo":
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("ipo loss needs chosen_lengths and rejected_lengths")
            avg = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
            term = (avg - 1 / (2 * beta)) ** 2
        elif name == "sft":
            if chosen_nll is None:
                raise ValueError("sft loss needs chosen_nll")
            term = chosen_nll.expand_as(delta)
        else:
            raise ValueError(f"unknown loss_type '{name}'; expected one of {', '.join(LOSS_TYPES)}")
        per_pair = per_pair + weight * term
    if pair_weights is None:
        loss = per_pair.mean()
    else:
        weighted, total = (per_pair * pair_weights).sum(), pair_weights.sum()
        loss = torch.where(total > 0, weighted / total.clamp(min=1e-12), weighted)
    return DPOLossOutput(
        loss=loss,
        per_pair=per_pair,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )
