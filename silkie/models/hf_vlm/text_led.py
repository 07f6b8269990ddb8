"""Marker replacements that open with text (Qwen3-VL's `<t seconds>`, InternVL's `Frame1: `), tokenized as a
processor's whole-text tokenization does: together with the prompt text before the marker.

A processor writes such text in place of the marker and tokenizes the whole prompt, so the opening text and the
text before the marker (since the last added token, which splits the text before it is tokenized) can merge into
other tokens (a space then `<` or `F` is one token in Qwen's vocabulary). Text is tokenized in its place: after the
added token that precedes it (a sentencepiece-style tokenizer marks only the very start of the input with `▁`, not
text after an added token). The collator calls `joined(before)` on these layouts
(`silkie.data.collator.expand_markers`).
"""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=16)
def added_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of a tokenizer's added tokens (they split the text before it is tokenized)."""
    return frozenset(tokenizer.added_tokens_decoder)


def ids_after(tokenizer: Any, boundary: int | None, text: str) -> list[int]:
    """`text`'s ids where it follows the added token `boundary` (None: at the start of the input)."""
    if boundary is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = tokenizer.convert_ids_to_tokens(boundary)
    ids = tokenizer(lead + text, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] != boundary:
        raise ValueError(f"the added token {lead!r} does not tokenize to itself")
    return ids[1:]


def text_after(tokenizer: Any, boundary: int | None, ids: list[int]) -> str:
    """The text of `ids` that follow the added token `boundary`, decoded in place (a sentencepiece-style decoder
    drops a leading space only at the start of its input: after the boundary that space is the text's own)."""
    if not ids:
        return ""
    if boundary is None:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    lead = tokenizer.convert_ids_to_tokens(boundary)
    text = tokenizer.decode([boundary, *ids], clean_up_tokenization_spaces=False)
    return text[len(lead) :] if text.startswith(lead) else tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def join_with_text_before(
    tokenizer: Any, before: list[int], layout: list[int], text_ids: int, text: str
) -> tuple[int, list[int]]:
    """(n, ids): the last n of `before` (its text since the last added token) and the marker become `ids`: that
    text and the layout's opening `text` (its first `text_ids` ids) tokenized as one, in place, then the rest of
    the layout; the same ids where the two do not interact (text after a newline)."""
    boundaries = added_ids(tokenizer)
    start = len(before)
    while start and before[start - 1] not in boundaries:
        start -= 1
    boundary = before[start - 1] if start else None
    joined = ids_after(tokenizer, boundary, text_after(tokenizer, boundary, before[start:]) + text)
    return len(before) - start, joined + layout[text_ids:]


class TextLedIds(list):
    """The ids that replace a marker, opening with `text` (its first `text_ids` ids): `joined(before)` retokenizes
    the prompt's text before the marker with it (`join_with_text_before`)."""

    def __init__(self, ids: list[int], text_ids: int, text: str, tokenizer: Any):
        super().__init__(ids)
        self.text_ids, self.text, self.tokenizer = text_ids, text, tokenizer

    def joined(self, before: list[int]) -> tuple[int, list[int]]:
        """(how many ids at the end of `before` are replaced, the ids replacing them and the marker)."""
        return join_with_text_before(self.tokenizer, before, list(self), self.text_ids, self.text)
