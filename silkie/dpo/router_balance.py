"""The load-balancing loss of a mixture-of-experts language model's routers (Switch Transformer, eqs. 4-6), as TRL's
`DPOTrainer` adds it for MoE models: `router_aux_loss_coef` x the `aux_loss` transformers computes from the router
logits of every layer over the non-padding tokens of the batch [prompt+chosen; prompt+rejected]."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def router_balance_loss(router_logits: Sequence[torch.Tensor], token_weights: torch.Tensor, top_k: int) -> torch.Tensor:
    """E x sum_e f_e P_e over all layers' routers: f_e the share of top-k assignments that go to expert e, P_e its
    mean routing probability, both over tokens counted `token_weights` times.

    `router_logits`: one [T, E] tensor per router, its T tokens in the row-major order of `token_weights` (any
    shape with T elements: 0 for padding and for every token of a pair left out of the loss, 1 for a token, 2 for
    a shared prompt token that TRL's batch holds twice, once before each answer; no token counted gives 0). With
    0/1 weights this is transformers' `load_balancing_loss_func` with an attention mask; softmax and sums are in
    fp32 (transformers takes the softmax in the logits' dtype). The assignment shares carry no gradient (a top-k
    choice); the probabilities do.
    """
    weights = token_weights.reshape(-1).to(router_logits[0].device, torch.float32)
    experts = router_logits[0].size(-1)
    assigned = weights.new_zeros(experts)
    probability = weights.new_zeros(experts)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        assigned = assigned + weights.new_zeros(experts).scatter_add_(
            0, chosen.reshape(-1), weights.repeat_interleave(top_k)
        )
        probability = probability + (probs * weights[:, None]).sum(dim=0)
    total = (weights.sum() * len(router_logits)).clamp(min=1.0)  # no token counted (every pair left out): 0
    return experts * torch.sum((assigned / total) * (probability / total))
