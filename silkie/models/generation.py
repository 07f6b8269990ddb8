"""What `generate` needs from a family: the ids that end an answer, and the inputs of a collated pair's prompt (its
pictures and videos included), so training and the tools answer a prompt the way the trainer scores it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .family import unwrap_causal_lm


def text_tokenizer(codec: Any) -> Any:
    """The tokenizer behind a pair codec (Qwen-VL's codec is its tokenizer; the chat-template codec holds one)."""
    return getattr(codec, "tokenizer", codec)


def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """Generation stops at `<|im_end|>`, `<|im_start|>` or `<|endoftext|>` (Qwen-VL), or at the tokenizer's EOS
    and the model's own stops (a transformers model's `generation_config.eos_token_id`: Gemma 3 ends a turn with
    `<end_of_turn>`, its tokenizer's EOS is `<eos>`)."""
    if hasattr(tokenizer, "im_end_id"):
        return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [own] if isinstance(own, int) else list(own or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *own]))


def pad_token_id(tokenizer: Any) -> int:
    """The id `generate` pads finished rows with."""
    pad = getattr(tokenizer, "eod_id", None)
    return pad if pad is not None else (tokenizer.pad_token_id or tokenizer.eos_token_id)


def decode_answer(tokenizer: Any, generated: list[int], stops: Any) -> tuple[str, int, bool]:
    """(text, tokens up to and with the first stop token, whether there was one) of `generate`'s new tokens (a
    finished row of a batch is padded after its stop)."""
    end = next((i + 1 for i, token in enumerate(generated) if token in stops), None)
    stopped = end is not None
    end = end if stopped else len(generated)
    return tokenizer.decode(generated[:end], skip_special_tokens=True).strip(), end, stopped


def prompt_generation_inputs(model: nn.Module, batch: dict, index: int = 0) -> dict[str, torch.Tensor]:
    """`generate` inputs for the prompt of pair `index` of a collated batch: its ids without padding, and the
    family's forward kwargs for that pair's images and videos (in prompt order)."""
    base, family = unwrap_causal_lm(model)
    device = next(base.parameters()).device
    ids = batch["prompt_input_ids"][index][batch["prompt_attention_mask"][index].bool()][None].to(device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    images, videos = (batch[f"{kind}_counts"] for kind in ("image", "video"))
    first_image, first_video = int(images[:index].sum()), int(videos[:index].sum())
    image_order = torch.arange(first_image, first_image + int(images[index]), device=device)
    video_order = torch.arange(first_video, first_video + int(videos[index]), device=device)
    if image_order.numel() or video_order.numel():
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        kwargs |= family.row_image_kwargs(base, on_device, image_order, None, video_order)
    return kwargs | family.row_kwargs(base, ids)
