"""The one table of tiny-checkpoint builders, by model family (imported only when a family's builder is asked for)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

TINY_BUILDERS = {
    "qwen_vl": "silkie.dev.tiny_qwen_vl:build_tiny_checkpoint",
    "qwen2_vl": "silkie.dev.tiny_hf_vlm:build_tiny_qwen2_vl",
    "qwen2_5_vl": "silkie.dev.tiny_hf_vlm:build_tiny_qwen2_5_vl",
    "qwen3_vl": "silkie.dev.tiny_qwen3_vl:build_tiny_qwen3_vl",
    "qwen3_vl_moe": "silkie.dev.tiny_qwen3_vl:build_tiny_qwen3_vl_moe",
    "llava": "silkie.dev.tiny_hf_vlm:build_tiny_llava",
    "internvl": "silkie.dev.tiny_internvl:build_tiny_internvl",
    "gemma3": "silkie.dev.tiny_gemma3:build_tiny_gemma3",
    "gemma4": "silkie.dev.tiny_gemma4:build_tiny_gemma4",
    "qwen3_5": "silkie.dev.tiny_qwen3_5:build_tiny_qwen3_5",
    "qwen3_5_moe": "silkie.dev.tiny_qwen3_5:build_tiny_qwen3_5_moe",
}
TINY_FOLDERS = {  # the folder names the demo assets use
    "qwen_vl": "tiny-qwen-vl",
    "qwen2_vl": "tiny-qwen2-vl",
    "qwen2_5_vl": "tiny-qwen2.5-vl",
    "qwen3_vl": "tiny-qwen3-vl",
    "qwen3_vl_moe": "tiny-qwen3-vl-moe",
    "llava": "tiny-llava",
    "internvl": "tiny-internvl",
    "gemma3": "tiny-gemma3",
    "gemma4": "tiny-gemma4",
    "qwen3_5": "tiny-qwen3.5",
    "qwen3_5_moe": "tiny-qwen3.5-moe",
}


def tiny_builder(family: str) -> Callable[..., Path]:
    """`build(out_dir, seed=0) -> Path` writing a tiny random checkpoint of `family`."""
    module, name = TINY_BUILDERS[family].split(":")
    return getattr(importlib.import_module(module), name)
