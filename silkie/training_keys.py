"""The `training:` keys a recipe may set: Hugging Face `TrainingArguments` fields (transformers 5) and their types.

Kept as a plain table so the launcher can validate recipes without importing torch.
`warmup_ratio` and `gradient_checkpointing`/`group_by_length` are accepted as the names users know
and translated by `silkie.train_args`.
"""

from __future__ import annotations

from typing import Any

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
    "bf16": bool,
    "fp16": bool,
    "tf32": bool | None,
    "gradient_checkpointing": bool,
    "activation_checkpointing": bool,
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
}
