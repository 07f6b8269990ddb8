"""The error type for bad user input (torch-free, shared by the launcher, the trainer and the tools)."""

from __future__ import annotations

import sys


class InputError(ValueError):
    """A recipe value, data file, row set or checkpoint that cannot be used.

    The message is one line that names the key, file or row and what was expected; `train_dpo.py` prints it without
    a traceback, and the launcher tells the user to fix the input rather than to rerun (a rerun would repeat it).
    """


class RecipeError(InputError):
    """A recipe that does not match the schema; the message names the key (and the override or file it came from)."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder the recipe names that does not exist (still a FileNotFoundError for callers)."""


def weight_mismatch_line(message: str) -> str:
    """A torch load error's message in one line: its `size mismatch for ...` lines (one per weight) as their count
    and the first; any other message with its lines joined."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    mismatched = [line for line in lines if line.startswith("size mismatch for")]
    if mismatched:
        return f"{len(mismatched)} weights differ in shape from the model's, e.g. {mismatched[0]}"
    return "; ".join(lines)


def os_error_exit(err: OSError, code: int) -> int:
    """For a command's top level: a failed read or write that names its file (a read-only or full disk, a folder
    where a file goes) as `error: FILE: REASON` on stderr, returning `code`; one that names none is re-raised (a
    bug's traceback, not the user's input)."""
    if err.filename is None:
        raise err
    print(f"error: {err.filename}: {err.strerror or type(err).__name__}", file=sys.stderr)
    return code
