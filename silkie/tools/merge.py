"""Fold a LoRA adapter into its base weights and write a standalone checkpoint folder (any model family)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from silkie.models.family import get_family
from silkie.models.qwen_vl.checkpoint_io import weight_files
from silkie.run_dir import CONFIG_NAME, holds_run
from silkie.tools.cli import ToolError, require_dir, require_model_dir
from silkie.tools.common import family_of, load_codec_from, load_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class MergeResult:
    """Where the merged checkpoint went and what it holds."""

    out_dir: Path
    shards: list[Path]
    dtype: torch.dtype
    copied: list[str]
    update_kept: float | None = None  # share of the adapter's update the saved dtype kept (None: fp32 keeps it)


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
    """Record the saved dtype, in the text and vision sub-configs too (else config.json says bf16 at the top and
    fp32 inside); the official `bf16/fp16/fp32` flags follow it when the base set one of them."""
    config.dtype = dtype
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "dtype"):
            sub.dtype = dtype
    if any(getattr(config, flag, False) for flag in ("bf16", "fp16", "fp32")):
        config.bf16, config.fp16 = dtype == torch.bfloat16, dtype == torch.float16
        config.fp32 = dtype == torch.float32


def _keep_base_metadata(base_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Keep what the base's loaders read that a save rewrites: the tokenizer_config.json keys it had (`auto_map`,
    so the official remote code still loads the tokenizer) and config.json's `torch_dtype` (transformers 5 writes
    `dtype`; transformers 4 reads `torch_dtype`)."""
    base_tokenizer, out_tokenizer = base_dir / "tokenizer_config.json", out_dir / "tokenizer_config.json"
    if base_tokenizer.is_file() and out_tokenizer.is_file():
        saved = json.loads(out_tokenizer.read_text())
        kept = {key: value for key, value in json.loads(base_tokenizer.read_text()).items() if key not in saved}
        if kept:
            out_tokenizer.write_text(json.dumps({**saved, **kept}, indent=2, ensure_ascii=False) + "\n")
    base_config = json.loads((base_dir / "config.json").read_text())
    out_config_path = out_dir / "config.json"
    out_config = json.loads(out_config_path.read_text())
    if "torch_dtype" in base_config and "torch_dtype" not in out_config:
        out_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        out_config_path.write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")


def update_kept(model: torch.nn.Module, dtype: torch.dtype) -> float | None:
    """How much of the adapter's update ΔW survives saving W + ΔW in `dtype` (1.0 = all; None for fp32): the
    projection of round(W + ΔW) - W on ΔW, over every LoRA layer. A small update on large weights rounds away. None
    for DoRA adapters (not measured)."""
    if dtype == torch.float32:
        return None
    from peft.tuners.lora import LoraLayer

    if any(any(getattr(m, "use_dora", {}).values()) for m in model.modules() if isinstance(m, LoraLayer)):
        return None  # DoRA's update also rescales each row by its magnitude: ΔW alone is not what is saved

    kept = total = 0.0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or not hasattr(module, "get_delta_weight"):
                continue
            base = module.get_base_layer().weight.float()
            for name in module.active_adapters:
                if name in module.lora_A:
                    delta = module.get_delta_weight(name).float()
                    survived = (base + delta).to(dtype).float() - base
                    kept += (survived * delta).sum().item()
                    total += (delta * delta).sum().item()
    return kept / total if total > 0 else None


def _check_out_dir(out_dir: Path, overwrite: bool, keep: dict[str, Path]) -> None:
    """Refuse an --out that would overwrite or delete the inputs or a training run, a non-empty one without
    --overwrite, and with it one that holds no checkpoint (only an earlier merge is replaced)."""
    out = out_dir.resolve()
    for what, folder in keep.items():
        folder = folder.resolve()
        if out == folder or folder.is_relative_to(out) or out.is_relative_to(folder):
            raise ToolError(f"--out {out_dir} would hold or sit inside the {what} folder {folder}; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise ToolError(f"--out {out_dir} is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if holds_run(out_dir):
        raise ToolError(f"--out {out_dir} holds a training run (its {CONFIG_NAME} and outputs); choose another --out")
    if not overwrite:
        raise ToolError(f"output folder {out_dir} is not empty (pass --overwrite to replace it)")
    if not (out_dir / "config.json").is_file():
        raise ToolError(
            f"--out {out_dir} holds no model checkpoint (no config.json): --overwrite replaces only an earlier merged "
            "folder; choose another --out"
        )


def _replace_folder(staged: Path, out_dir: Path) -> None:
    """Move the finished `staged` folder to `out_dir`; an old `out_dir` is deleted only after that."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    staged.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> MergeResult:
    """Load base + adapter in fp32, `merge_and_unload()`, cast to `dtype`, save safetensors shards, config,
    tokenizer (fp32 merging rounds once: merging in bf16 rounded the LoRA update and then the sum).

    The folder loads like the base (`QWenLMHeadModel` + `QWenTokenizer` for Qwen-VL-Chat; the Auto classes
    and `AutoProcessor` for Qwen2-VL / LLaVA). Other files of the base folder (e.g. the official remote-code
    `*.py`) are copied alongside. The output is written to a staging folder next to `out_dir` and moved in
    when complete, so a failed merge leaves an existing `out_dir` as it was.
    """
    base_dir = require_model_dir(base_dir, "base model folder")
    adapter_dir = require_dir(adapter_dir, "adapter folder", "adapter_config.json")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite, {"base model": base_dir, "adapter": adapter_dir})
    tokenizer = load_codec_from(base_dir, adapter_dir)
    model = load_model(base_dir, adapter_dir, dtype=torch.float32)
    kept = update_kept(model, dtype)
    merged = model.merge_and_unload().to(dtype)
    _set_dtype_flags(merged.config, dtype)
    staged = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        merged.save_pretrained(staged, max_shard_size=max_shard_size, safe_serialization=True)
        get_family(family_of(base_dir)).finish_saved_folder(str(staged))  # the release's weight layout
        tokenizer.save_pretrained(staged)
        _keep_base_metadata(base_dir, staged, dtype)
        copied = _copy_extras(base_dir, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _replace_folder(staged, out_dir)
    return MergeResult(out_dir=out_dir, shards=weight_files(out_dir), dtype=dtype, copied=copied, update_kept=kept)

