"""Fold a LoRA adapter into its base weights and write a standalone checkpoint folder (any model family)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from silkie.tools.cli import ToolError, require_dir
from silkie.tools.common import load_codec_from, load_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class MergeResult:
    """Where the merged checkpoint went and what it holds."""

    out_dir: Path
    shards: list[Path]
    dtype: torch.dtype
    copied: list[str]


def _is_weight_file(path: Path) -> bool:
    return path.name in WEIGHT_INDEXES or path.name.endswith(WEIGHT_SUFFIXES)


def _copy_extras(base_dir: Path, out_dir: Path) -> list[str]:
    """Copy the base folder's other top-level files (remote code, fonts, README) that the save did not write."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and not _is_weight_file(path) and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def _set_dtype_flags(config, dtype: torch.dtype) -> None:
    """Record the saved dtype; the official `bf16/fp16/fp32` flags follow it when the base set one of them."""
    config.dtype = dtype
    if any(getattr(config, flag, False) for flag in ("bf16", "fp16", "fp32")):
        config.bf16, config.fp16 = dtype == torch.bfloat16, dtype == torch.float16
        config.fp32 = dtype == torch.float32


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ToolError(f"output folder {out_dir} is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out_dir)


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> MergeResult:
    """Load base + adapter in `dtype`, `merge_and_unload()`, save safetensors shards, config, tokenizer.

    The folder loads like the base (`QWenLMHeadModel` + `QWenTokenizer` for Qwen-VL-Chat; the Auto classes
    and `AutoProcessor` for Qwen2-VL / LLaVA).
    Other files of the base folder (e.g. the official remote-code `*.py`) are copied alongside.
    """
    base_dir = require_dir(base_dir, "base model folder", "config.json")
    adapter_dir = require_dir(adapter_dir, "adapter folder", "adapter_config.json")
    out_dir = Path(out_dir)
    if out_dir.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise ToolError(f"--out {out_dir} must differ from the base and adapter folders")
    _check_out_dir(out_dir, overwrite)
    tokenizer = load_codec_from(base_dir, adapter_dir)
    model = load_model(base_dir, adapter_dir, dtype=dtype)
    merged = model.merge_and_unload()
    _set_dtype_flags(merged.config, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    copied = _copy_extras(base_dir, out_dir)
    return MergeResult(out_dir=out_dir, shards=shard_files(out_dir), dtype=dtype, copied=copied)


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (from its index when sharded)."""
    folder = Path(folder)
    index = folder / WEIGHT_INDEXES[0]
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))
