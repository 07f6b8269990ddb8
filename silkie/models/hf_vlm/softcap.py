"""The logit soft-capping of Gemma's language models as a head module (for log-probs read from hidden states)."""

from __future__ import annotations

import torch
from torch import nn


class SoftcappedHead(nn.Module):
    """`lm_head` then transformers' logit soft-capping, cap * tanh(logits / cap) (Gemma 2 / Gemma 4's
    `final_logit_softcapping`); `weight` is the head's."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, float(cap)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap
