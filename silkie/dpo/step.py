"""Per-pair answer log-probs for a batch: the plain (TRL-equivalent) path and the efficient path.

Efficient = image features computed once per step without autograd (frozen tower) and shared by
chosen, rejected, policy and reference; prompt computed once (packed rows); log-probs from hidden
states in chunks. Both paths return the same numbers (tests hold them within 1e-5 in fp32).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .batching import ScoredRows, concat_rows, packed_rows
from .logprobs import chunked_token_logps, full_logits_token_logps, is_partitioned, sum_per_pair


@dataclass
class StepOptions:
    """Which optimisations to use (all on = the efficient step)."""

    image_once: bool = True
    share_prompt: bool = True
    chunked_logps: bool = True
    chunk_size: int = 1024


@dataclass
class AnswerScores:
    """Per-pair sums over answer tokens, plus what the metrics and the sft/ipo losses need."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_logits_mean: torch.Tensor
    rejected_logits_mean: torch.Tensor
    chosen_nll: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The model under peft/DeepSpeed wrappers that owns `lm_head` and `encode_images` (LoRA layers stay inside)."""
    while True:
        if hasattr(model, "encode_images") and hasattr(model, "lm_head"):
            return model
        for attr in ("module", "base_model", "model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                break
        else:
            raise TypeError(f"{type(model).__name__} has no encode_images/lm_head under its wrappers")


def vision_is_trainable(model: nn.Module) -> bool:
    """True when any parameter of the vision tower (or resampler) requires grad."""
    visual = base_causal_lm(model).transformer.visual
    return any(p.requires_grad for p in visual.parameters())


def encode_images_once(model: nn.Module, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """Image features for the batch's images, computed without autograd (frozen tower)."""
    base = base_causal_lm(model)
    if pixel_values is None or pixel_values.numel() == 0:
        if is_partitioned(base.transformer.visual):  # ZeRO-3: every rank must call the tower, even text-only
            with torch.no_grad():
                base.encode_images(_blank_image(base))
        return None
    with torch.no_grad():
        return base.encode_images(pixel_values)


def _blank_image(base: nn.Module) -> torch.Tensor:
    size = base.config.visual["image_size"]
    weight = base.transformer.visual.conv1.weight
    return torch.zeros(1, 3, size, size, device=weight.device, dtype=torch.float32)


def score_answers(
    model: nn.Module,
    batch: dict,
    options: StepOptions,
    pad_token_id: int,
    image_features: torch.Tensor | None = None,
    no_grad: bool = False,
) -> AnswerScores:
    """Run `model` once over the batch's rows and sum answer-token log-probs per pair."""
    rows = packed_rows(batch, pad_token_id) if options.share_prompt else concat_rows(batch, pad_token_id)
    device = next(base_causal_lm(model).parameters()).device
    images = _row_images(batch, rows, image_features, device)
    with torch.no_grad() if no_grad else nullcontext():
        kwargs = dict(
            input_ids=rows.input_ids.to(device),
            attention_mask=rows.attention_mask.to(device),
            position_ids=None if rows.position_ids is None else rows.position_ids.to(device),
            use_cache=False,
            **images,
        )
        size = batch["prompt_input_ids"].size(0)
        scored = {}
        if options.chunked_logps:
            hidden = model(**kwargs, return_hidden_states_only=True).hidden_states[-1]
            flat = hidden.reshape(-1, hidden.size(-1))
            lm_head = base_causal_lm(model).lm_head
            for kind in ("chosen", "rejected"):
                index, targets = getattr(rows, f"{kind}_index").to(device), getattr(rows, f"{kind}_targets").to(device)
                scored[kind] = chunked_token_logps(flat[index], targets, lm_head, options.chunk_size)
        else:
            logits = model(**kwargs).logits
            for kind in ("chosen", "rejected"):
                index, targets = getattr(rows, f"{kind}_index").to(device), getattr(rows, f"{kind}_targets").to(device)
                scored[kind] = full_logits_token_logps(logits, index, targets)
    scores = _sum_scores(rows, scored, size, device)
    if not images and not options.image_once and is_partitioned(base_causal_lm(model).transformer.visual):
        # ZeRO-3 with a text-only batch: run the tower on a blank image and add 0 x its output, so every rank
        # gathers (and, when trained, reduces gradients of) the same vision parameters
        base = base_causal_lm(model)
        with torch.no_grad() if no_grad else nullcontext():
            blank = base.encode_images(_blank_image(base))
        scores.chosen_logps = scores.chosen_logps + 0.0 * blank.float().sum()
    return scores


def _row_images(batch: dict, rows: ScoredRows, features: torch.Tensor | None, device: torch.device) -> dict:
    if rows.image_order.numel() == 0:
        return {}
    order = rows.image_order.to(device)
    if features is not None:
        return {"image_features": features.index_select(0, order)}
    return {"pixel_values": batch["pixel_values"].to(device).index_select(0, order)}


def _sum_scores(rows: ScoredRows, scored: dict, size: int, device: torch.device) -> AnswerScores:
    sums, means, lengths = {}, {}, {}
    for kind in ("chosen", "rejected"):
        logps, logit_means = scored[kind]
        pair = getattr(rows, f"{kind}_pair").to(device)
        sums[kind] = sum_per_pair(logps, pair, size)
        lengths[kind] = sum_per_pair(torch.ones_like(logps), pair, size)
        means[kind] = sum_per_pair(logit_means, pair, size) / lengths[kind].clamp(min=1)
    chosen_logps = scored["chosen"][0]
    return AnswerScores(
        chosen_logps=sums["chosen"],
        rejected_logps=sums["rejected"],
        chosen_logits_mean=means["chosen"],
        rejected_logits_mean=means["rejected"],
        chosen_nll=-chosen_logps.mean() if chosen_logps.numel() else chosen_logps.new_zeros(()),
        chosen_lengths=lengths["chosen"],
        rejected_lengths=lengths["rejected"],
    )
