"""`QWenLMHeadModel.chat`, as the original remote code's: the ChatML prompt of `make_context`, the pictures named in
`<img>PATH</img>` spans opened from local paths (the model itself never reads paths), generation to the first
`<|im_end|>` / `<|im_start|>` / `<|endoftext|>` under the checkpoint's generation config, and the reply appended to
the history."""

from __future__ import annotations

from typing import Any

import torch

from ..generation import pad_token_id, stop_token_ids
from .image_processing import QWenVLImageProcessor
from .tokenization import DEFAULT_SYSTEM, MAX_WINDOW_SIZE

History = list[tuple[str, str]]


def chat(
    model: Any,
    tokenizer: Any,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    append_history: bool = True,
    **generate_kwargs: Any,
) -> tuple[str, History]:
    """(reply, history) for `query` after the earlier `history` turns, as `model.chat(tokenizer, query, history)` of
    Qwen-VL-Chat's remote code (pictures: `tokenizer.from_list_format([{"image": path}, {"text": ...}])`). Keyword
    arguments go to `generate` (e.g. `do_sample=False`); the checkpoint's generation config gives the rest."""
    history = list(history or [])
    window = getattr(model.generation_config, "max_window_size", None) or MAX_WINDOW_SIZE
    ids = tokenizer.build_chat_context(query, history, system=system, max_window_size=window)
    paths = tokenizer.image_paths(ids)
    for path in paths:
        if path.startswith(("http://", "https://")):
            raise ValueError(f"chat opens pictures from local paths only; download {path} first")
    device = next(model.parameters()).device
    inputs: dict[str, Any] = {"input_ids": torch.tensor([ids], device=device)}
    if paths:
        pixels = QWenVLImageProcessor(model.config.visual["image_size"])(paths)
        inputs["pixel_values"] = pixels.to(device=device, dtype=next(model.transformer.visual.parameters()).dtype)
    stops = stop_token_ids(tokenizer)
    options = {"eos_token_id": stops, "pad_token_id": pad_token_id(tokenizer), **generate_kwargs}
    with torch.no_grad():
        out = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), **options)
    generated = out[0, len(ids) :].tolist()
    end = next((i for i, token in enumerate(generated) if token in stops), len(generated))
    reply = tokenizer.decode(generated[:end], errors="replace").strip()
    if append_history:
        history.append((query, reply))
    return reply, history
