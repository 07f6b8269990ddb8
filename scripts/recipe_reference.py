#!/usr/bin/env python
"""Print the recipe reference (dpo_config/README.md) as markdown, generated from the schema dataclasses.

Keys, types and defaults come from `silkie.config` (and `silkie.training_keys` / `silkie.train.arguments` for
`training:`); the one-line meanings live in MEANINGS below. Regenerate after a schema change:

    python scripts/recipe_reference.py > dpo_config/README.md
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from silkie.config import TRAINING_KEYS, Recipe  # noqa: E402

MEANINGS: dict[str, str] = {
    "model.path": "Checkpoint folder: `config.json`, weights and tokenizer files (`qwen.tiktoken` or the processor's).",
    "model.family": "Model family: `qwen_vl` (Qwen-VL-Chat, native), `qwen2_vl`, `qwen2_5_vl`, `llava` (transformers).",
    "model.dtype": "Weights/compute dtype: `auto` (bf16 on GPUs that support it, else fp32), `bf16`, `fp16`, `fp32`.",
    "model.attn_implementation": "Attention kernel: `sdpa` (default), `eager` (reference), `flex_attention` (qwen_vl).",
    "model.min_pixels": "Qwen2-VL families: fewest pixels per image after resizing (null: the processor's setting).",
    "model.max_pixels": "Qwen2-VL families: most pixels per image after resizing; bounds image tokens.",
    "data.source": "`vlfeedback` (release jsonl), `hf` (a Hub dataset id or saved dataset) or `preference` "
    "(prompt/chosen/rejected rows).",
    "data.path": "The jsonl file, dataset id or preference file to read.",
    "data.images": "Images: the release's `merged_images.zip` or a folder; null when the rows carry no images.",
    "data.split": "Dataset split for `source: hf`.",
    "data.aspect_weights": "Weights of the annotation aspects in a completion's score; null = all aspects equally.",
    "data.min_margin": "Smallest score difference for a (chosen, rejected) pair; ties and closer pairs are dropped.",
    "data.max_pairs_per_prompt": "At most this many pairs per prompt; null = all pairs.",
    "data.cap_strategy": "Which pairs the cap keeps: `margin` (largest margins first) or `random`.",
    "data.max_prompts": "Use only the first N prompts (quick runs); null = all.",
    "data.eval_fraction": "Fraction of prompts held out for evaluation (split by prompt, so no prompt is in both).",
    "data.eval_size": "Held-out prompts as a count (instead of a fraction); null = use eval_fraction.",
    "data.truncation": "Pairs longer than dpo.max_length: `drop` them, or cut the `answer`s to fit.",
    "data.num_proc": "Processes for tokenizing the pairs.",
    "data.cache_dir": "Where tokenized pairs are cached; null = `<working>/cache`.",
    "data.seed": "Seed for pair capping and the held-out split.",
    "lora.enabled": "Train LoRA adapters (peft); false = full fine-tuning with a frozen reference copy.",
    "lora.r": "LoRA rank.",
    "lora.alpha": "LoRA scaling numerator (scale = alpha / r).",
    "lora.dropout": "Dropout on the LoRA branch.",
    "lora.target_modules": "LLM module names that get adapters (null: the family's default).",
    "lora.vision": "Also adapt the vision tower (it stays frozen otherwise).",
    "lora.load_in_4bit": "QLoRA: language-model linears in NF4 4 bit (needs bitsandbytes and a CUDA GPU).",
    "dpo.beta": "DPO temperature: how far the policy may move from the reference.",
    "dpo.loss_type": "Preference loss, TRL 1.16's names (`sigmoid`, `hinge`, `ipo`, `exo_pair`, `nca_pair`, `robust`, "
    "`bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`, `discopop`, `sft`, `sigmoid_norm`), "
    "or a list of them to combine (e.g. `[sigmoid, sft]`: RPO).",
    "dpo.loss_weights": "One weight per entry of a loss_type list; null = equal weights.",
    "dpo.label_smoothing": "Assumed label noise: cDPO for `sigmoid`, and the `robust`, `exo_pair` (needs > 0) and "
    "`aot` losses.",
    "dpo.f_divergence_type": "f-DPO regulariser: `reverse_kl` (DPO), `forward_kl`, `js_divergence`, "
    "`alpha_divergence` (for `sigmoid`, `sigmoid_norm`, `hinge`, `ipo`, `exo_pair`, `robust`, `discopop`, `sft`).",
    "dpo.f_alpha_divergence_coef": "Alpha of `alpha_divergence` (1.0 = reverse KL).",
    "dpo.discopop_tau": "Temperature of the `discopop` loss's mixing of logistic and exponential terms.",
    "dpo.ld_alpha": "LD-DPO (length desensitization): in each pair, the tokens past the shorter answer's length "
    "count `ld_alpha` times in the policy's and the reference's log-probs (0-1; null = plain sums).",
    "dpo.use_weighting": "WPO: each pair's loss is weighted by exp(mean over tokens of log p - log sum p^2) of chosen "
    "times rejected under the current policy (no gradient through the weight); not with `aot`/`aot_unpaired`. "
    "TRL 1.16 fails on `sft` with it; Silkie weights the `sft` term too.",
    "dpo.disable_dropout": "No dropout in the policy, LoRA's included (TRL's default since 0.7; the Silkie paper's "
    "code ran that DPOTrainer, so its `lora_dropout` 0.05 was not applied). `false` applies `lora.dropout`.",
    "dpo.max_length": "Longest prompt + answer in tokens (image tokens included).",
    "dpo.precompute_ref_log_probs": "Compute the reference log-probs once; cached in `<working>/reference_logps`.",
    "dpo.precompute_ref_batch_size": "Pairs per batch in that pass, which needs no gradients (null: "
    "`training.per_device_eval_batch_size`).",
    "dpo.image_once": "Encode each image once per pair (chosen and rejected share it) while vision is frozen.",
    "dpo.share_prompt": "Pack chosen and rejected answers after one copy of the prompt.",
    "dpo.chunked_logps": "Answer log-probs from hidden states in chunks, never the full-vocabulary logits; false: the "
    "model's own logits (the plain, TRL-equivalent path, for checks and benchmarks).",
    "dpo.logps_chunk_size": "Tokens per chunk when computing log-probs (bounds the logits memory).",
    "deepspeed.stage": "ZeRO stage: 0 (DeepSpeed off), 1, 2 or 3.",
    "deepspeed.offload": "Offload optimizer state (and parameters with stage 3) to CPU memory.",
    "deepspeed.config": "A DeepSpeed JSON config to use instead of the generated one.",
    "launch.nproc_per_node": "Local processes; null = one per visible GPU (1 in CPU mode).",
    "launch.cpu": "CPU mode: gloo processes with the GPUs hidden (locally and in Slurm jobs).",
    "launch.master_port": "Kept for recipes that set it; local runs use `torchrun --standalone` (a free port).",
    "slurm.gpus_per_node": "GPUs per node; `--gpus N` asks for N / gpus_per_node nodes (or one node if N is smaller).",
    "slurm.job_name": "`#SBATCH --job-name`.",
    "slurm.partition": "`#SBATCH --partition`; null = the cluster default.",
    "slurm.account": "`#SBATCH --account`; null = the user's default.",
    "slurm.qos": "`#SBATCH --qos`; null = the default.",
    "slurm.time": "`#SBATCH --time` (wall-clock limit per job run; requeues get a fresh limit).",
    "slurm.cpus_per_gpu": "`#SBATCH --cpus-per-gpu`; null = the cluster default.",
    "slurm.mem_per_gpu": "`#SBATCH --mem-per-gpu` (e.g. `64G`); null = the cluster default.",
    "slurm.constraint": "`#SBATCH --constraint` (node features, e.g. `a100`).",
    "slurm.extra_sbatch": "More sbatch options, one per item (`--exclusive` or `#SBATCH --exclusive`).",
    "slurm.setup": "Shell lines run before training (e.g. `module load cuda`, `source env/bin/activate`).",
    "slurm.requeue": "After the warning signal: checkpoint and requeue the job (true), or checkpoint and stop.",
    "slurm.signal": "Warning signal to the batch shell before the time limit: `USR1` or `USR2`.",
    "slurm.signal_seconds": "How long before the time limit the signal comes (torchrun's shutdown grace is this "
    "less up to 60 s, kept for the requeue).",
    "slurm.rdzv_port": "Port of the c10d rendezvous on the job's first node; null = 20000 + job id % 20000 (jobs "
    "sharing a node never meet).",
    "training.learning_rate": "Peak learning rate.",
    "training.lr_scheduler_type": "Schedule: `linear`, `cosine`, `constant`, `constant_with_warmup`, ...",
    "training.lr_scheduler_kwargs": "Extra scheduler arguments.",
    "training.warmup_steps": "Warmup: a step count, or a fraction of the run when below 1.",
    "training.warmup_ratio": "Warmup as a fraction of the run (translated to warmup_steps).",
    "training.weight_decay": "AdamW weight decay.",
    "training.adam_beta1": "AdamW beta1.",
    "training.adam_beta2": "AdamW beta2.",
    "training.adam_epsilon": "AdamW epsilon.",
    "training.optim": "Optimizer name (`adamw_torch`, `adamw_torch_fused`, `paged_adamw_8bit`, ...).",
    "training.max_grad_norm": "Gradient clipping norm (0 = off).",
    "training.num_train_epochs": "Epochs over the training pairs.",
    "training.max_steps": "Total optimizer steps; overrides num_train_epochs when > 0.",
    "training.per_device_train_batch_size": "Pairs per process per micro-batch.",
    "training.per_device_eval_batch_size": "Pairs per process per evaluation batch.",
    "training.gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "training.bf16": "bf16 mixed precision (default: on when model.dtype resolves to bf16).",
    "training.fp16": "fp16 mixed precision.",
    "training.tf32": "Allow TF32 matmuls on Ampere+ GPUs.",
    "training.gradient_checkpointing": "Recompute activations in the backward pass to save memory (alias).",
    "training.activation_checkpointing": "Recompute activations in the backward pass to save memory.",
    "training.group_by_length": "Batch pairs of similar length (translated to train_sampling_strategy).",
    "training.train_sampling_strategy": "Training sampler: `random`, `sequential`, `group_by_length`, ...",
    "training.logging_steps": "Log (metrics.jsonl, tensorboard) every N steps, or a fraction of the run.",
    "training.logging_first_step": "Also log the first step.",
    "training.eval_strategy": "`no`, `steps` or `epoch` (default: `steps` if eval_steps is set, else `epoch`; "
    "`no` without held-out data).",
    "training.eval_steps": "Evaluate every N steps (eval_strategy `steps`).",
    "training.eval_on_start": "Evaluate once before training.",
    "training.save_strategy": "When to write `checkpoint-N`: `steps`, `epoch` or `no`.",
    "training.save_steps": "Checkpoint every N steps (resumes start from the latest one).",
    "training.save_total_limit": "Keep at most N checkpoints; null = all.",
    "training.save_only_model": "Checkpoints without optimizer state (they cannot be resumed exactly).",
    "training.metric_for_best_model": "Eval metric that `save_strategy: best` ranks checkpoints by (`loss`, "
    "`rewards/accuracies`, `rewards/margins`, ...); `best` without it ranks by eval loss.",
    "training.greater_is_better": "Whether a larger `metric_for_best_model` is better (HF: false for names ending "
    "in loss, else true).",
    "training.report_to": "Loggers: `tensorboard`, `none`, `wandb`, ... (a name or a list).",
    "training.run_name": "Run name for the loggers.",
    "training.seed": "Training seed (model init, dropout, data order).",
    "training.data_seed": "Seed of the data sampler; null = seed.",
    "training.dataloader_num_workers": "DataLoader worker processes (0 = load in the training process).",
    "training.dataloader_pin_memory": "Pin host memory for faster GPU copies.",
    "training.dataloader_persistent_workers": "Keep DataLoader workers alive between epochs.",
    "training.dataloader_prefetch_factor": "Batches prefetched per DataLoader worker.",
    "training.ddp_timeout": "Seconds before a stuck collective (process group) times out.",
    "training.ddp_find_unused_parameters": "DDP's find_unused_parameters.",
    "training.torch_compile": "Compile the model with torch.compile.",
    "training.disable_tqdm": "Hide the progress bars.",
    "training.log_level": "Log level of the main process (`passive`, `info`, `warning`, ...).",
    "training.use_cpu": "Train on the CPU (set automatically with launch.cpu or when no GPU is available).",
    "training.full_determinism": "Deterministic algorithms everywhere (slower).",
}

HEADER = """# Recipe reference

A recipe is one YAML file with the sections below; every key is optional except `model.path` and
`data.path`. Any key can be overridden on the command line as `section.key=value` (the value is read as
YAML), e.g. `python launch_dpo.py --config dpo_config/demo.yaml --working runs/demo training.max_steps=50`.
The launcher writes the resolved recipe (file + overrides + defaults) to `<working>/config.yaml`, and a run
in that folder resumes only with the same recipe (`launch:` and `slurm:` may change between launches, the
number of processes may not).
Unknown keys and wrong types are refused with the closest key name.

Generated by `python scripts/recipe_reference.py > dpo_config/README.md` (a test checks it is current).
"""

TRAINING_NOTE = """Hugging Face `TrainingArguments` fields (transformers 5) that a recipe may set; other keys are
refused. "silkie default" is what `silkie.train.arguments` uses when the recipe leaves the key out; "HF" means
the `TrainingArguments` default.
"""


def type_name(annotation: Any) -> str:
    """`int | None` style names for annotations."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


def show(value: Any) -> str:
    """A default as YAML-ish text in backticks."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    return f"`{value}`"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _meaning(key: str) -> str:
    return MEANINGS.get(key, "(undocumented)")


def section_table(name: str, cls: type) -> list[str]:
    """Markdown table of one dataclass section."""
    hints = typing.get_type_hints(cls)
    doc = " ".join((cls.__doc__ or "").split())
    lines = [f"## `{name}:`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        lines.append(f"| `{f.name}` | {type_name(hints[f.name])} | {show(_default(f))} | {_meaning(key)} |")
    return lines + [""]


def training_table() -> list[str]:
    """Markdown table of the accepted `training:` keys."""
    from silkie.train.arguments import DEFAULTS

    lines = ["## `training:`", "", *TRAINING_NOTE.strip().splitlines(), ""]
    lines += ["| key | type | silkie default | meaning |", "|---|---|---|---|"]
    for key, annotation in TRAINING_KEYS.items():
        default = show(DEFAULTS[key]) if key in DEFAULTS else "HF"
        lines.append(f"| `{key}` | {type_name(annotation)} | {default} | {_meaning(f'training.{key}')} |")
    return lines + [""]


def undocumented() -> list[str]:
    """Schema keys without a meaning in MEANINGS, and MEANINGS entries for keys that no longer exist."""
    keys = [f"training.{k}" for k in TRAINING_KEYS]
    for section in dataclasses.fields(Recipe):
        if section.name != "training":
            cls = typing.get_type_hints(Recipe)[section.name]
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)]
    return sorted(set(keys) ^ set(MEANINGS))


def render() -> str:
    """The whole reference as markdown."""
    lines = [HEADER]
    hints = typing.get_type_hints(Recipe)
    for section in dataclasses.fields(Recipe):
        if section.name == "training":
            lines += training_table()
        else:
            lines += section_table(section.name, hints[section.name])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the reference (argparse gives --help)."""
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    sys.stdout.write(render())
    missing = undocumented()
    if missing:
        print(f"recipe_reference: no meaning written for / stale: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
