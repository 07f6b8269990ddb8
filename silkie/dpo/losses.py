"""The preference objective in one pure, tested place (TRL names and formulas): `DPOObjective`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from silkie.config.names import F_DIVERGENCES, VISION_LOSS_TYPES
from silkie.config.objective import loss_types_of, objective_problem, uses_reference, weighting_problem


@dataclass
class DPOLossOutput:
    """Mean loss plus per-pair rewards (beta * policy/reference log-ratio)."""

    loss: torch.Tensor
    per_pair: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # `loss/<part>` per pair, for a loss of several parts


@dataclass(frozen=True)
class DPOObjective:
    """A preference objective with its hyperparameters fixed once (TRL 1.16's names and formulas), checked by the
    same rules as the recipe's `dpo:` section; call it on per-sequence answer log-probs (sums over answer tokens).

    The call's extras are per batch: `chosen_lengths`/`rejected_lengths` (answer tokens; ipo, sigmoid_norm,
    simpo, orpo), `chosen_nll` (the batch's mean NLL per chosen token; sft, orpo), `pair_weights` (0 or 1 per pair:
    leaves pairs out of the mean; a batch of only weight-0 pairs has loss 0) and `sequence_weights` (WPO, TRL's
    `use_weighting`; no gradient: they multiply each pair's loss).

    With log-ratios c = pi_c - ref_c, r = pi_r - ref_r, scores s_c = f'(c), s_r = f'(r) (identity for the default
    reverse KL) and d = s_c - s_r:
    - sigmoid: -(1-ls) logsigmoid(beta d) - ls logsigmoid(-beta d)   (Silkie / DPO; ls > 0 is cDPO)
    - robust:  (-(1-ls) logsigmoid(beta d) + ls logsigmoid(-beta d)) / (1 - 2 ls)
    - hinge:   relu(1 - beta d)
    - ipo:     (d_avg - 1/(2 beta))^2 with scores divided by answer lengths (as TRL); sigmoid_norm the same
      length-normalised d in -logsigmoid(beta d_avg)
    - exo_pair (EXO, needs ls > 0), nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop (`discopop_tau`)
    - aot / aot_unpaired: the sorted (pi_c - pi_r) against the sorted (ref_c - ref_r), resp. sorted c against
      sorted r, over the batch's pairs; their per-pair values are by rank, only the mean belongs to the batch
    - sft:     `chosen_nll`, the mean negative log-likelihood per chosen token of the batch
    - reference-free (TRL's CPOTrainer / ORPOTrainer; the reference log-probs are not read, and rewards are beta x
      the policy's log-probs, per-token averages with simpo or orpo): cpo: sigmoid on pi_c - pi_r; simpo: sigmoid on
      a_c - a_r - `simpo_gamma`/beta with a = the per-token average log-prob; orpo: `chosen_nll` - beta
      logsigmoid(log odds(a_c) - log odds(a_r)), log odds(a) = a - log(1 - exp(a)) (ORPO, arXiv 2403.07691)
    - image_conditional: -logsigmoid(beta (c - c')) with c' = pi(y_w|I') - ref(y_w|I') under the corrupted image
      I' (mDPO's conditional term, CHiP's image-side term)
    - mdpo:    sigmoid + `mdpo_conditional_weight` x image_conditional + `mdpo_anchor_weight` x
      -logsigmoid(beta c - `mdpo_anchor_delta`) (mDPO, arXiv 2406.11839)
    A list of loss types is their sum weighted by `loss_weights` (default 1 each).
    """

    beta: float = 0.1
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    mdpo_conditional_weight: float = 1.0
    mdpo_anchor_weight: float = 1.0
    mdpo_anchor_delta: float = 0.0

    def __post_init__(self) -> None:
        problem = objective_problem(
            self.loss_type, self.loss_weights, self.label_smoothing, self.f_divergence_type, self.discopop_tau
        )
        if problem is not None:
            raise ValueError(problem.message)

    @classmethod
    def from_section(cls, dpo: Any) -> DPOObjective:
        """The objective of a recipe's (checked) `dpo:` section."""
        return cls(
            beta=dpo.beta,
            loss_type=dpo.loss_type if isinstance(dpo.loss_type, str) else tuple(dpo.loss_type),
            loss_weights=None if dpo.loss_weights is None else tuple(dpo.loss_weights),
            label_smoothing=dpo.label_smoothing,
            f_divergence_type=dpo.f_divergence_type,
            f_alpha_divergence_coef=dpo.f_alpha_divergence_coef,
            discopop_tau=dpo.discopop_tau,
            simpo_gamma=dpo.simpo_gamma,
            mdpo_conditional_weight=dpo.mdpo_conditional_weight,
            mdpo_anchor_weight=dpo.mdpo_anchor_weight,
            mdpo_anchor_delta=dpo.mdpo_anchor_delta,
        )

    @property
    def loss_types(self) -> list[str]:
        """The loss types as a list."""
        return loss_types_of(self.loss_type)

    @property
    def uses_reference(self) -> bool:
        """Whether the loss reads the reference log-probs (not for cpo, simpo and orpo, alone or with sft)."""
        return uses_reference(self.loss_types)

    @property
    def averages_rewards(self) -> bool:
        """Whether the rewards are of per-token average log-probs (reference-free simpo and orpo, as TRL)."""
        return not self.uses_reference and bool({"simpo", "orpo"} & set(self.loss_types))

    @property
    def scores_corrupted_images(self) -> bool:
        """Whether the loss needs the chosen answer's log-probs under the corrupted image (mdpo,
        image_conditional)."""
        return bool(set(self.loss_types) & set(VISION_LOSS_TYPES))

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
        chosen_nll: torch.Tensor | None = None,
        pair_weights: torch.Tensor | None = None,
        sequence_weights: torch.Tensor | None = None,
        corrupted_chosen: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> DPOLossOutput:
        """The mean loss over pairs and the per-pair terms and rewards; `corrupted_chosen` = (policy, reference)
        log-probs of the chosen answers under the corrupted images (the vision-aware losses)."""
        loss_types = self.loss_types
        weights = [1.0] * len(loss_types) if self.loss_weights is None else list(self.loss_weights)
        beta, ls, tau = self.beta, self.label_smoothing, self.discopop_tau
        averaged = {"ipo", "sigmoid_norm", "simpo", "orpo"} & set(loss_types)
        if averaged and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(f"{', '.join(sorted(averaged))} losses need chosen_lengths and rejected_lengths")
        if {"sft", "orpo"} & set(loss_types) and chosen_nll is None:
            raise ValueError("sft and orpo losses need chosen_nll")
        if sequence_weights is not None and weighting_problem(loss_types):
            raise ValueError(weighting_problem(loss_types).message)
        if self.scores_corrupted_images and corrupted_chosen is None:
            raise ValueError("mdpo and image_conditional losses need corrupted_chosen (log-probs under I')")
        chosen_ratio = policy_chosen_logps - ref_chosen_logps
        rejected_ratio = policy_rejected_logps - ref_rejected_logps
        corrupted_ratio = None if corrupted_chosen is None else corrupted_chosen[0] - corrupted_chosen[1]
        if pair_weights is not None:  # a left-out pair's placeholder reference must not reach exp() (inf - inf = NaN)
            kept = pair_weights > 0
            chosen_ratio = torch.where(kept, chosen_ratio, 0.0)
            rejected_ratio = torch.where(kept, rejected_ratio, 0.0)
            if corrupted_ratio is not None:
                corrupted_ratio = torch.where(kept, corrupted_ratio, 0.0)
        chosen_score = f_divergence_score(chosen_ratio, self.f_divergence_type, self.f_alpha_divergence_coef)
        rejected_score = f_divergence_score(rejected_ratio, self.f_divergence_type, self.f_alpha_divergence_coef)
        delta = chosen_score - rejected_score
        per_pair = torch.zeros_like(delta)
        parts: dict[str, torch.Tensor] = {}  # each part of a loss of several, unweighted
        for name, weight in zip(loss_types, weights):
            if name == "sigmoid":
                term = -(1 - ls) * F.logsigmoid(beta * delta) - ls * F.logsigmoid(-beta * delta)
            elif name == "robust":
                term = (-(1 - ls) * F.logsigmoid(beta * delta) + ls * F.logsigmoid(-beta * delta)) / (1 - 2 * ls)
            elif name == "hinge":
                term = torch.relu(1 - beta * delta)
            elif name in ("ipo", "sigmoid_norm"):
                avg = per_token_average(chosen_score, chosen_lengths) - per_token_average(
                    rejected_score, rejected_lengths
                )
                term = (avg - 1 / (2 * beta)) ** 2 if name == "ipo" else -F.logsigmoid(beta * avg)
            elif name == "exo_pair":  # KL(softmax over {chosen, rejected} || [1 - ls, ls]), EXO eq. 16
                eps = torch.tensor(ls, dtype=delta.dtype, device=delta.device)
                term = torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-eps))
                term = term + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(eps))
            elif name == "nca_pair":
                term = (
                    -F.logsigmoid(beta * chosen_ratio)
                    - 0.5 * F.logsigmoid(-beta * chosen_ratio)
                    - 0.5 * F.logsigmoid(-beta * rejected_ratio)
                )
            elif name == "bco_pair":
                term = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
            elif name == "sppo_hard":
                term = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
            elif name in ("aot", "aot_unpaired"):
                if name == "aot":
                    first, second = policy_chosen_logps - policy_rejected_logps, ref_chosen_logps - ref_rejected_logps
                else:
                    first, second = chosen_ratio, rejected_ratio
                term = _sorted_pair_term(first, second, pair_weights, beta, ls)
            elif name == "apo_zero":
                term = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
            elif name == "apo_down":
                term = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))
            elif name in ("cpo", "simpo"):
                logits = policy_chosen_logps - policy_rejected_logps
                if name == "simpo":
                    logits = per_token_average(policy_chosen_logps, chosen_lengths) - per_token_average(
                        policy_rejected_logps, rejected_lengths
                    )
                    logits = logits - self.simpo_gamma / beta
                term = -(1 - ls) * F.logsigmoid(beta * logits) - ls * F.logsigmoid(-beta * logits)
            elif name == "orpo":
                # an answer whose every token has probability 1 in fp32 (average log-prob 0) has no finite odds
                chosen_avg = per_token_average(policy_chosen_logps, chosen_lengths).float().clamp(max=-1e-6)
                rejected_avg = per_token_average(policy_rejected_logps, rejected_lengths).float().clamp(max=-1e-6)
                log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
                term = (chosen_nll - beta * F.logsigmoid(log_odds)).to(delta.dtype)
                parts["log_odds_chosen"], parts["log_odds_ratio"] = log_odds, F.logsigmoid(log_odds)  # TRL's names
            elif name == "discopop":
                logits = beta * delta
                mix = torch.sigmoid(logits / tau)
                term = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
            elif name in VISION_LOSS_TYPES:
                # mDPO's conditional term (CHiP's image-side term): the chosen answer with the image is preferred
                # to it with the corrupted image, each against the reference
                term = _conditional_term(beta, chosen_ratio, corrupted_ratio)
                if name == "mdpo":  # + DPO's term + the anchor that keeps the chosen reward above delta
                    dpo = -(1 - ls) * F.logsigmoid(beta * delta) - ls * F.logsigmoid(-beta * delta)
                    anchor = -F.logsigmoid(beta * chosen_ratio - self.mdpo_anchor_delta)
                    parts["loss/dpo"], parts["loss/image_conditional"], parts["loss/anchor"] = dpo, term, anchor
                    term = self.mdpo_conditional_weight * term + dpo + self.mdpo_anchor_weight * anchor
            else:  # sft
                term = chosen_nll.expand_as(delta)
            if name in ("orpo", "sft") and not self.uses_reference:
                parts["nll_loss"] = chosen_nll.expand_as(delta)  # TRL's CPO / ORPO metric
            if len(loss_types) > 1:
                parts[f"loss/{name}"] = term
            per_pair = per_pair + weight * term
        if sequence_weights is not None:
            per_pair = per_pair * sequence_weights.detach()
        if pair_weights is None:
            loss = per_pair.mean()
        else:
            weighted, total = (per_pair * pair_weights).sum(), pair_weights.sum()
            loss = torch.where(total > 0, weighted / total.clamp(min=1e-12), weighted)
        chosen_reward, rejected_reward = chosen_ratio, rejected_ratio
        if not self.uses_reference:  # TRL's CPO / ORPO rewards: beta x the policy's log-probs (averages: simpo, orpo)
            chosen_reward, rejected_reward = policy_chosen_logps, policy_rejected_logps
            if self.averages_rewards:
                chosen_reward = per_token_average(chosen_reward, chosen_lengths)
                rejected_reward = per_token_average(rejected_reward, rejected_lengths)
        return DPOLossOutput(
            loss=loss,
            per_pair=per_pair,
            chosen_rewards=(beta * chosen_reward).detach(),
            rejected_rewards=(beta * rejected_reward).detach(),
            terms={name: part.detach() for name, part in parts.items()},
        )


def per_token_average(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token average log-probs (TRL's `average_log_prob`; an empty answer counts one token)."""
    return logps / lengths.clamp(min=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (each branch clamped to its side, so the branch
    torch.where leaves out has no infinite value whose gradient would be NaN)."""
    t = -math.log(2.0)
    return torch.where(
        x < t, torch.log1p(-torch.exp(torch.clamp(x, max=t))), torch.log(-torch.expm1(torch.clamp(x, min=t)))
    )


def _conditional_term(beta: float, chosen_ratio: torch.Tensor, corrupted_ratio: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(beta [(pi(y_w|I) - pi(y_w|I')) - (ref(y_w|I) - ref(y_w|I'))])."""
    return -F.logsigmoid(beta * (chosen_ratio - corrupted_ratio))


def f_divergence_score(log_ratio: torch.Tensor, kind: str, alpha: float = 1.0) -> torch.Tensor:
    """f'(t) at t = pi/ref for the f-DPO regulariser (`reverse_kl`: the log-ratio itself)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return log_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":  # (t^(alpha-1) - 1) / (alpha-1), clamped so exp stays finite after the cast
        scaled = ((alpha - 1.0) * log_ratio).float()
        limit = 11.0 if log_ratio.dtype == torch.float16 else 80.0
        return (torch.exp(scaled.clamp(max=limit)) - 1.0).to(log_ratio.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type '{kind}'; expected one of {', '.join(F_DIVERGENCES)}")


def _sorted_pair_term(
    first: torch.Tensor, second: torch.Tensor, pair_weights: torch.Tensor | None, beta: float, ls: float
) -> torch.Tensor:
    """AOT: cDPO's term on sorted(first) - sorted(second) over the pairs that count (weight > 0); the values go to
    those pairs' slots in rank order, and weight-0 slots get 0."""
    kept = torch.ones_like(first, dtype=torch.bool) if pair_weights is None else pair_weights > 0
    delta = torch.sort(first[kept]).values - torch.sort(second[kept]).values
    values = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    return torch.zeros_like(first).masked_scatter(kept, values)
