"""Where a prompt's images and videos go: at its `<image>` / `<video>` markers, else first (images, then videos).

A pair's media are keys in order (`images: [...]`, `videos: [...]`). A prompt that places them writes one marker
per key, in order; a kind without markers goes before the text. A prompt with earlier turns counts the markers of
all its user turns in order, and a kind without markers goes before the first turn's text (as ms-swift places
them). Each family's codec renders the segments its own way (Qwen-VL-Chat: `Picture k: <img>KEY</img>\\n`; chat
templates: `{"type": "image"}` content parts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from silkie.models.family import PairTextError

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


@dataclass(frozen=True)
class Segment:
    """One part of a user turn: `kind` "text" (`value` the text), "image" or "video" (`value` the key)."""

    kind: str
    value: str


def as_keys(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    """Media keys as a tuple: one key, a sequence of keys, or none (None / empty)."""
    if keys is None:
        return ()
    if isinstance(keys, str):
        return (keys,) if keys else ()
    return tuple(keys)


Turns = tuple[tuple[str, str], ...]  # a prompt's earlier (user, assistant) turns, oldest first


def as_turns(turns: Any) -> Turns:
    """Earlier turns as a tuple of (user, assistant) text pairs: from lists (json, `datasets`) or None (none)."""
    return tuple((user, assistant) for user, assistant in turns or ())


def user_texts(prompt: str, history: Turns = ()) -> list[str]:
    """The texts of a prompt's user turns, oldest first: its earlier turns' and its own."""
    return [*(user for user, _ in history), prompt]


def marker_mismatch(prompt: str | Sequence[str], images: Sequence[str], videos: Sequence[str]) -> str | None:
    """What is wrong when the prompt (or its user turns, a list) has `<image>` (`<video>`) markers but not one per
    image (video), else None (no markers of a kind: its media go first)."""
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    where = "the prompt has" if len(texts) == 1 else f"the prompt's {len(texts)} user turns have"
    for marker, keys, kind in ((IMAGE_MARKER, images, "image"), (VIDEO_MARKER, videos, "video")):
        found = sum(text.count(marker) for text in texts)
        if found and found != len(keys):
            return f"{where} {found} {marker} marker(s) for {len(keys)} {kind}(s)"
    return None


def turn_media(
    texts: Sequence[str], images: str | Sequence[str] | None = (), videos: str | Sequence[str] | None = ()
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(images, videos) of each user turn: the keys of its markers in order, and a kind without markers in any turn
    wholly in the first; `PairTextError("image_marker_mismatch")` when the markers of a kind are not one per key."""
    images, videos = as_keys(images), as_keys(videos)
    mismatch = marker_mismatch(list(texts), images, videos)
    if mismatch is not None:
        raise PairTextError("image_marker_mismatch", mismatch)
    queues = [(IMAGE_MARKER, list(images)), (VIDEO_MARKER, list(videos))]
    placed = {marker: any(marker in text for text in texts) for marker, _ in queues}
    per_turn = []
    for index, text in enumerate(texts):
        kinds = []
        for marker, keys in queues:
            count = text.count(marker) if placed[marker] else (len(keys) if index == 0 else 0)
            kinds.append(tuple(keys[:count]))
            del keys[:count]
        per_turn.append((kinds[0], kinds[1]))
    return per_turn


def media_segments(
    prompt: str, images: str | Sequence[str] | None = (), videos: str | Sequence[str] | None = ()
) -> list[Segment]:
    """The prompt as text and media segments in order; `PairTextError("image_marker_mismatch")` when it has
    markers of a kind but not one per key of that kind."""
    images, videos = as_keys(images), as_keys(videos)
    mismatch = marker_mismatch(prompt, images, videos)
    if mismatch is not None:
        raise PairTextError("image_marker_mismatch", mismatch)
    markers = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}
    queues = {"image": list(images), "video": list(videos)}
    segments = []  # a kind without markers goes first, in order
    for kind, keys in queues.items():
        if markers[kind] not in prompt:
            segments += [Segment(kind, key) for key in keys]
    for part in MARKERS.split(prompt):
        kind = next((name for name, marker in markers.items() if part == marker), None)
        if kind is not None:
            segments.append(Segment(kind, queues[kind].pop(0)))
        elif part:
            segments.append(Segment("text", part))
    return segments
