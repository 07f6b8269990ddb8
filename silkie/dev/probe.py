"""One DPO step outside a trainer on random weights and random token batches: the GPU check's correctness, full-
size and profile stages (the benchmarks time whole trainer steps instead: `silkie.dev.bench`)."""

from __future__ import annotations

import torch

from silkie.config import DPOSection, LoraSection
from silkie.dev.tiny_qwen_vl import random_model
from silkie.dev.tiny_qwen_vl import tiny_config as make_tiny_config
from silkie.dpo.losses import DPOObjective
from silkie.dpo.objective import adapter_reference, batch_dpo_loss
from silkie.dpo.step import StepOptions
from silkie.models.loading import apply_lora
from silkie.models.qwen_vl import QWenConfig
from silkie.models.qwen_vl.configuration import official_config  # noqa: F401  (the GPU check imports it here)

PATHS = {
    "plain": StepOptions(image_once=False, share_prompt=False, chunked_logps=False),
    "optimized": StepOptions(image_once=True, share_prompt=True, chunked_logps=True),
    "optimized+cached_ref": StepOptions(image_once=True, share_prompt=True, chunked_logps=True),
}
SYSTEM_TOKENS = 20


def tiny_config() -> QWenConfig:
    """The tiny stand-in's architecture (vocabulary as the demo checkpoint)."""
    return make_tiny_config(num_ranks=512)


def build_model(config: QWenConfig, device: str, dtype: torch.dtype, lora: LoraSection, checkpointing: bool):
    """Random-weight model created on `device` in `dtype`, LoRA-wrapped, vision frozen, dropout off (the training
    default, `dpo.disable_dropout`)."""
    model = apply_lora(random_model(config, device, dtype), lora, disable_dropout=True)
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def synthetic_batch(config: QWenConfig, batch_size: int, question: int, answer: int, seed: int) -> dict:
    """Random pair batch in the collator's layout: each prompt holds one image span."""
    gen = torch.Generator().manual_seed(seed)
    start = config.image_start_id
    text_hi = min(start - 214, config.vocab_size) - 1
    span = torch.tensor([start] + [start + 2] * 256 + [start + 1])

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, text_hi, (n,), generator=gen)

    def jitter(n: int) -> int:
        return max(1, int(n * (0.8 + 0.4 * torch.rand((), generator=gen).item())))

    prompts = [torch.cat([text(SYSTEM_TOKENS), span, text(jitter(question))]) for _ in range(batch_size)]
    chosen = [text(jitter(answer)) for _ in range(batch_size)]
    rejected = [text(jitter(answer)) for _ in range(batch_size)]
    batch = {}
    for name, rows in (("prompt", prompts), ("chosen", chosen), ("rejected", rejected)):
        width = max(len(r) for r in rows)
        ids = torch.zeros(batch_size, width, dtype=torch.long)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = ids, mask
    size = config.visual["image_size"]
    batch["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=gen)
    batch["image_counts"] = torch.ones(batch_size, dtype=torch.long)
    return batch


def train_step(model, optimizer, batch: dict, options: StepOptions, dpo: DPOSection, device: str, reference=None):
    """One full optimizer step (policy + reference, backward, AdamW); returns the loss.

    `reference(batch, features)` overrides the on-the-fly reference (adapters disabled).
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    objective = DPOObjective.from_section(dpo)
    loss, _ = batch_dpo_loss(model, batch, options, objective, 0, reference or adapter_reference(model, options, 0))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def random_pair_batch(config, sizes: list[tuple[int, int, int]], with_image: list[bool | int], seed: int = 0) -> dict:
    """Pairs with prompt/chosen/rejected text lengths `sizes`; `with_image[i]` image spans (True: one) in the prompt
    of pair i, each after a few text tokens."""
    gen = torch.Generator().manual_seed(seed)
    start = config.image_start_id
    text_hi = start - 214
    prompts, chosen, rejected, image_counts = [], [], [], []
    for (lp, lc, lr), images in zip(sizes, with_image):
        parts = [torch.randint(0, text_hi, (3,), generator=gen)]
        for _ in range(int(images)):
            parts.append(torch.tensor([start] + [start + 2] * 256 + [start + 1]))
            parts.append(torch.randint(0, text_hi, (2,), generator=gen))
        image_counts.append(int(images))
        parts.append(torch.randint(0, text_hi, (lp,), generator=gen))
        prompts.append(torch.cat(parts))
        chosen.append(torch.randint(0, text_hi, (lc,), generator=gen))
        rejected.append(torch.randint(0, text_hi, (lr,), generator=gen))
    batch = {}
    for name, rows in (("prompt", prompts), ("chosen", chosen), ("rejected", rejected)):
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = _pad(rows, 0)
    size = config.visual["image_size"]
    batch["pixel_values"] = torch.randn(sum(image_counts), 3, size, size, generator=gen)
    batch["image_counts"] = torch.tensor(image_counts)
    return batch


def image_prompt_ids(config, batch: int = 2, prefix: int = 6, suffix: int = 20, seed: int = 0) -> torch.Tensor:
    """Random text ids around one `<img>` span per row (256 `<imgpad>` slots)."""
    gen = torch.Generator().manual_seed(seed)
    start = config.image_start_id
    text_hi = start - 214
    span = torch.tensor([start] + [start + 2] * 256 + [start + 1])
    rows = []
    for _ in range(batch):
        pre = torch.randint(0, text_hi, (prefix,), generator=gen)
        post = torch.randint(0, text_hi, (suffix,), generator=gen)
        rows.append(torch.cat([pre, span, post]))
    return torch.stack(rows)
