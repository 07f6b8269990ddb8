"""Checkpoint-folder checks around `from_pretrained`: clear errors naming the bad file or key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from silkie.errors import InputError

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class CheckpointError(InputError):
    """A checkpoint folder or file that cannot be loaded; the message names it."""


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (safetensors first; from its index when sharded); CheckpointError
    naming the folder or index when there are none or the index lists missing shards."""
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{folder / index}: not a valid shard index ({err})") from err
            shards = sorted({folder / name for name in weight_map.values()})
            missing = [str(shard) for shard in shards if not shard.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shard files that are missing: {', '.join(missing)}")
            return shards
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def check_weight_file(path: Path) -> None:
    """Open a weight file far enough to detect corruption or truncation."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:  # reading the last tensor catches truncated data sections
                    handle.get_slice(keys[-1])
            _check_safetensors_length(path)
        else:
            torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure means a broken file
        raise CheckpointError(f"{path}: corrupt or truncated weight file ({type(err).__name__}: {err})") from err


def _check_safetensors_length(path: Path) -> None:
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    end = max((meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"), default=0)
    expected = 8 + header_len + end
    actual = path.stat().st_size
    if actual < expected:
        raise CheckpointError(f"{path}: truncated weight file ({actual} bytes, header promises {expected})")


def check_checkpoint_dir(folder: str | Path) -> None:
    """Validate config.json and every weight file of a local checkpoint folder."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder}: missing config.json")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config}: not valid JSON ({err})") from err
    for path in weight_files(folder):
        check_weight_file(path)


class CheckpointLoadingMixin:
    """`from_pretrained` that checks local folders first, refuses missing weights, and explains offline hub ids."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load a local checkpoint folder (safetensors shards or .bin) or, online, a hub id."""
        path = Path(str(pretrained_model_name_or_path))
        is_local = path.is_dir()
        if is_local:
            check_checkpoint_dir(path)
        elif path.exists():
            raise CheckpointError(f"{path} is a file; expected a checkpoint folder with config.json and weights")
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except OSError as err:
            if is_local:
                raise
            raise OSError(
                f"model '{pretrained_model_name_or_path}' is not a local folder and could not be fetched from the "
                f"model hub (offline? set HF_HUB_OFFLINE=0 and check the id): {err}"
            ) from err
        if not wants_info:
            refuse_incomplete_load(pretrained_model_name_or_path, info)
        return (model, info) if wants_info else model


LOAD_PROBLEMS = (
    ("missing_keys", "weights missing from the checkpoint"),
    ("unexpected_keys", "checkpoint weights the model has no place for (does config.json match the weights?)"),
    ("mismatched_keys", "weights of another shape than config.json gives"),
)


def refuse_incomplete_load(name: Any, info: dict, kinds: tuple[str, ...] = tuple(k for k, _ in LOAD_PROBLEMS)) -> None:
    """`CheckpointError` naming the first few weights of each loading problem in `kinds` (from `loading_info`)."""
    for kind, what in LOAD_PROBLEMS:
        keys = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get(kind, []))
        if kind in kinds and keys:
            shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
            raise CheckpointError(f"{name}: {len(keys)} {what}: {shown}")
