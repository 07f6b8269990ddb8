"""Train / eval split by prompt (question or a conversation's first turn, + images/videos), so no prompt appears on
both sides."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

from silkie.data.pairs import PreferencePair
from silkie.data.sources import prompt_key
from silkie.errors import InputError


def _rank(seed: int, prompt_id: str) -> str:
    return hashlib.sha1(f"{seed}\0{prompt_id}".encode()).hexdigest()


def _share(seed: int, key: tuple) -> float:
    """A prompt's own draw in [0, 1): from the prompt (question or first turn, and media), not its pairs' ids, so
    a prompt whose pairs carry several ids (or more ids in a larger release) still gets one draw."""
    return int(_rank(seed, json.dumps(key))[:15], 16) / 16**15


def split_by_prompt(
    pairs: Sequence[PreferencePair],
    eval_fraction: float = 0.0,
    eval_size: int | None = None,
    seed: int = 0,
    rule: str = "ranked",
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into (train, eval) by prompt (`prompt_key`): pairs with the same question (a conversation's
    first turn) and media stay together.

    `eval_size` is a number of prompts, `eval_fraction` a fraction of prompts (at least one prompt
    when > 0); give one of them. Prompts are ordered by a seeded hash of their id (the smallest over a prompt's
    pairs, for files that give each pair its own id), so the split depends only on the seed and the pairs, not
    on input order. Each side keeps input order.

    `rule` "hashed" holds out each prompt whose own hash (of its question or first turn and media), read as a number
    in [0, 1), is below `eval_fraction`: its side depends on the prompt and the seed alone, so a prompt stays on its
    side when other prompts or pairs come or go (data that grows, annotate rounds whose usable prompts differ), at
    the cost of an inexact count.
    """
    if eval_size is not None and eval_fraction:
        raise ValueError("give eval_fraction or eval_size, not both")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_size is not None and eval_size < 0:
        raise ValueError(f"eval_size must be >= 0, got {eval_size}")
    if rule == "hashed":  # a draw per prompt: the pairs' ids play no part
        keys = {prompt_key(pair) for pair in pairs}
        eval_keys = {key for key in keys if _share(seed, key) < eval_fraction}
        if not eval_keys or len(eval_keys) == len(keys):
            side = "no prompt" if not eval_keys else "every prompt"
            raise InputError(f"data.eval_split hashed held out {side} of {len(keys)} at data.eval_fraction "
                             f"{eval_fraction}; change the fraction, or set data.eval_split ranked (an exact "
                             "count)")  # fmt: skip
        return _sides(pairs, eval_keys)
    ranks: dict[tuple, str] = {}
    for pair in pairs:
        key, rank = prompt_key(pair), _rank(seed, pair.prompt_id)
        ranks[key] = min(rank, ranks.get(key, rank))
    if eval_size is not None:
        n_eval = eval_size
    elif eval_fraction > 0:
        n_eval = max(1, math.floor(eval_fraction * len(ranks)))
    else:
        n_eval = 0
    if n_eval == 0:
        return list(pairs), []
    if n_eval >= len(ranks):
        raise InputError(f"eval split of {n_eval} prompts leaves no training prompts (only {len(ranks)})")
    return _sides(pairs, set(sorted(ranks, key=lambda key: (ranks[key], key))[:n_eval]))


def _sides(pairs: Sequence[PreferencePair], eval_keys: set) -> tuple[list[PreferencePair], list[PreferencePair]]:
    train = [pair for pair in pairs if prompt_key(pair) not in eval_keys]
    evaluation = [pair for pair in pairs if prompt_key(pair) in eval_keys]
    return train, evaluation
