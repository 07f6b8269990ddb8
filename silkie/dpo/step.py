"""Per-pair answer log-probs for a batch: the plain (TRL-equivalent) path and the efficient path.

Efficient = image features computed once per step without autograd (frozen tower) and shared by
chosen, rejected, policy and reference; prompt computed once (packed rows); log-probs from hidden
states in chunks. Both paths return the same numbers (tests hold them within 1e-5 in fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from silkie.config import DPOSection
from silkie.errors import InputError
from silkie.models.family import unwrap_causal_lm
from silkie.models.varlen import prepare_kernel

from .batching import ScoredRows, concat_rows, on_host, packed_rows
from .logprobs import chunked_token_logps, full_logits_token_logps, is_partitioned, sum_per_pair
from .router_balance import router_balance_loss


@dataclass
class StepOptions:
    """Which optimisations to use (all on = the efficient step), and the recipe's variants of an answer's score:
    LD-DPO's `ld_alpha` (tokens past the shorter answer's length count alpha times) and WPO's pair weights; and a
    mixture-of-experts model's `router_aux_loss_coef` (0: its policy passes do not compute the balancing loss)."""

    image_once: bool = True
    share_prompt: bool = True
    chunked_logps: bool = True
    chunk_size: int = 1024
    pairs_per_row: int = 1
    ld_alpha: float | None = None
    wpo_weights: bool = False
    router_aux_loss_coef: float = 0.0


def recipe_step_options(dpo: DPOSection, image_once: bool, router_aux_loss_coef: float = 0.0) -> StepOptions:
    """The efficient step with the recipe's switches (`image_once` as the caller allows it; the balancing loss's
    weight as `router_aux_loss_coef` resolves it for the model)."""
    return StepOptions(
        image_once=image_once,
        share_prompt=dpo.share_prompt,
        chunked_logps=dpo.chunked_logps,
        chunk_size=dpo.logps_chunk_size,
        pairs_per_row=dpo.pairs_per_row,
        ld_alpha=dpo.ld_alpha,
        wpo_weights=dpo.use_weighting,
        router_aux_loss_coef=router_aux_loss_coef,
    )


def router_aux_loss_coef(model: nn.Module, recipe_value: float | None) -> float:
    """The weight of the load-balancing loss, as TRL's `DPOTrainer` resolves it: the recipe's
    `dpo.router_aux_loss_coef`, else the checkpoint's own for a mixture-of-experts model (0.0 for a dense one);
    a weight set for a dense model is an InputError (it has no routers)."""
    base, family = unwrap_causal_lm(model)
    own = family.router_aux_loss_coef(base)
    if own is None and recipe_value:
        raise InputError(
            f"dpo.router_aux_loss_coef: {recipe_value} is set, but {type(base).__name__} is not a mixture-of-experts "
            "model (it has no routers to balance); leave it null"
        )
    if recipe_value is not None:
        return float(recipe_value)
    return own or 0.0


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
    entropy: torch.Tensor | None = None  # per pair, mean over its answer tokens (policy passes only)
    chosen_token_accuracy: torch.Tensor | None = None  # per pair, top-1 hits over its chosen tokens
    wpo_weight: torch.Tensor | None = None  # per pair, WPO's weight of its loss (policy passes, `wpo_weights`)
    aux_loss: torch.Tensor | None = None  # the routers' load-balancing loss (MoE policy passes, unweighted)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The model under peft/DeepSpeed wrappers that owns `lm_head` (LoRA layers stay inside)."""
    return unwrap_causal_lm(model)[0]


def vision_differs_from_reference(model: nn.Module) -> bool:
    """True when the policy's vision tower (or its projector) is trained or carries LoRA adapters, so its image
    features are not the reference's (each pass must encode the images itself)."""
    base, family = unwrap_causal_lm(model)
    return any(p.requires_grad or "lora_" in name for name, p in family.vision_module(base).named_parameters())


def _has_images(batch: dict) -> bool:
    """Whether the batch holds an image or a video."""
    return any(
        batch.get(name) is not None and batch[name].numel() > 0 for name in ("pixel_values", "pixel_values_videos")
    )


def encode_images_once(model: nn.Module, batch: dict) -> Any:
    """Features of the batch's images and videos, computed without autograd (frozen tower); None without any."""
    base, family = unwrap_causal_lm(model)
    with torch.no_grad():
        if not _has_images(batch):
            if is_partitioned(family.vision_module(base)):  # ZeRO-3: every rank must call the tower, even text-only
                family.blank_image_features(base)
            return None
        return family.encode_images(base, batch)


def score_answers(
    model: nn.Module,
    batch: dict,
    options: StepOptions,
    pad_token_id: int,
    image_features: Any = None,
    no_grad: bool = False,
    policy: bool | None = None,
) -> AnswerScores:
    """Run `model` once over the batch's rows and sum answer-token log-probs per pair.

    A policy pass (default: one with gradients) also gives the token metrics, with `wpo_weights` WPO's weights, and
    for a mixture-of-experts model with `router_aux_loss_coef` its routers' load-balancing loss.
    """
    base, family = unwrap_causal_lm(model)
    device = next(base.parameters()).device
    on_device = _on(batch, device)  # once: the image tensors may still be on the CPU
    host = on_host(batch)  # rows and M-RoPE positions are cut on the CPU (many small ops: no device syncs)
    if options.share_prompt:
        positions = family.prompt_positions(base, host)
        rows = packed_rows(host, pad_token_id, positions, options.pairs_per_row, family.uses_varlen(base))
    else:
        rows = concat_rows(host, pad_token_id)
    images = {}
    if rows.image_order.numel() or rows.video_order.numel():
        order, video_order = rows.image_order.to(device), rows.video_order.to(device)
        images = family.row_image_kwargs(base, on_device, order, image_features, video_order)
    blank_tower = (
        not images
        and not options.image_once
        and _ranks_need_the_tower(family.vision_module(base), grads=not no_grad and torch.is_grad_enabled())
    )
    stats = not no_grad if policy is None else policy  # a reference pass needs no metrics
    routers = family.routers(base) if stats and options.router_aux_loss_coef != 0 else []
    with (
        torch.no_grad() if no_grad else nullcontext(),
        _blank_tower_pass(base, family, blank_tower),
        _router_logits(routers) as router_logits,
    ):
        input_ids = rows.input_ids.to(device)
        position_ids = None if rows.position_ids is None else rows.position_ids.to(device)

        def dense_mask() -> torch.Tensor | dict:  # on the device, only where it is used (native varlen does not)
            masks = family.attention_masks(
                base, rows.attention_mask_on(device), input_ids, position_ids, rows.packed_segments()
            )
            return _attention_mask(masks, base)

        if rows.layout is not None:
            prepare_kernel(device)
            masking = family.varlen_kwargs(rows.layout.to(device), dense_mask)
        else:
            masking = {"attention_mask": dense_mask()}
        kwargs = dict(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            **masking,
            **images,
            **family.row_kwargs(base, input_ids),
        )
        size = batch["prompt_input_ids"].size(0)
        sum_sq = stats and options.wpo_weights
        scored = {}
        if options.chunked_logps:
            head = family.output_head(base)
            hidden = family.hidden_states(model, base, kwargs)
            flat = hidden.reshape(-1, hidden.size(-1))
            for kind in ("chosen", "rejected"):
                index, targets = getattr(rows, f"{kind}_index").to(device), getattr(rows, f"{kind}_targets").to(device)
                scored[kind] = chunked_token_logps(
                    flat[index], targets, head, options.chunk_size, stats, sum_sq
                )
        else:
            logits = family.logits(model, kwargs)
            for kind in ("chosen", "rejected"):
                index, targets = getattr(rows, f"{kind}_index").to(device), getattr(rows, f"{kind}_targets").to(device)
                scored[kind] = full_logits_token_logps(logits, index, targets, stats, sum_sq)
    scores = _sum_scores(rows, scored, size, device, batch.get("pair_weight"), options.ld_alpha)
    if routers:
        if len(router_logits) != len(routers):  # e.g. a compiled block that does not run the hooks
            raise RuntimeError(f"the load-balancing loss saw {len(router_logits)} of {len(routers)} routers' logits")
        counts = rows.sequence_counts(batch.get("pair_weight"))
        scores.aux_loss = router_balance_loss(router_logits, counts, family.router_top_k(base))
    return scores


@contextmanager
def _router_logits(routers: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """The router logits of one forward, in layer order (its routers' first outputs); hooks are gone before a
    gradient-checkpointing recompute runs them again in the backward."""
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0])

    handles = [router.register_forward_hook(keep) for router in routers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _ranks_need_the_tower(tower: nn.Module, grads: bool) -> bool:
    """True when every rank must run the tower each step: ZeRO-3 gathers its parameters collectively, and a
    trained tower's gradients are reduced across ranks (ZeRO-2 buckets, DDP) in the order they are produced."""
    if is_partitioned(tower):
        return True
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed and grads and any(p.requires_grad for p in tower.parameters())


@contextmanager
def _blank_tower_pass(base: nn.Module, family: Any, active: bool) -> Iterator[None]:
    """Text-only rows on this rank: run the tower on a blank image right after the token embeddings.

    Ranks with images run the tower at that point of the forward (and its backward after the decoder's), so the
    blank pass keeps every rank's parameter gathers and gradient reductions in the same order; 0 x its output
    joins the embeddings, so the rows' results are unchanged.
    """
    if not active:
        yield
        return

    def add_blank(module: nn.Module, args: Any, embeds: torch.Tensor) -> torch.Tensor:
        return embeds + 0.0 * family.blank_image_features(base).to(embeds.dtype).sum()

    handle = base.get_input_embeddings().register_forward_hook(add_blank)
    try:
        yield
    finally:
        handle.remove()


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _attention_mask(mask: torch.Tensor | dict, base: nn.Module) -> torch.Tensor | dict:
    """4-D block masks (each of a per-layer-kind dict) as additive float masks for eager attention (it adds the
    mask); others take booleans; a recurrent layer's sequences (Qwen3.5's `RecurrentRows`) stay as they are."""
    if isinstance(mask, dict):
        return {kind: _attention_mask(value, base) for kind, value in mask.items()}
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask
    if getattr(base.config, "_attn_implementation", None) != "eager":
        return mask
    dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _ld_token_weights(pairs: dict, counts: dict, alpha: float) -> dict[str, torch.Tensor]:
    """LD-DPO: 1 for an answer's first min(len_chosen, len_rejected) tokens, `alpha` for the rest (its verbose tail)."""
    shared = torch.minimum(counts["chosen"], counts["rejected"])
    weights = {}
    for kind, pair in pairs.items():  # an answer's tokens are consecutive, in order (see batching)
        position = torch.arange(pair.numel(), device=pair.device) - (torch.cumsum(counts[kind], 0) - counts[kind])[pair]
        weights[kind] = torch.where(position < shared[pair], 1.0, alpha)
    return weights


def _sum_scores(
    rows: ScoredRows,
    scored: dict,
    size: int,
    device: torch.device,
    weights: torch.Tensor | None,
    ld_alpha: float | None = None,
) -> AnswerScores:
    sums, means, lengths, stats, wpo = {}, {}, {}, {}, {}
    pairs = {kind: getattr(rows, f"{kind}_pair").to(device) for kind in ("chosen", "rejected")}
    counts = {kind: torch.bincount(pair, minlength=size) for kind, pair in pairs.items()}  # answer lengths
    ld = None if ld_alpha is None else _ld_token_weights(pairs, counts, ld_alpha)
    for kind, pair in pairs.items():
        tokens = scored[kind]
        values = tokens.logps if ld is None else tokens.logps * ld[kind]
        sums[kind] = sum_per_pair(values, pair, size)
        lengths[kind] = counts[kind].to(tokens.logps.dtype)
        means[kind] = sum_per_pair(tokens.logit_means, pair, size) / lengths[kind].clamp(min=1)
        if tokens.entropy is not None:
            stats[kind] = (sum_per_pair(tokens.entropy, pair, size), sum_per_pair(tokens.top1, pair, size))
        if tokens.log_sum_sq is not None:  # WPO eq. 2: exp(mean over tokens of log p(target) - log sum_v p_v^2)
            aligned = sum_per_pair(tokens.logps.detach() - tokens.log_sum_sq, pair, size)
            wpo[kind] = torch.exp(aligned / lengths[kind].clamp(min=1))
    chosen_logps = scored["chosen"].logps
    # mean over the chosen tokens of the pairs with weight 1 (a pair whose image failed has weight 0)
    token_weights = (torch.ones(size) if weights is None else weights).to(device)[pairs["chosen"]]
    chosen_nll = -(chosen_logps * token_weights).sum() / token_weights.sum().clamp(min=1)
    entropy = accuracy = None
    if stats:
        answer_tokens = (lengths["chosen"] + lengths["rejected"]).clamp(min=1)
        entropy = (stats["chosen"][0] + stats["rejected"][0]) / answer_tokens
        accuracy = stats["chosen"][1] / lengths["chosen"].clamp(min=1)
    return AnswerScores(
        chosen_logps=sums["chosen"],
        rejected_logps=sums["rejected"],
        chosen_logits_mean=means["chosen"],
        rejected_logits_mean=means["rejected"],
        chosen_nll=chosen_nll,
        chosen_lengths=lengths["chosen"],
        rejected_lengths=lengths["rejected"],
        entropy=entropy,
        chosen_token_accuracy=accuracy,
        wpo_weight=wpo["chosen"] * wpo["rejected"] if wpo else None,
    )
