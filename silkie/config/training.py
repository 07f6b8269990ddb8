"""The `training:` keys a recipe may set: Hugging Face `TrainingArguments` fields (transformers 5), their types,
allowed values and ranges.

Kept as a plain table so the launcher can validate recipes without importing torch.
`warmup_ratio` and `gradient_checkpointing`/`group_by_length` are accepted as the names users know
and translated by `silkie.train.arguments`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from silkie.errors import RecipeError

from .checks import choice, coerce, describe, refuse_unknown, suggest, type_ok

TRAINING_KEYS: dict[str, Any] = {
    "learning_rate": float,
    "lr_scheduler_type": str,
    "lr_scheduler_kwargs": dict | None,
    "warmup_steps": float,
    "warmup_ratio": float,
    "weight_decay": float,
    "adam_beta1": float,
    "adam_beta2": float,
    "adam_epsilon": float,
    "optim": str,
    "max_grad_norm": float,
    "num_train_epochs": float,
    "max_steps": int,
    "per_device_train_batch_size": int,
    "per_device_eval_batch_size": int,
    "gradient_accumulation_steps": int,
    "global_batch_size": int | None,
    "bf16": bool,
    "fp16": bool,
    "tf32": bool | None,
    "gradient_checkpointing": bool,
    "activation_checkpointing": bool,
    "gradient_checkpointing_kwargs": dict | None,
    "activation_checkpointing_kwargs": dict | None,
    "group_by_length": bool,
    "train_sampling_strategy": str,
    "logging_steps": float,
    "logging_first_step": bool,
    "eval_strategy": str,
    "eval_steps": float | None,
    "eval_on_start": bool,
    "save_strategy": str,
    "save_steps": float,
    "save_total_limit": int | None,
    "save_only_model": bool,
    "metric_for_best_model": str | None,
    "greater_is_better": bool | None,
    "report_to": str | list[str],
    "run_name": str | None,
    "seed": int,
    "data_seed": int | None,
    "dataloader_num_workers": int,
    "dataloader_pin_memory": bool,
    "dataloader_persistent_workers": bool,
    "dataloader_prefetch_factor": int | None,
    "ddp_timeout": int,
    "ddp_find_unused_parameters": bool | None,
    "torch_compile": bool,
    "disable_tqdm": bool,
    "log_level": str,
    "use_cpu": bool,
    "full_determinism": bool,
}

# Values transformers accepts for these string keys (its enums; tests/test_config.py compares them to the installed
# transformers), so a typo is a recipe error before anything starts.
TRAINING_CHOICES: dict[str, tuple[str, ...]] = {
    "lr_scheduler_type": (
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "reduce_lr_on_plateau",
        "cosine_with_min_lr",
        "cosine_warmup_with_min_lr",
        "warmup_stable_decay",
        "greedy",
    ),
    "eval_strategy": ("no", "steps", "epoch"),
    "save_strategy": ("no", "steps", "epoch", "best"),
    "log_level": ("detail", "debug", "info", "warning", "error", "critical", "passive"),
    "train_sampling_strategy": ("random", "sequential", "group_by_length", "batch_rebalance"),
    "optim": (
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_torch_xla",
        "adamw_torch_npu_fused",
        "adafactor",
        "adamw_anyprecision",
        "adamw_torch_4bit",
        "adamw_torch_8bit",
        "ademamix",
        "sgd",
        "adagrad",
        "adamw_bnb_8bit",
        "adamw_8bit",
        "ademamix_8bit",
        "lion_8bit",
        "lion_32bit",
        "paged_adamw_32bit",
        "paged_adamw_8bit",
        "paged_ademamix_32bit",
        "paged_ademamix_8bit",
        "paged_lion_32bit",
        "paged_lion_8bit",
        "rmsprop",
        "rmsprop_bnb",
        "rmsprop_bnb_8bit",
        "rmsprop_bnb_32bit",
        "galore_adamw",
        "galore_adamw_8bit",
        "galore_adafactor",
        "galore_adamw_layerwise",
        "galore_adamw_8bit_layerwise",
        "galore_adafactor_layerwise",
        "lomo",
        "adalomo",
        "grokadamw",
        "schedule_free_radam",
        "schedule_free_adamw",
        "schedule_free_sgd",
        "apollo_adamw",
        "apollo_adamw_layerwise",
        "stable_adamw",
    ),
}
# Each entry of `report_to` (a name or a list of names): transformers' integrations, "all" or "none".
REPORT_TO_CHOICES = (
    "all",
    "none",
    "azure_ml",
    "comet_ml",
    "mlflow",
    "neptune",
    "tensorboard",
    "trackio",
    "wandb",
    "codecarbon",
    "clearml",
    "dagshub",
    "flyte",
    "dvclive",
    "swanlab",
    "kubeflow",
)

# One line of help per `training:` key (the recipe reference); every key is read by
# `silkie.train.arguments.training_arguments`, which hands it to `TrainingArguments`.
TRAINING_READ_BY = "train.arguments:training_arguments"
TRAINING_HELP: dict[str, str] = {
    "learning_rate": "Peak learning rate.",
    "lr_scheduler_type": "Schedule: `linear`, `cosine`, `constant`, `constant_with_warmup`, ...",
    "lr_scheduler_kwargs": "Extra scheduler arguments.",
    "warmup_steps": "Warmup: a step count, or a fraction of the run when below 1.",
    "warmup_ratio": "Warmup as a fraction of the run (translated to warmup_steps).",
    "weight_decay": "AdamW weight decay.",
    "adam_beta1": "AdamW beta1.",
    "adam_beta2": "AdamW beta2.",
    "adam_epsilon": "AdamW epsilon.",
    "optim": "Optimizer name (`adamw_torch`, `adamw_torch_fused`, `paged_adamw_8bit`, ...).",
    "max_grad_norm": "Gradient clipping norm (0 = off).",
    "num_train_epochs": "Epochs over the training pairs.",
    "max_steps": "Total optimizer steps; overrides num_train_epochs when > 0.",
    "per_device_train_batch_size": "Pairs per process per micro-batch.",
    "per_device_eval_batch_size": "Pairs per process per evaluation batch.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "global_batch_size": (
        "Pairs per optimizer step over all processes; sets gradient_accumulation_steps to global_batch_size / "
        "(per_device_train_batch_size x processes) at launch, so a recipe trains alike on 8 or 16 GPUs "
        "(null: gradient_accumulation_steps instead)."
    ),
    "bf16": "bf16 mixed precision (default: on when model.dtype resolves to bf16).",
    "fp16": "fp16 mixed precision.",
    "tf32": "Allow TF32 matmuls on Ampere+ GPUs.",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory (alias).",
    "activation_checkpointing": "Recompute activations in the backward pass to save memory.",
    "gradient_checkpointing_kwargs": "Checkpointing options (alias): see activation_checkpointing_kwargs.",
    "activation_checkpointing_kwargs": (
        "Checkpointing options: `every_n_layers: N` recomputes only every N-th decoder layer (memory back for "
        "speed), `offload: true` keeps the saved activations in pinned host memory, `use_reentrant` (default "
        "false); ignored without checkpointing."
    ),
    "group_by_length": "Batch pairs of similar length (translated to train_sampling_strategy).",
    "train_sampling_strategy": "Training sampler: `random`, `sequential`, `group_by_length`, ...",
    "logging_steps": "Log (metrics.jsonl, tensorboard) every N steps, or a fraction of the run.",
    "logging_first_step": "Also log the first step.",
    "eval_strategy": (
        "`no`, `steps` or `epoch` (default: `steps` if eval_steps is set, else `epoch`; `no` without held-out data)."
    ),
    "eval_steps": "Evaluate every N steps (eval_strategy `steps`).",
    "eval_on_start": "Evaluate once before training.",
    "save_strategy": "When to write `checkpoint-N`: `steps`, `epoch` or `no`.",
    "save_steps": "Checkpoint every N steps (resumes start from the latest one).",
    "save_total_limit": "Keep at most N checkpoints (never the newest nor the best); null or 0 = all.",
    "save_only_model": "Checkpoints without optimizer state (they cannot be resumed exactly).",
    "metric_for_best_model": (
        "Eval metric that `save_strategy: best` ranks checkpoints by (`loss`, `rewards/accuracies`, "
        "`rewards/margins`, ...); `best` without it ranks by eval loss."
    ),
    "greater_is_better": (
        "Whether a larger `metric_for_best_model` is better (HF: false for names ending in loss, else true)."
    ),
    "report_to": "Loggers: `tensorboard`, `none`, `wandb`, ... (a name or a list).",
    "run_name": "Run name for the loggers.",
    "seed": "Training seed (model init, dropout, data order).",
    "data_seed": "Seed of the data sampler; null = seed.",
    "dataloader_num_workers": "DataLoader worker processes (0 = load in the training process).",
    "dataloader_pin_memory": "Pin host memory for faster GPU copies.",
    "dataloader_persistent_workers": "Keep DataLoader workers alive between epochs.",
    "dataloader_prefetch_factor": "Batches prefetched per DataLoader worker.",
    "ddp_timeout": "Seconds before a stuck collective (process group) times out.",
    "ddp_find_unused_parameters": "DDP's find_unused_parameters.",
    "torch_compile": "Compile the model with torch.compile.",
    "disable_tqdm": "Hide the progress bars.",
    "log_level": "Log level of the main process (`passive`, `info`, `warning`, ...).",
    "use_cpu": "Train on the CPU (set automatically with launch.cpu or when no GPU is available).",
    "full_determinism": "Deterministic algorithms everywhere (slower).",
}


def _steps(value: float) -> bool:
    """A step interval as transformers reads it: a ratio of the run in (0, 1), or a whole number of steps >= 1."""
    return 0 < value < 1 or (value >= 1 and float(value).is_integer())


DEFAULT_PER_DEVICE_TRAIN_BATCH = 2  # silkie.train.arguments.DEFAULTS (transformers' own is 8)
STEPS = "a ratio of the run in (0, 1) or a whole number of steps >= 1"
SEED = (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
Rule = tuple[Callable[[Any], bool], str]
# The range of each numeric key (checked after its type; None passes where the type allows it).
TRAINING_RANGES: dict[str, Rule] = {
    "learning_rate": (lambda v: v >= 0 and math.isfinite(v), "a number >= 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "warmup_steps": (lambda v: v == 0 or _steps(v), f"0, {STEPS}"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_epsilon": (lambda v: 0 < v < math.inf, "a number > 0"),
    "max_grad_norm": (lambda v: 0 <= v < math.inf, "a number >= 0 (0: no clipping)"),
    "num_train_epochs": (lambda v: 0 < v < math.inf, "a number > 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_train_epochs) or an integer >= 1"),
    "per_device_train_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "an integer >= 1"),
    "global_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "logging_steps": (_steps, STEPS),
    "eval_steps": (_steps, f"null or {STEPS}"),
    "save_steps": (_steps, STEPS),
    "save_total_limit": (lambda v: v >= 0, "null or 0 (keep all) or an integer >= 1"),
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "dataloader_prefetch_factor": (lambda v: v >= 1, "null or an integer >= 1"),
    "ddp_timeout": (lambda v: v >= 1, "a number of seconds >= 1"),
}


CHECKPOINTING_OPTIONS: dict[str, Rule] = {  # transformers' own options of activation_checkpointing_kwargs
    "every_n_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "offload": (lambda v: isinstance(v, bool), "true or false"),
    "use_reentrant": (lambda v: isinstance(v, bool), "true or false"),
}


def checkpointing_options_problem(key: str, options: dict[str, Any]) -> str | None:
    """Why `training.<key>` (a checkpointing options dict) is not one transformers takes, or None."""
    for name, value in options.items():
        if name not in CHECKPOINTING_OPTIONS:
            return f"unknown option training.{key}.{name}{suggest(str(name), sorted(CHECKPOINTING_OPTIONS))}"
        ok, allowed = CHECKPOINTING_OPTIONS[name]
        if not ok(value):
            return f"training.{key}.{name} = {value!r} is not allowed; expected {allowed}"
    return None


def training_conflict(training: dict[str, Any]) -> str | None:
    """Why two `training:` keys cannot go together (one phrase naming both), or None."""
    if training.get("global_batch_size") is not None and "gradient_accumulation_steps" in training:
        return (
            "training.global_batch_size and training.gradient_accumulation_steps are both set; set one of them "
            "(global_batch_size sets the accumulation from the number of processes; training.global_batch_size=null "
            "drops it)"
        )
    if training.get("bf16") and training.get("fp16"):
        return "training.bf16 and training.fp16 are both true; set one of them"
    if "warmup_ratio" in training and "warmup_steps" in training:
        return "training.warmup_ratio and training.warmup_steps are both set; set one of them"
    if training.get("gradient_checkpointing") is not None and training.get("activation_checkpointing") is not None:
        return "training.gradient_checkpointing and training.activation_checkpointing are both set; set one of them"
    if (
        training.get("gradient_checkpointing_kwargs") is not None
        and training.get("activation_checkpointing_kwargs") is not None
    ):
        return (
            "training.gradient_checkpointing_kwargs and training.activation_checkpointing_kwargs are both set; "
            "set one of them"
        )
    if not training.get("dataloader_num_workers"):
        for key in ("dataloader_prefetch_factor", "dataloader_persistent_workers"):
            if training.get(key):
                return f"training.{key} needs training.dataloader_num_workers >= 1 (worker processes)"
    return None


def accumulation_steps(training: dict[str, Any], world_size: int) -> int:
    """Micro-batches per optimizer step for `world_size` processes: `gradient_accumulation_steps` (default 1), or
    what `global_batch_size` asks for; RecipeError when the global batch does not divide evenly."""
    per_device = training.get("per_device_train_batch_size", DEFAULT_PER_DEVICE_TRAIN_BATCH)
    if training.get("global_batch_size") is None:
        return training.get("gradient_accumulation_steps", 1)
    total = training["global_batch_size"]
    micro = per_device * world_size
    if total % micro:
        fits = sorted({micro * k for k in (max(1, total // micro), total // micro + 1)})
        raise RecipeError(
            f"recipe: training.global_batch_size = {total} is not a multiple of per_device_train_batch_size "
            f"({per_device}) x {world_size} process(es) = {micro}; set it to e.g. {' or '.join(map(str, fits))}, "
            "or change per_device_train_batch_size"
        )
    return total // micro


def pairs_per_step(training: dict[str, Any], world_size: int) -> str:
    """The global batch a launch trains with, e.g. `256 pairs per optimizer step (16 processes x 2 pairs x 8
    accumulation)`; RecipeError as `accumulation_steps`."""
    per_device = training.get("per_device_train_batch_size", DEFAULT_PER_DEVICE_TRAIN_BATCH)
    accumulation = accumulation_steps(training, world_size)
    return (
        f"{per_device * world_size * accumulation} pairs per optimizer step ({world_size} process(es) x {per_device} "
        f"pairs x {accumulation} accumulation)"
    )


def check_training(training: dict[str, Any]) -> None:
    """Check every `training:` key by name, type, allowed values and range (numeric strings become floats where a
    float is wanted, in place); RecipeError names the first bad key."""
    refuse_unknown("training", training, sorted(TRAINING_KEYS))
    for key, value in list(training.items()):
        value = training[key] = coerce(value, TRAINING_KEYS[key])
        if not type_ok(value, TRAINING_KEYS[key]):
            raise RecipeError(
                f"recipe: training.{key} = {value!r} has the wrong type; expected {describe(TRAINING_KEYS[key])}"
            )
        if key in TRAINING_CHOICES:
            choice(f"training.{key}", value, TRAINING_CHOICES[key])
        if key == "report_to":
            for name in [value] if isinstance(value, str) else value:
                choice("training.report_to", name, REPORT_TO_CHOICES)
        if key in TRAINING_RANGES and value is not None:
            ok, allowed = TRAINING_RANGES[key]
            if not ok(value):
                raise RecipeError(f"recipe: training.{key} = {value!r} is not allowed; expected {allowed}")
        if key.endswith("checkpointing_kwargs") and value:
            problem = checkpointing_options_problem(key, value)
            if problem:
                raise RecipeError(f"recipe: {problem}")
    conflict = training_conflict(training)
    if conflict:
        raise RecipeError(f"recipe: {conflict}")
