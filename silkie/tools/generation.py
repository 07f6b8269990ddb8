"""Batched answers with transformers `generate`: prompts left-padded into one batch, their images and videos
concatenated in prompt order, and sampling seeded per answer (not per batch), so an answer is the same whether it
is generated alone, in a batch of 8, or in another process's shard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from silkie.models.generation import decode_answer

# [1, L] inputs padded as the ids are (token types); the rest are per image / video
PADDED_PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


class RowSampler(LogitsProcessor):
    """Nucleus sampling with one random generator per batch row: temperature and top-p as transformers applies
    them, then a draw from each row's own generator; the drawn token is the only one left, so `generate` run
    greedily takes it."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device | str):
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picks = [torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, self.generators, strict=True)]
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, torch.cat(picks)[:, None], 0.0)


def left_pad(rows: Sequence[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] ids, [B, L] attention mask) of [1, L_i] prompts, padded on the left (generation continues on the
    right)."""
    length = max(row.shape[1] for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, length - row.shape[1] :] = row[0]
        mask[index, length - row.shape[1] :] = 1
    return ids, mask


def merge_media(rows: Sequence[dict], length: int) -> dict:
    """One batch's image/video inputs: each key's tensors concatenated in row order (the models fill the image
    tokens in that order); per-token inputs left-padded to `length` with 0 (text)."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [row[key] for row in rows if key in row]
        if key in PADDED_PER_TOKEN:
            padded = torch.zeros((len(rows), length), dtype=values[0].dtype)
            for index, row in enumerate(rows):
                padded[index, length - row[key].shape[1] :] = row[key][0]
            merged[key] = padded
        else:
            merged[key] = torch.cat(values)
    return merged


class Answer(NamedTuple):
    """A generated answer: its text, the prompt's and the answer's token counts (the stop token included), and
    whether it ended at a stop token (false: cut at the token limit; a stop as the last allowed token is a stop)."""

    text: str
    prompt_tokens: int
    answer_tokens: int
    stopped: bool


def generate_batch(
    chat: Any, tokenizer: Any, prompts: Sequence[tuple[torch.Tensor, dict]], options: Any, seeds: Sequence[int]
) -> list[Answer]:
    """The answer of each (ids [1, L], media) prompt, generated in one batch."""
    from silkie.tools.chat import generate_kwargs

    kwargs = generate_kwargs(tokenizer, prompts[0][0], None, options, chat.model)
    ids, mask = left_pad([ids for ids, _ in prompts], kwargs["pad_token_id"])
    media = chat.to_device(merge_media([tensors for _, tensors in prompts], ids.shape[1]))
    kwargs.update(input_ids=ids.to(chat.device), attention_mask=mask.to(chat.device), do_sample=False, **media)
    for name in ("top_p", "temperature"):
        kwargs.pop(name, None)
    if options.sample:
        kwargs["logits_processor"] = LogitsProcessorList(
            [RowSampler(seeds, options.temperature, options.top_p, chat.device)]
        )
    with torch.no_grad():
        out = chat.model.generate(**kwargs)
    stops = set(kwargs["eos_token_id"])
    replies = []
    for index, (prompt, _) in enumerate(prompts):
        text, end, stopped = decode_answer(tokenizer, out[index, ids.shape[1] :].tolist(), stops)
        replies.append(Answer(text, int(prompt.shape[1]), end, stopped))
    return replies
