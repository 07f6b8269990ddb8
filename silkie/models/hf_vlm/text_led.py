"""Marker replacements that open with text (Qwen3-VL's `<t seconds>`, InternVL's `Frame1: `), tokenized as a
processor's whole-text tokenization does: together with the prompt text before the marker.

A processor writes such text in place of the marker and tokenizes the whole prompt, so the opening text and the
text before the marker (since the last added token, which splits the text before it is tokenized) can merge into
other tokens (a space then `<` or `F` is one token in Qwen's vocabulary). The collator calls `joined(before)` on
these layouts (`silkie.data.collator.expand_markers`).
"""

from __future__ import annotations

from typing import Any


def join_with_text_before(
    tokenizer: Any, before: list[int], layout: list[int], text_ids: int
) -> tuple[int, list[int]]:
    """(n, ids): the last n of `before` (its text since the last added token) and the marker become `ids`: that
    text and the layout's first `text_ids` ids tokenized as one, then the rest of the layout; the same ids where
    the two do not interact (text after a newline)."""
    boundaries = set(tokenizer.added_tokens_decoder)
    start = len(before)
    while start and before[start - 1] not in boundaries:
        start -= 1
    text = tokenizer.decode(before[start:] + layout[:text_ids], clean_up_tokenization_spaces=False)
    return len(before) - start, tokenizer(text, add_special_tokens=False)["input_ids"] + layout[text_ids:]


class TextLedIds(list):
    """The ids that replace a marker, opening with `text_ids` ids of text: `joined(before)` retokenizes the prompt's
    text before the marker with that text (`join_with_text_before`)."""

    def __init__(self, ids: list[int], text_ids: int, tokenizer: Any):
        super().__init__(ids)
        self.text_ids, self.tokenizer = text_ids, tokenizer

    def joined(self, before: list[int]) -> tuple[int, list[int]]:
        """(how many ids at the end of `before` are replaced, the ids replacing them and the marker)."""
        return join_with_text_before(self.tokenizer, before, list(self), self.text_ids)
