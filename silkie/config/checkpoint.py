"""What a checkpoint folder's `config.json` says: its `model_type`, and whether that fits the recipe's
`model.family` (torch-free: the launcher checks this before torchrun starts, the loaders again before parsing)."""

from __future__ import annotations

import json
from pathlib import Path

from silkie.errors import InputError

from .names import CONVERT_HINTS, FAMILY_TABLE, HUB_ID, MODEL_TYPES


def cached_snapshot(path: str | Path) -> Path | None:
    """A checkpoint folder without the network: `path` when it is a folder, else a hub id's snapshot in the local
    hub cache (None when neither)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if not HUB_ID.match(str(path)):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not in the cache (or not a valid id)
        return None


def model_type_of(folder: str | Path) -> str | None:
    """`model_type` of a checkpoint folder's config.json (None without one)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InputError(f"{config}: not a JSON object ({err})") from err


def checkpoint_family(folder: str | Path) -> str | None:
    """The family whose model_type a local checkpoint folder's config.json names; None without a config.json,
    for a model_type of no family, or for a config.json that cannot be read (the checks name that one)."""
    try:
        return MODEL_TYPES.get(model_type_of(folder) or "")
    except (OSError, ValueError):
        return None


def checkpoint_problem(folder: str | Path, family: str, key: str = "model.path") -> str | None:
    """One line saying why the local `folder` (the recipe's `key`) is not a `family` checkpoint (no config.json, or
    another family's model_type, with the `model.family` that fits it), or None when it is one."""
    model_type = model_type_of(folder)
    if model_type is None:
        return f"{key}: {folder} has no config.json (expected a {family} checkpoint folder)"
    if model_type in FAMILY_TABLE[family][1]:
        return None
    if key != "model.path":  # the policy's family is settled: this folder must be of it
        kind = f"{model_type!r} checkpoint (config.json model_type), not a {family} one as model.path"
        return f"{key}: {folder} holds a {kind}"
    fits = MODEL_TYPES.get(model_type)
    hint = f"set model.family={fits}" if fits else f"model.family takes {', '.join(FAMILY_TABLE)}"
    hint = CONVERT_HINTS.get(model_type, hint)
    return (
        f"model.family: {folder} holds a {model_type!r} checkpoint (config.json model_type), not a {family} one; {hint}"
    )
