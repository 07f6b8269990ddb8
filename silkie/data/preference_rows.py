"""A generic preference file's row -> `PreferenceRow`: plain, or in a chat layout (`conversational`), with the file's
own column names (`data.columns`), media keys (files, or pictures the row holds), a system message and earlier
turns. A row that cannot be read raises `RowError` with its reason."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from silkie.data.conversational import history_turns, plain_row
from silkie.data.embedded import EmbeddedMedia, is_embedded
from silkie.data.row_error import RowError, require_field
from silkie.models.media import IMAGE_MARKER, VIDEO_MARKER, Turns, as_turns


@dataclass(frozen=True)
class PreferenceRow:
    """A row of a generic preference file (one chosen and one rejected answer, any number of images/videos)."""

    id: str
    prompt: str
    images: tuple[str, ...]
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    videos: tuple[str, ...] = ()
    system: str | None = None  # the system message (None: the chat template's default)
    history: Turns = ()  # earlier (user, assistant) turns before the prompt, oldest first

    def __post_init__(self) -> None:  # turns given as lists too (a row stays hashable: duplicates are found by it)
        object.__setattr__(self, "history", as_turns(self.history))


def _optional_score(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowError("wrong_type", f"{key} is {type(value).__name__}")
    try:
        return float(value)
    except ValueError as exc:
        raise RowError("wrong_type", f"{key}={value!r} is not a number") from exc


def _media_key(value: Any, where: str, media: EmbeddedMedia | None) -> str:
    """One media field value as a store key: a path as given, or the key of the picture the row holds."""
    if not is_embedded(value):
        return value
    if media is None:
        raise RowError("embedded_media", f"{where} holds the picture itself (a datasets Image column): checking it "
                       "needs a folder to write it into, not a zip")  # fmt: skip
    return media.key(value, where)


def _media_keys(raw: Mapping[str, Any], one: str, many: str, media: EmbeddedMedia | None) -> tuple[str, ...]:
    """The row's `one` (a key) or `many` (a list of keys, order kept) field as a tuple; empty keys are absent;
    pictures held in the row are written out by `media` and named by their keys."""
    single, several = raw.get(one), raw.get(many)
    if single is not None and several is not None:
        raise RowError("wrong_type", f"both {one} and {many} are set; give one of them")
    if single is not None:
        single = _media_key(single, one, media)
        if not isinstance(single, str):
            raise RowError("wrong_type", f"{one} is {type(single).__name__}")
        return (single,) if single else ()
    if several is None:
        return ()
    if isinstance(several, list):
        several = [_media_key(item, f"{many}[{index}]", media) for index, item in enumerate(several)]
    if not isinstance(several, list) or not all(isinstance(item, str) for item in several):
        raise RowError("wrong_type", f"{many} must be a list of strings")
    if any(not item for item in several):
        raise RowError("wrong_type", f"{many} holds an empty key")
    return tuple(several)


def _history(value: Any) -> Turns:
    """A row's earlier turns: [[user, assistant], ...] (LLaMA-Factory's `history` column; a conversation's turns
    arrive so) or their messages (`role` / `content` or `from` / `value`, alternating from a user message to an
    answer); an answer may not hold a picture or video marker (pictures go in user turns)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise RowError("wrong_type", f"history is {type(value).__name__} (expected a list of [user, assistant])")
    if value and all(isinstance(message, Mapping) for message in value):
        value = history_turns(value)
    for index, turn in enumerate(value):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            shape = f"{len(turn)} items" if isinstance(turn, (list, tuple)) else type(turn).__name__
            raise RowError("wrong_type", f"history[{index}] is {shape} (expected [user, assistant])")
        for part, text in zip(("user", "assistant"), turn):
            if not isinstance(text, str):
                raise RowError("wrong_type", f"history[{index}]'s {part} text is {type(text).__name__}")
        if IMAGE_MARKER in turn[1] or VIDEO_MARKER in turn[1]:
            raise RowError("unsupported_conversation", f"history[{index}]: an earlier answer holds a picture or "
                           "video (they go in user turns)")  # fmt: skip
    return as_turns(value)


def renamed_columns(raw: Mapping[str, Any], columns: Mapping[str, str | None] | None) -> Mapping[str, Any]:
    """`raw` with the file's own columns under the fields `columns` (`data.columns`: field -> column) maps them to;
    a file column named like a mapped field is not read, nor is a mapped column under its own name, nor a field
    mapped to None (`{history: null}`: the file's `history` is something else)."""
    if not columns:
        return raw
    sources = set(columns.values())  # `{images: image}`: the file's `image` is read as images only
    row = {name: value for name, value in raw.items() if name not in columns and name not in sources}
    for field_name, column in columns.items():
        if column is not None and raw.get(column) is not None:
            row[field_name] = raw[column]
        elif field_name in ("prompt", "chosen", "rejected"):
            raise RowError("missing_field", f"{column} (data.columns.{field_name})")
    return row


def alpaca_prompt(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """LLaMA-Factory's alpaca layout (`instruction`, optional `input`) with its prompt as `prompt`: the two texts
    joined by a newline, as its converter joins them; a row with a `prompt` is as it is."""
    if row.get("prompt") is not None or row.get("instruction") is None:
        return row
    if not (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)):
        return row  # a conversation (TRL's implicit prompt, ShareGPT) beside a column of that name
    parts = [row.get("instruction"), row.get("input")]
    for name, text in zip(("instruction", "input"), parts):
        if text is not None and not isinstance(text, str):
            raise RowError("wrong_type", f"{name} is {type(text).__name__}")
    return {**row, "prompt": "\n".join(text for text in parts if text)}


def _absent(name: str, row: Mapping[str, Any], original: Mapping[str, Any]) -> str:
    """What a row lacking `name` lacks: a null value, the answers beside a conversation, or a column of this name
    (then the file's own columns, for `data.columns`)."""
    if name in row:
        return f"{name} is null"
    if any(isinstance(original.get(key), list) for key in ("conversations", "messages")):
        return "chosen / rejected messages beside the conversation (or ms-swift's rejected_response)"
    names = sorted(map(str, original))
    shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    return f"{name} (the row has {shown}; data.columns maps other names)"


def normalize_preference_row(
    raw: Any, media: EmbeddedMedia | None = None, columns: Mapping[str, str] | None = None
) -> PreferenceRow:
    """One raw generic preference row (plain, or TRL's conversational format; `columns`: its own column names, as
    `data.columns`) -> `PreferenceRow`; raises `RowError` with a reason. Pictures and videos held in the row are
    written out by `media` (without it: `embedded_media`)."""
    if not isinstance(raw, Mapping):
        raise RowError("wrong_type", f"row is {type(raw).__name__}")
    original, raw = raw, plain_row(alpaca_prompt(renamed_columns(raw, columns)))
    absent = next((name for name in ("prompt", "chosen", "rejected") if raw.get(name) is None), None)
    if absent is not None:
        raise RowError("missing_field", _absent(absent, raw, original))
    prompt = require_field(raw, "prompt", str)
    chosen = require_field(raw, "chosen", str)
    rejected = require_field(raw, "rejected", str)
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError("wrong_type", f"system is {type(system).__name__}")
    history = _history(raw.get("history"))
    images = _media_keys(raw, "image", "images", media)
    videos = _media_keys(raw, "video", "videos", media)
    if raw.get("id") is not None:
        row_id = str(require_field(raw, "id", (str, int)))
    else:  # (one image: the id of earlier versions; earlier turns only where there are some)
        media = "\0".join(images) + ("\0v\0" + "\0".join(videos) if videos else "")
        turns = "\0h\0" + json.dumps(history, ensure_ascii=False) if history else ""
        row_id = "pref-" + hashlib.sha1(f"{prompt}\0{media}{turns}".encode()).hexdigest()[:16]
    return PreferenceRow(
        id=row_id,
        prompt=prompt,
        images=images,
        videos=videos,
        chosen=chosen,
        rejected=rejected,
        chosen_score=_optional_score(raw, "chosen_score"),
        rejected_score=_optional_score(raw, "rejected_score"),
        system=system if system and system.strip() else None,  # "" (or blanks): unset, as LLaMA-Factory writes it
        history=history,
    )
