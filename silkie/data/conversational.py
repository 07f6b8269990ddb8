"""TRL's conversational preference format -> the plain text a preference row holds.

TRL (and exports of LLaMA-Factory / ms-swift data) write a pair as chat messages: `prompt` is a list of
`{"role", "content"}` whose content is a string or a list of parts (`{"type": "text", "text": ...}`,
`{"type": "image"}`, `{"type": "video"}`), and `chosen` / `rejected` are the assistant's message. Without a
`prompt` (TRL's implicit-prompt form) `chosen` and `rejected` are whole conversations sharing their first turns.
LLaMA-Factory's ShareGPT preference rows (`conversations` of `{"from": "human" | "gpt" | "system", "value"}`, `chosen`
/ `rejected` one message each, an optional `system` column) and ms-swift's RLHF rows (`messages` whose last is the
chosen answer, `rejected_response`) are read as the same.
The last user message becomes the prompt's text with `<image>` / `<video>` markers where its parts were, a system
message before it the row's `system`, and earlier user / assistant turns the row's `history` (LLaMA-Factory's
`history` column: [[user, assistant], ...]).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from silkie.data.row_error import RowError

MARKERS = {"image": "<image>", "video": "<video>"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# what a pair has no place for: the answers' own media (ms-swift's rejected_*), tool schemas
UNSUPPORTED_COLUMNS = {
    "rejected_images": "a rejected answer with pictures of its own",
    "rejected_videos": "a rejected answer with videos of its own",
    "rejected_messages": "a rejected conversation of its own (give rejected_response)",
    "tools": "tool definitions",
}


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
    _check_messages(messages, where)
    roles = [message.get("role") for message in messages]
    if roles != [role]:
        raise RowError("unsupported_conversation", f"{where} has the roles {roles}; one {role} message is taken")
    return message_text(messages[0].get("content"), where)


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        what = f"a list holding {type(next(m for m in messages if not isinstance(m, Mapping))).__name__}" if (
            isinstance(messages, list)) else type(messages).__name__  # fmt: skip
        raise RowError("wrong_type", f"{where} is {what} (expected a string, or a list of {{role, content}} messages)")


def _alternating_texts(messages: list, where: str, last: str, offset: int = 0) -> list[str]:
    """The texts of user and assistant messages that alternate from a user message to a `last` one; errors name
    them as `where[offset + i]`."""
    roles = [message.get("role") for message in messages]
    expected = [("user", "assistant")[index % 2] for index in range(len(roles))]
    if not roles or roles != expected or roles[-1] != last:
        after = " after the system message" if offset else ""
        end = "the last one" if last == "user" else "an answer"
        raise RowError("unsupported_conversation", f"{where} has the roles {roles}{after}; user and assistant "
                       f"messages alternate, from a user message to {end}")  # fmt: skip
    return [
        message_text(message.get("content"), f"{where}[{offset + index}]") for index, message in enumerate(messages)
    ]


def _prompt_turns(messages: Any, where: str = "prompt", offset: int = 0) -> tuple[list[list[str]], str]:
    """(earlier [user, assistant] turns, the last user message's text) of a prompt's messages, which alternate from a
    user message to the last user message (a string: one turn); errors name them as `where[offset + i]`."""
    if isinstance(messages, str):
        return [], messages
    _check_messages(messages, where)
    texts = _alternating_texts(messages, where, "user", offset)
    return [texts[index : index + 2] for index in range(0, len(texts) - 1, 2)], texts[-1]


def history_turns(messages: list) -> list[list[str]]:
    """[user, assistant] turns of a `history` given as messages (`role` / `content` or `from` / `value`), which
    alternate from a user message to an answer."""
    normalized = [_chat_message(message, f"history[{index}]") for index, message in enumerate(messages)]
    texts = _alternating_texts(normalized, "history", "assistant")
    return [texts[index : index + 2] for index in range(0, len(texts), 2)]


def _system_text(content: Any) -> str:
    """A system message's text (it holds no picture or video)."""
    text = message_text(content, "the system message")
    if any(marker in text for marker in MARKERS.values()) and not isinstance(content, str):
        raise RowError("wrong_type", "the system message holds an image or video part")
    return text


def _chat_message(message: Any, where: str) -> dict[str, Any]:
    """A ShareGPT (`from` / `value`) or OpenAI (`role` / `content`) message as `{role, content}`."""
    if not isinstance(message, Mapping):
        raise RowError("wrong_type", f"{where} is {type(message).__name__} (expected a {{role, content}} or {{from, "
                       "value} message)")  # fmt: skip
    if "from" not in message:
        return {"role": message.get("role"), "content": message.get("content")}
    role = SHAREGPT_ROLES.get(message["from"])
    if role is None:
        expected = "expected human, gpt or system"
        raise RowError("unsupported_conversation", f"{where} is from {message['from']!r} ({expected})")
    return {"role": role, "content": message.get("value")}


def _refuse_unsupported(raw: Mapping[str, Any]) -> None:
    """`unsupported_conversation` for a row that holds what a pair cannot (unless it repeats the chosen side's)."""
    for name, what in UNSUPPORTED_COLUMNS.items():
        value = raw.get(name)
        if (
            value
            and not (name == "rejected_images" and value == raw.get("images"))
            and not (name == "rejected_videos" and value == raw.get("videos"))
        ):
            raise RowError("unsupported_conversation", f"{name}: {what} has no place in a preference pair")


def _chat_layout(raw: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """LLaMA-Factory's ShareGPT preference row (`conversations` + `chosen` / `rejected` messages) or ms-swift's RLHF
    row (`messages` ending with the chosen answer + `rejected_response`) in TRL's conversational form, with the
    column its prompt's messages come from."""
    _refuse_unsupported(raw)
    messages = raw.get("messages")
    if isinstance(messages, list) and isinstance(raw.get("rejected_response"), str):  # ms-swift
        turns = [_chat_message(message, f"messages[{index}]") for index, message in enumerate(messages)]
        if not turns or turns[-1]["role"] != "assistant":
            raise RowError("unsupported_conversation", "messages end without the assistant's (chosen) answer")
        row = {name: value for name, value in raw.items() if name not in ("messages", "rejected_response")}
        return {**row, "prompt": turns[:-1], "chosen": turns[-1:], "rejected": raw["rejected_response"]}, "messages"
    column = "conversations" if "conversations" in raw else "messages"
    conversation = raw.get(column)
    if isinstance(conversation, list) and all(isinstance(raw.get(name), Mapping) for name in ("chosen", "rejected")):
        row = {name: value for name, value in raw.items() if name not in ("conversations", "messages")}
        row["prompt"] = [_chat_message(turn, f"{column}[{index}]") for index, turn in enumerate(conversation)]
        for name in ("chosen", "rejected"):
            row[name] = [_chat_message(raw[name], name)]
        return row, column
    return raw, "prompt"


def plain_row(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """`raw` with a conversational `prompt`, `chosen` and `rejected` (TRL's, LLaMA-Factory's ShareGPT or ms-swift's
    layout) turned into text (a plain row as it is)."""
    raw, where = _chat_layout(raw)
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
        row["prompt"], where = row["chosen"][:shared], "chosen"
        row["chosen"], row["rejected"] = row["chosen"][shared:], row["rejected"][shared:]
        if len(row["chosen"]) > 1 or len(row["rejected"]) > 1:
            counts = f"{len(row['chosen'])} and {len(row['rejected'])}"
            raise RowError("unsupported_conversation", "after the messages both start with (the prompt), chosen and "
                           f"rejected must be one assistant message each (they have {counts})")  # fmt: skip
    for name in fields:  # ShareGPT tags (`from` / `value`) in TRL's layout too
        if isinstance(row.get(name), list):
            row[name] = [_chat_message(message, f"{name}[{index}]") for index, message in enumerate(row[name])]
    prompt, offset = row.get("prompt"), 0
    if isinstance(prompt, list) and prompt and prompt[0].get("role") == "system":
        text, column = _system_text(prompt[0].get("content")), row.get("system")
        if isinstance(column, str) and column.strip() and column.strip() != text.strip():
            raise RowError("wrong_type", "a system column and a system message in the prompt that differ; give one")
        row["system"] = text
        prompt, offset = prompt[1:], 1
    if prompt is not None:
        history, row["prompt"] = _prompt_turns(prompt, where, offset)
        if history and row.get("history"):
            raise RowError("unsupported_conversation", "a history column beside a prompt with earlier turns; give one")
        row["history"] = history or row.get("history")
    for name in ("chosen", "rejected"):
        if row.get(name) is not None:
            row[name] = _message(row[name], "assistant", name)
    return row
