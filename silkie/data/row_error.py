"""The error a row that cannot be read raises: loaders count it under its reason and go on."""

from __future__ import annotations


class RowError(ValueError):
    """A row that cannot be normalized; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
