"""TRL's conversational preference format -> the plain text a preference row holds.

TRL (and exports of LLaMA-Factory / ms-swift data) write a pair as chat messages: `prompt` is a list of
`{"role", "content"}` whose content is a string or a list of parts (`{"type": "text", "text": ...}`,
`{"type": "image"}`, `{"type": "video"}`), and `chosen` / `rejected` are the assistant's message. Without a
`prompt` (TRL's implicit-prompt form) `chosen` and `rejected` are whole conversations sharing their first turns.
A one-turn user prompt becomes its text with `<image>` / `<video>` markers where its parts were; a system message
or earlier turns are refused by row (a preference row has no field for them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from silkie.data.row_error import RowError

MARKERS = {"image": "<image>", "video": "<video>"}


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or its parts joined with a media marker for each image / video."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError("wrong_type", f"{where} content is {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in MARKERS:
            parts.append(MARKERS[kind])
        else:
            raise RowError("wrong_type", f"{where}: a part {part!r:.60} (expected a text, image or video part)")
    return "".join(parts)


def _message(messages: Any, role: str, where: str) -> str:
    """The text of `messages` when it is one message of `role` (or already a string)."""
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise RowError("wrong_type", f"{where} is {type(messages).__name__}")
    roles = [message.get("role") for message in messages]
    if roles != [role]:
        raise RowError(
            "unsupported_conversation",
            f"{where} has the roles {roles}; one {role} message is taken (no system message or earlier turns)",
        )
    return message_text(messages[0].get("content"), where)


def plain_row(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """`raw` with a conversational `prompt`, `chosen` and `rejected` turned into text (a plain row as it is)."""
    fields = ("prompt", "chosen", "rejected")
    if not any(isinstance(raw.get(name), list) for name in fields):
        return raw
    row = dict(raw)
    if row.get("prompt") is None and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        shared = 0  # the implicit prompt: the turns both conversations start with
        while shared < min(len(row["chosen"]), len(row["rejected"])) - 1 and (
            row["chosen"][shared] == row["rejected"][shared]
        ):
            shared += 1
        row["prompt"] = row["chosen"][:shared]
        row["chosen"], row["rejected"] = row["chosen"][shared:], row["rejected"][shared:]
    row["prompt"] = _message(row.get("prompt"), "user", "prompt") if row.get("prompt") is not None else None
    for name in ("chosen", "rejected"):
        if row.get(name) is not None:
            row[name] = _message(row[name], "assistant", name)
    return row
