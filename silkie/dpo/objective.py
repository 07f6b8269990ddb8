"""One DPO objective evaluation for a batch: image features, policy scores, reference scores, loss, metrics.

Shared by the trainer and `scripts/benchmark.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .losses import DPOLossOutput, DPOObjective, per_token_average
from .step import AnswerScores, StepOptions, encode_images_once, score_answers

ReferenceFn = Callable[[dict, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
CORRUPT_VIEW = "corrupt"  # batch["view"] of the corrupted-image view: the reference table keeps it in columns 2-3


def corrupted_view(batch: dict) -> dict:
    """The batch with each image (video) replaced by its corrupted copy (the collator's `corrupt_pixel_values`,
    `corrupt_pixel_values_videos`); text-only batches stay as they are."""
    view = {**batch, "view": CORRUPT_VIEW}
    for name in ("pixel_values", "pixel_values_videos"):
        if batch.get(name) is not None and batch[name].numel():
            if f"corrupt_{name}" not in batch:
                raise ValueError(f"the batch has no corrupt_{name}: its collator was not given an image corruption")
            view[name] = batch[f"corrupt_{name}"]
    return view


@dataclass
class CorruptedScores:
    """The pairs again under the corrupted images: the policy's answer scores and the reference log-probs."""

    policy: AnswerScores
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    with_media: torch.Tensor | None = None  # [B] pairs holding an image or video (a text-only pair is unchanged)


def loss_from_scores(
    policy: AnswerScores,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    objective: DPOObjective,
    pair_weights: torch.Tensor | None = None,
    corrupted: CorruptedScores | None = None,
) -> DPOLossOutput:
    """The objective on policy scores and reference log-probs (moved to the policy's device)."""
    device = policy.chosen_logps.device
    corrupted_chosen = None
    if corrupted is not None:
        corrupted_chosen = (corrupted.policy.chosen_logps, corrupted.ref_chosen.to(device))
    return objective(
        policy.chosen_logps,
        policy.rejected_logps,
        ref_chosen.to(device),
        ref_rejected.to(device),
        chosen_lengths=policy.chosen_lengths,
        rejected_lengths=policy.rejected_lengths,
        chosen_nll=policy.chosen_nll,
        pair_weights=None if pair_weights is None else pair_weights.to(device),
        sequence_weights=policy.wpo_weight,
        corrupted_chosen=corrupted_chosen,
    )


@dataclass
class BatchScores:
    """One batch through the objective: the policy's answer scores, the reference log-probs and the loss."""

    policy: AnswerScores
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    out: DPOLossOutput
    pair_weights: torch.Tensor | None
    corrupted: CorruptedScores | None = None
    beta: float = 0.1
    average_rewards: bool = False  # rewards of per-token average log-probs (reference-free simpo, orpo)


def _with_media(batch: dict) -> torch.Tensor | None:
    """[B] 1.0 where a pair holds an image or a video, else 0.0 (None when the batch does not say)."""
    if "image_counts" not in batch:
        return None
    counts = batch["image_counts"] + batch.get("video_counts", torch.zeros_like(batch["image_counts"]))
    return (counts > 0).float()


def _no_reference(batch: dict, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero reference log-probs for a reference-free objective (one per pair)."""
    zeros = torch.zeros(batch["chosen_input_ids"].shape[0], device=batch["chosen_input_ids"].device)
    return zeros, zeros


def score_batch(
    model: nn.Module,
    batch: dict,
    options: StepOptions,
    objective: DPOObjective,
    pad_token_id: int,
    reference: ReferenceFn,
    corrupted: bool = False,
) -> BatchScores:
    """Image features (once, when `options` allow), policy scores, reference log-probs (`reference(batch,
    features)`, scored with the same options) and the objective's loss for one batch; with `corrupted` (and
    always for a vision-aware objective) the pairs again under their corrupted images, each image also encoded
    once without autograd where the options allow."""
    if not objective.uses_reference:  # cpo, simpo, orpo: no reference pass (zeros stand in; the loss reads none)
        reference = _no_reference
    features = encode_images_once(model, batch) if options.image_once else None
    policy = score_answers(model, batch, options, pad_token_id, features)
    ref_chosen, ref_rejected = reference(batch, features)
    weights = batch.get("pair_weight")
    again = None
    if corrupted or objective.scores_corrupted_images:
        view = corrupted_view(batch)
        view_features = encode_images_once(model, view) if options.image_once else None
        view_policy = score_answers(model, view, options, pad_token_id, view_features, policy=False)
        again = CorruptedScores(view_policy, *reference(view, view_features), _with_media(batch))
    out = loss_from_scores(policy, ref_chosen, ref_rejected, objective, weights, again)
    if policy.aux_loss is not None:
        out = with_router_balance(out, policy.aux_loss, options.router_aux_loss_coef)
    average = objective.averages_rewards
    return BatchScores(policy, ref_chosen, ref_rejected, out, weights, again, objective.beta, average)


def with_router_balance(out: DPOLossOutput, aux_loss: torch.Tensor, coef: float) -> DPOLossOutput:
    """The objective plus `coef` x the routers' load-balancing loss (TRL's `loss + router_aux_loss_coef * aux_loss`),
    also in each pair's loss (their mean is the eval loss); `aux_loss`, as TRL logs it, among the terms."""
    added = coef * aux_loss.to(out.loss.device)
    terms = {**out.terms, "aux_loss": aux_loss.detach().expand_as(out.per_pair)}
    return replace(out, loss=out.loss + added, per_pair=out.per_pair + added, terms=terms)


def imageless_rewards(scores: BatchScores) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards (chosen, rejected) under the corrupted images, as the rewards themselves are computed."""
    again = scores.corrupted
    device = again.policy.chosen_logps.device
    chosen = scores.beta * (again.policy.chosen_logps.detach() - again.ref_chosen.to(device))
    rejected = scores.beta * (again.policy.rejected_logps.detach() - again.ref_rejected.to(device))
    if scores.average_rewards:  # reference-free simpo, orpo: of per-token averages
        chosen = per_token_average(chosen, again.policy.chosen_lengths)
        rejected = per_token_average(rejected, again.policy.rejected_lengths)
    return chosen, rejected


def logged_logps(scores: BatchScores) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's log-probs (chosen, rejected) as `logps/*` report them: sums, or for simpo and orpo per-token
    averages, as TRL's CPO / ORPO trainers log them (their rewards are beta x those)."""
    policy = scores.policy
    chosen, rejected = policy.chosen_logps.detach(), policy.rejected_logps.detach()
    if scores.average_rewards:
        return per_token_average(chosen, policy.chosen_lengths), per_token_average(rejected, policy.rejected_lengths)
    return chosen, rejected


def batch_metrics(scores: BatchScores) -> dict[str, torch.Tensor]:
    """Per-pair metric tensors (TRL names, each pair's `loss`, its `weight` and, as `weight:NAME`, the weight of a
    metric averaged otherwise)."""
    out, policy = scores.out, scores.policy
    chosen_logps, rejected_logps = logged_logps(scores)
    metrics = {
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
        "logits/chosen": policy.chosen_logits_mean,
        "logits/rejected": policy.rejected_logits_mean,
        "loss": out.per_pair.detach(),  # eval: the per-pair mean replaces the Trainer's mean of batch losses
        **out.terms,  # `loss/dpo`, `loss/image_conditional`, `loss/anchor` (mdpo), `loss/<type>` of a list
    }
    # per-pair weights (0: the pair's image failed) let the trainer leave pairs out of the metrics; the mean
    # logits are per answer token over the batch, as TRL's (a pair counts with its answer's length)
    weights = scores.pair_weights
    pair_weights = out.chosen_rewards.new_ones(()).expand_as(out.chosen_rewards) if weights is None else weights
    pair_weights = pair_weights.to(out.chosen_rewards.device).float()
    metrics["weight"] = pair_weights
    metrics["weight:logits/chosen"] = pair_weights * policy.chosen_lengths
    metrics["weight:logits/rejected"] = pair_weights * policy.rejected_lengths
    if scores.corrupted is not None:  # is the preference learned from the picture, or from the text alone?
        again = scores.corrupted
        chosen, rejected = imageless_rewards(scores)
        metrics["rewards/imageless_accuracies"] = (chosen > rejected).float()
        metrics["rewards/imageless_margins"] = chosen - rejected
        metrics["logps/chosen_image_gain"] = (policy.chosen_logps - again.policy.chosen_logps).detach()
        if again.with_media is not None:  # a text-only pair has no picture to take away: not in these means
            media_weights = pair_weights * again.with_media.to(pair_weights.device)
            for name in ("rewards/imageless_accuracies", "rewards/imageless_margins", "logps/chosen_image_gain"):
                metrics[f"weight:{name}"] = media_weights
    if policy.entropy is not None:  # TRL's: per answer token (chosen and rejected), resp. per chosen token
        metrics["entropy"] = policy.entropy
        metrics["weight:entropy"] = pair_weights * (policy.chosen_lengths + policy.rejected_lengths)
        metrics["mean_token_accuracy"] = policy.chosen_token_accuracy
        metrics["weight:mean_token_accuracy"] = pair_weights * policy.chosen_lengths
    return metrics


def batch_dpo_loss(
    model: nn.Module,
    batch: dict,
    options: StepOptions,
    objective: DPOObjective,
    pad_token_id: int,
    reference: ReferenceFn,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and per-pair metric tensors for one batch (`score_batch`, `batch_metrics`). `options` say how answers
    are scored (the recipe's LD-DPO and WPO included), `objective` what the scores cost."""
    scores = score_batch(model, batch, options, objective, pad_token_id, reference)
    return scores.out.loss, batch_metrics(scores)


def adapter_reference(model: nn.Module, options: StepOptions, pad_token_id: int) -> ReferenceFn:
    """Reference = the same peft model with its adapters disabled (no second copy)."""

    def reference(batch: dict, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with model.disable_adapter():
            ref = score_answers(model, batch, options, pad_token_id, features, no_grad=True)
        return ref.chosen_logps.detach(), ref.rejected_logps.detach()

    return reference
