"""Command-line plumbing shared by the scripts (imports no torch, so `--help` stays fast)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from silkie.errors import InputError, os_error_exit
from silkie.logs import on_terminal, quiet_libraries

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ToolError(Exception):
    """A problem the user can fix (missing file, bad option); printed as one `error:` line, exit code 2."""


def run_cli(command: Callable[..., int], *args: Any) -> int:
    """Run `command(*args)`; a `ToolError` (or `InputError`) becomes `error: <message>` on stderr and exit code 2,
    Ctrl-C `interrupted` and 130 (the shell's code for SIGINT) without a traceback. Off a terminal, no progress
    bars."""
    quiet_libraries(on_terminal())
    try:
        return command(*args)
    except (ToolError, InputError) as err:  # bad input (a recipe, data, checkpoint) is said in one line too
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        return os_error_exit(err, EXIT_USAGE)


def require_writable(path: str | Path, what: str, folder: bool = False) -> Path:
    """`path` as a Path, or a `ToolError` when it cannot be written: a folder where a file goes (or the reverse),
    or no write permission there. Checked before long work whose result goes there."""
    path = Path(path)
    kind, other = ("a folder", "a file") if folder else ("a file", "a folder")
    if path.exists() and path.is_dir() != folder:
        raise ToolError(f"{what} {path} is {other}; expected {kind}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() and existing != path:
        raise ToolError(f"{what} {path} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise ToolError(f"{what} {path} cannot be written: {existing} is not writable")
    return path


def require_file(path: str | Path, what: str) -> Path:
    """`path` as a Path, or a `ToolError` naming it when it is not an existing file."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{what} not found: {path}")
    return path


def read_image(path: str | Path) -> Any:
    """The image at `path` as an upright RGB PIL image, decoded as training decodes images; `ToolError` naming the
    file when it is missing or unreadable."""
    from silkie.data.images import ImageLoadError, decode_image

    path = require_file(path, "image file")
    try:
        return decode_image(str(path), Path(path).read_bytes())
    except ImageLoadError as exc:
        raise ToolError(f"cannot read image {path}: {exc.reason}") from exc
    except OSError as exc:
        raise ToolError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def require_dir(path: str | Path, what: str, marker: str | None = None) -> Path:
    """`path` as a Path, or a `ToolError` when it is not a folder (holding `marker`, when given)."""
    path = Path(path)
    if not path.is_dir():
        raise ToolError(f"{what} not found: {path}")
    if marker is not None and not (path / marker).is_file():
        raise ToolError(f"{what} {path} has no {marker}")
    return path


def require_model_dir(path: str | Path, what: str = "model folder") -> Path:
    """A checkpoint folder holding config.json: `path`, or a hub id's snapshot in the local hub cache (as training
    reads `model.path`); a `ToolError` otherwise."""
    from silkie.config.checkpoint import cached_snapshot
    from silkie.config.names import HUB_ID

    folder = cached_snapshot(path)
    if folder is None and HUB_ID.match(str(path)):
        raise ToolError(
            f"{what} not found: {path} is no folder here and no snapshot of that hub id is in the local hub cache "
            f"(download it once where online: huggingface-cli download {path})"
        )
    return require_dir(folder or path, what, "config.json")


def read_config(loader: Callable[..., Any], path: str | Path, *args: Any) -> Any:
    """`loader(path, *args)` (a recipe, pool, judge or rounds file), its `RecipeError` as the one-line
    `ToolError`."""
    from silkie.errors import RecipeError

    try:
        return loader(path, *args)
    except RecipeError as err:
        raise ToolError(str(err)) from err
