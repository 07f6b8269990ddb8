"""The error a row that cannot be read raises: loaders count it under its reason and go on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RowError(ValueError):
    """A row that cannot be normalized; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = "", problem: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail  # where (a file's line) or what (a field), as the loaders count it
        self.problem = problem  # what was wrong there, when `detail` names a place (e.g. the JSON parser's words)


def require_field(raw: Mapping[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    """`raw[key]` when it is set and of `types` (a bool is no number); `RowError` (`missing_field`, `wrong_type`)."""
    if key not in raw or raw[key] is None:
        raise RowError("missing_field", key)
    value = raw[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise RowError("wrong_type", f"{key} is {type(value).__name__}")
    return value
