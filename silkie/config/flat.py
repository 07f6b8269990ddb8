"""The Silkie repository's recipe format: one flat list of `TrainingArguments`-style keys (its `run_dpo.py`
dataclasses), translated to the sectioned schema. Every key is mapped or refused by name; what the original
launcher and `run_dpo.py` fixed in code (the hub's VLFeedback, ZeRO-2, a 0.5% held-out split) and the defaults of
its dataclasses fill the keys the file leaves out, so the file trains as it did there. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from silkie.errors import RecipeError

from .checks import OTHER_RECIPE_KEYS, suggest
from .training import TRAINING_KEYS

SECTIONS = ("model", "data", "lora", "dpo", "training", "deepspeed", "launch", "slurm")
RENAMED: dict[str, str] = {  # flat key -> sectioned key
    "model_name_or_path": "model.path",
    "use_lora": "lora.enabled",
    "model_max_length": "dpo.max_length",
    "beta": "dpo.beta",
    "q_lora": "lora.load_in_4bit",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "evaluation_strategy": "training.eval_strategy",  # the name before transformers 4.46
    "deepspeed": "deepspeed.config",
    "generate_during_eval": "dpo.generate_during_eval",
}
# Keys accepted at the value the original effectively used (silkie behaves so), refused otherwise.
FIXED: dict[str, tuple[Any, str]] = {
    "output_dir": (None, "the run folder is --working"),
    "remove_unused_columns": (False, "the pair collator needs every column, so it is always false"),
    "lora_bias": ("none", "LoRA adapters are trained without biases"),
    "lora_weight_path": ("", "starting from an earlier adapter is not supported; merge it into the checkpoint"),
    "cache_dir": (None, "set HF_HOME for the hub cache"),
}
# What the original's code fixed, and its dataclasses' defaults where silkie's differ (flat key -> value).
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": "Qwen/Qwen-VL-Chat",
    "use_lora": False,
    "fix_vit": True,
    "model_max_length": 8192,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "logging_steps": 500,
    "save_steps": 500,
    "evaluation_strategy": "no",
}
ORIGINAL_FIXED: dict[str, Any] = {  # sectioned key -> value the original set in code
    "data.source": "hf",
    "data.path": "MMInstruction/VLFeedback",
    "data.split": "train",
    "data.images": ".",  # it read each row's img_path from the current folder (the extracted merged_images/)
    "data.eval_fraction": 0.005,  # train_test_split(test_size=0.005, seed=42)
    "data.seed": 42,
    "data.truncation": "answer",  # over-long pairs were cut (keep_end), not dropped
    "deepspeed.stage": 2,  # its accelerate config: ZeRO-2, bf16
    "slurm.gpus_per_node": 8,
    "slurm.cpus_per_gpu": 4,
    "slurm.mem_per_gpu": "100GB",
}
KNOWN = sorted({*RENAMED, *FIXED, *ORIGINAL_DEFAULTS, *TRAINING_KEYS, "bf16", "fp16", "fix_vit"})


def is_flat(raw: Any) -> bool:
    """True for a mapping with no section name among its keys and at least one flat key (the original format)."""
    if not isinstance(raw, dict) or not raw:
        return False
    if any(key in SECTIONS and isinstance(value, (dict, type(None))) for key, value in raw.items()):
        return False  # a section (`deepspeed: ds.json` or ms-swift's `model: NAME` are flat keys)
    return any(key in KNOWN for key in raw)


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    section, key = dotted.split(".", 1)
    tree.setdefault(section, {})[key] = value


def _precision(tree: dict[str, Any], key: str, value: Any) -> str:
    """bf16/fp16 as the original ran them: DeepSpeed casts the weights, so they set the model's dtype too."""
    _put(tree, f"training.{key}", value)
    if value is True:
        _put(tree, "model.dtype", key)
        return f"training.{key}, model.dtype: {key}"
    return f"training.{key}"


def _fix_vit(tree: dict[str, Any], value: Any, use_lora: bool) -> str:
    if value is True:
        return "(nothing: the vision tower is frozen by default, its resampler trained in full fine-tuning)"
    if value is False and not use_lora:
        _put(tree, "lora.vision", True)
        return "lora.vision: true (the vision tower is trained too)"
    if value is False:
        return "(nothing: as in the original, it has no effect with use_lora)"
    raise RecipeError(f"flat recipe: fix_vit = {value!r} is not allowed; expected true or false")


def translate_flat(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A flat recipe -> (a sectioned recipe dict, one line per key saying where it went). RecipeError names a key
    that has no place in the schema."""
    values = {**raw, **{key: value for key, value in ORIGINAL_DEFAULTS.items() if key not in raw}}
    if "evaluation_strategy" in raw and "eval_strategy" in raw:
        raise RecipeError("flat recipe: evaluation_strategy and eval_strategy are both set (one name each); keep one")
    tree: dict[str, Any] = {}
    lines = []
    lora_keys = [key for key in raw if key.startswith("lora_")]
    if lora_keys and "use_lora" not in raw:  # the original ignored them then: a full fine-tuning run
        lines.append(f"NOTE: {', '.join(lora_keys)} set without use_lora: full fine-tuning, as the original; "
                     "add use_lora: true for LoRA")  # fmt: skip
    handlers: dict[str, Callable[[Any], str]] = {
        "bf16": lambda value: _precision(tree, "bf16", value),
        "fp16": lambda value: _precision(tree, "fp16", value),
        "fix_vit": lambda value: _fix_vit(tree, value, bool(values.get("use_lora"))),
    }
    unknown = [key for key in values if key not in (*handlers, *FIXED, *RENAMED, *TRAINING_KEYS)]
    if unknown:  # all of them at once: a file from another library has several
        keys = ", ".join(repr(k) + suggest(k, KNOWN) for k in unknown)
        if set(unknown) & set(OTHER_RECIPE_KEYS):  # where each key lives in the sectioned schema
            sectioned = ", ".join(repr(k) + suggest(k, []) for k in unknown)
            raise RecipeError(
                f"recipe: this looks like a LLaMA-Factory or ms-swift recipe; Silkie's recipes have sections (model:, "
                f"data:, lora:, dpo:, training:): start from dpo_config/demo.yaml, keys in dpo_config/README.md. "
                f"Its keys: {sectioned}"
            )
        raise RecipeError(
            f"flat recipe: unknown keys {keys} (a flat recipe takes the Silkie repository's keys: TrainingArguments "
            "fields, model_name_or_path, use_lora, lora_*, beta, ...)"
        )
    for key, value in values.items():
        origin = "" if key in raw else " (the original's default)"
        if key in handlers:
            target = handlers[key](value)
        elif key in FIXED:
            expected, why = FIXED[key]
            if value != expected:
                raise RecipeError(f"flat recipe: {key} = {value!r} is not allowed; expected {expected!r} ({why})")
            target = f"(nothing: {why})"
        elif key in RENAMED:
            target = RENAMED[key]
            _put(tree, target, value)
        elif key in TRAINING_KEYS:
            target = f"training.{key}"
            _put(tree, target, value)
        lines.append(f"{key}: {json.dumps(value)}{origin} -> {target}")
    for dotted, value in ORIGINAL_FIXED.items():
        _put(tree, dotted, value)
        lines.append(f"(set in the original's code) -> {dotted}: {json.dumps(value)}")
    return tree, lines
