"""Where a prompt's images and videos go: at its `<image>` / `<video>` markers, else first (images, then videos).

A pair's media are keys in order (`images: [...]`, `videos: [...]`). A prompt that places them writes one marker
per key, in order; a kind without markers goes before the text. Each family's codec renders the segments its own
way (Qwen-VL-Chat: `Picture k: <img>KEY</img>\\n`; chat templates: `{"type": "image"}` content parts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from silkie.models.family import PairTextError

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


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


def marker_mismatch(prompt: str, images: Sequence[str], videos: Sequence[str]) -> str | None:
    """What is wrong when the prompt has `<image>` (`<video>`) markers but not one per image (video), else None
    (no markers of a kind: its media go first)."""
    for marker, keys, kind in ((IMAGE_MARKER, images, "image"), (VIDEO_MARKER, videos, "video")):
        found = prompt.count(marker)
        if found and found != len(keys):
            return f"the prompt has {found} {marker} marker(s) for {len(keys)} {kind}(s)"
    return None


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
    for part in _MARKERS.split(prompt):
        kind = next((name for name, marker in markers.items() if part == marker), None)
        if kind is not None:
            segments.append(Segment(kind, queues[kind].pop(0)))
        elif part:
            segments.append(Segment("text", part))
    return segments
