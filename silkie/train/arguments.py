"""Recipe -> transformers `TrainingArguments` (+ DeepSpeed config dict)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_tf32_available

from silkie.config import DeepSpeedSection, Recipe
from silkie.config.training import DEFAULT_PER_DEVICE_TRAIN_BATCH, accumulation_steps
from silkie.errors import MissingInputError
from silkie.logs import get_logger

from .console import on_terminal

logger = get_logger(__name__)
DEFAULTS: dict[str, Any] = {
    "report_to": ["tensorboard"],
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 100,
    "per_device_train_batch_size": DEFAULT_PER_DEVICE_TRAIN_BATCH,
    "per_device_eval_batch_size": 4,
    "remove_unused_columns": False,
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "ddp_find_unused_parameters": False,
}


def deepspeed_config(section: DeepSpeedSection) -> dict[str, Any] | str | None:
    """ZeRO config for the HF integration ("auto" values are filled from the TrainingArguments)."""
    if section.config:
        path = Path(section.config)
        if not path.is_file():
            raise MissingInputError(f"deepspeed.config: file not found: {path}")
        return json.loads(path.read_text())
    if section.stage == 0:
        return None
    zero: dict[str, Any] = {"stage": section.stage, "overlap_comm": False, "contiguous_gradients": True}
    if section.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if section.stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if section.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }


def unset_learning_rate_note(recipe: Recipe) -> str | None:
    """The warning for a recipe that leaves out `training.learning_rate`, the default that surprises TRL users
    most (None when it is set)."""
    if "learning_rate" in recipe.training:
        return None
    return (
        "training.learning_rate is not set: transformers' default 5e-5 is used (TRL's DPOConfig default is 1e-6, the "
        "Silkie paper's LoRA run 1e-5)"
    )


def training_arguments(recipe: Recipe, output_dir: str | Path, bf16: bool) -> TrainingArguments:
    """Merge defaults, the recipe's `training:` keys and what the run needs into TrainingArguments."""
    values: dict[str, Any] = dict(DEFAULTS)
    values.update(recipe.training)
    if "warmup_ratio" in values:  # the name users know; transformers 5 takes a ratio in warmup_steps
        values["warmup_steps"] = values.pop("warmup_ratio")
    if "gradient_checkpointing" in values:  # the name users know; transformers 5 calls it activation checkpointing
        values["activation_checkpointing"] = values.pop("gradient_checkpointing")
    options = values.pop("gradient_checkpointing_kwargs", None) or values.get("activation_checkpointing_kwargs")
    values["activation_checkpointing_kwargs"] = {**DEFAULTS["activation_checkpointing_kwargs"], **(options or {})}
    if values.get("global_batch_size") is not None:  # the same pairs per step on any number of processes
        values["gradient_accumulation_steps"] = accumulation_steps(values, int(os.environ.get("WORLD_SIZE", "1")))
    values.pop("global_batch_size", None)
    if values.pop("group_by_length", False):
        values["train_sampling_strategy"] = "group_by_length"
    if values.get("save_strategy") == "best":  # as transformers does for reduce_lr_on_plateau
        values.setdefault("metric_for_best_model", "loss")
    if isinstance(values.get("report_to"), str):
        values["report_to"] = [values["report_to"]]
    if not (recipe.data.eval_fraction or recipe.data.eval_size or recipe.data.eval_path):
        values["eval_strategy"] = "no"
    elif "eval_strategy" not in values:
        values["eval_strategy"] = "steps" if "eval_steps" in values else "epoch"
    values.setdefault("bf16", bf16)
    values.setdefault("disable_tqdm", not on_terminal())  # a log file gets plain lines, not \r bars
    if recipe.launch.cpu or not torch.cuda.is_available():  # launch.cpu: even where Slurm hands the step GPUs
        values["use_cpu"] = True
    if values.get("tf32") and (values.get("use_cpu") or not is_torch_tf32_available()):
        # a GPU matmul mode: the paper recipe asks for it, and a CPU smoke test or an older GPU runs without it
        logger.warning("training.tf32 is ignored: TF32 needs an Ampere or newer GPU, which this run does not use")
        del values["tf32"]
    ds = deepspeed_config(recipe.deepspeed)
    return TrainingArguments(
        output_dir=str(output_dir),
        deepspeed=ds,
        seed=values.pop("seed", 42),
        **values,
    )
