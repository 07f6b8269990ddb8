"""Shared pieces of the DPO step tests: random pair batches and a tiny Qwen-VL-Chat with a live LoRA adapter."""

import torch

from silkie.config import LoraSection
from silkie.dev.probe import random_pair_batch  # noqa: F401
from silkie.models.loading import apply_lora
from silkie.models.qwen_vl import QWenConfig, QWenLMHeadModel

from .conftest import tiny_config_kwargs


def tiny_lora_model() -> torch.nn.Module:
    """The tiny Qwen-VL-Chat (seed 0) with an r=8 adapter whose B is non-zero, so the adapter changes the output."""
    torch.manual_seed(0)
    model = apply_lora(QWenLMHeadModel(QWenConfig(**tiny_config_kwargs())), LoraSection(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model.train()


def step(model, batch, options):
    """One DPO step of a Qwen-VL LoRA model (reference: adapter off): (policy, reference, loss, LoRA grads)."""
    from silkie.dpo.losses import DPOObjective
    from silkie.dpo.step import encode_images_once, score_answers

    features = encode_images_once(model, batch) if options.image_once else None
    policy = score_answers(model, batch, options, 0, image_features=features)
    with model.disable_adapter():
        ref = score_answers(model, batch, options, 0, image_features=features, no_grad=True)
    out = DPOObjective(beta=0.1)(policy.chosen_logps, policy.rejected_logps, ref.chosen_logps, ref.rejected_logps)
    model.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return policy, ref, out.loss.detach(), grads
