"""Model-side helpers of the tools: dtype/device names and base checkpoint + LoRA adapter loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from silkie.tools.cli import ToolError, require_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_tool_dtype(name: str) -> torch.dtype:
    """`auto` -> bf16 on a GPU that supports it, else fp32; otherwise one of `DTYPES`."""
    from silkie.models.loading import resolve_dtype

    return resolve_dtype(name)


def load_tokenizer_from(*folders: str | Path | None) -> Any:
    """The `QWenTokenizer` of the first folder holding `qwen.tiktoken` (e.g. the adapter, then the base)."""
    from silkie.models.qwen_vl import QWenTokenizer
    from silkie.models.qwen_vl.tokenization import VOCAB_FILE

    for folder in folders:
        if folder is not None and (Path(folder) / VOCAB_FILE).is_file():
            return QWenTokenizer.from_pretrained(folder)
    named = ", ".join(str(f) for f in folders if f is not None)
    raise ToolError(f"no {VOCAB_FILE} tokenizer file in {named}")


def load_model(
    model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The base checkpoint in `dtype` (eval mode), wrapped with the LoRA adapter from `adapter_dir` when given."""
    from silkie.models.qwen_vl import QWenLMHeadModel

    model_dir = require_dir(model_dir, "model folder", "config.json")
    # .to(dtype): from_pretrained(dtype=bf16) leaves the resampler's fp32 `pos_embed` in fp32 (mixed-dtype error)
    model = QWenLMHeadModel.from_pretrained(model_dir, dtype=dtype).to(dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = require_dir(adapter_dir, "adapter folder", "adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return model.eval()
