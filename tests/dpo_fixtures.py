"""Random collated pair batches for DPO-step tests (same layout as silkie.data.collator)."""

from __future__ import annotations

import torch


def _pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def random_pair_batch(config, sizes: list[tuple[int, int, int]], with_image: list[bool], seed: int = 0) -> dict:
    """Pairs with prompt/chosen/rejected text lengths `sizes`; an image span in the prompt where asked."""
    gen = torch.Generator().manual_seed(seed)
    start = config.image_start_id
    text_hi = start - 214
    prompts, chosen, rejected, image_index = [], [], [], []
    n_images = 0
    for (lp, lc, lr), has_image in zip(sizes, with_image):
        parts = [torch.randint(0, text_hi, (3,), generator=gen)]
        if has_image:
            parts.append(torch.tensor([start] + [start + 2] * 256 + [start + 1]))
            image_index.append(n_images)
            n_images += 1
        else:
            image_index.append(-1)
        parts.append(torch.randint(0, text_hi, (lp,), generator=gen))
        prompts.append(torch.cat(parts))
        chosen.append(torch.randint(0, text_hi, (lc,), generator=gen))
        rejected.append(torch.randint(0, text_hi, (lr,), generator=gen))
    batch = {}
    for name, rows in (("prompt", prompts), ("chosen", chosen), ("rejected", rejected)):
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = _pad(rows, 0)
    size = config.visual["image_size"]
    batch["pixel_values"] = torch.randn(n_images, 3, size, size, generator=gen)
    batch["image_index"] = torch.tensor(image_index)
    return batch
