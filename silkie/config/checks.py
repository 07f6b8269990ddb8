"""Small checks the recipe schema is built from: a value in range or in a set, of a type; errors name the key."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

from silkie.errors import RecipeError


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """RecipeError naming `key`, its value and what is `allowed` unless `ok`."""
    if not ok:
        raise RecipeError(f"recipe: {key} = {value!r} is not allowed; expected {allowed}")


def choice(key: str, value: Any, allowed: tuple) -> None:
    """RecipeError unless `value` is one of `allowed` (naming the closest one first when there is one)."""
    if value in allowed:
        return
    names = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    require(False, key, value, "one of " + ", ".join(repr(a) for a in allowed) + hint)


# the names users bring from peft, TRL and LLaMA-Factory for keys this schema spells otherwise
KNOWN_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target": "target_modules",
    "target": "target_modules",
    "model_name_or_path": "path",
    "pref_beta": "beta",
    "pref_loss": "loss_type",
    "moe_aux_loss_coef": "router_aux_loss_coef",  # LLaMA-Factory's
}


# TRL's, LLaMA-Factory's and ms-swift's names for settings that live in another section here (`section.key`), or
# that Silkie does without (a sentence saying what to do instead); looked up before a close spelling is guessed.
ELSEWHERE = {
    "beta": "dpo.beta",
    "dpo_beta": "dpo.beta",
    "pref_beta": "dpo.beta",
    "loss_type": "dpo.loss_type",
    "pref_loss": "dpo.loss_type",
    "label_smoothing": "dpo.label_smoothing",
    "dpo_label_smoothing": "dpo.label_smoothing",
    "precompute_ref_log_probs": "dpo.precompute_ref_log_probs",
    "router_aux_loss_coef": "dpo.router_aux_loss_coef",
    "moe_aux_loss_coef": "dpo.router_aux_loss_coef",
    "target_parameters": "lora.target_parameters",
    "rpo_alpha": "RPO is dpo.loss_type: [sigmoid, sft] with dpo.loss_weights: [1, ALPHA]",
    "pref_ftx": "an SFT term is dpo.loss_type: [sigmoid, sft] with dpo.loss_weights",
    "max_prompt_length": "there is no separate prompt limit: dpo.max_length bounds prompt + answer (image tokens "
    "included); longer pairs are dropped, or their answers cut with data.truncation: answer",
    "max_completion_length": "dpo.max_length bounds prompt + answer; data.truncation: answer cuts the answers",
    "cutoff_len": "dpo.max_length",
    "truncation_mode": "data.truncation (drop, or answer: cut the answers; a prompt, images included, is never cut)",
    "padding_free": "padding-free rows are model.attn_implementation: varlen with dpo.pairs_per_row",
    "reference_free": "DPO without a reference is dpo.loss_type: cpo (or simpo, orpo: reference-free losses)",
    "simpo_gamma": "dpo.simpo_gamma",
    "cpo_alpha": "CPO's NLL term is dpo.loss_type: [cpo, sft] with dpo.loss_weights: [1, ALPHA]",
    "rlhf_type": "dpo.loss_type (sigmoid for dpo; cpo, simpo and orpo reference-free)",
    "ref_model": "model.ref_model",
    "sync_ref_model": "dpo.sync_ref_model",
    "ref_model_mixup_alpha": "dpo.ref_model_mixup_alpha",
    "ref_model_sync_steps": "dpo.ref_model_sync_steps",
    "generate_during_eval": "dpo.generate_during_eval",
    "use_peft": "lora.enabled",
    "use_lora": "lora.enabled",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_target_modules": "lora.target_modules",
    "freeze_vision_tower": "the vision tower stays frozen unless lora.vision: true",
    "deepspeed": "deepspeed.stage, or deepspeed.config for a JSON file of your own",
    "dataset": "data.path",
    "dataset_name": "data.path",
    "dataset_num_proc": "data.num_proc",
    "eval_dataset": "data.eval_path",
    "test_split": "data.eval_path (a file of held-out pairs) or data.eval_fraction",
    "model_name_or_path": "model.path",
    "torch_dtype": "model.dtype",
    "resume_from_checkpoint": "not needed: the same launch command again resumes from the latest intact checkpoint",
    "activation_offloading": "training.gradient_checkpointing_kwargs: {offload: true}",
    "use_dora": "lora.use_dora",
    "use_rslora": "lora.use_rslora",
    "use_liger_kernel": "model.liger_kernels",
    "modules_to_save": "not supported: LoRA adapts lora.target_modules (with lora.vision the vision tower too); "
    "full fine-tuning is lora.enabled: false",
    "bias": "not supported: LoRA trains no biases (peft's bias: none)",
    "neftune_noise_alpha": "not supported: NEFTune is an SFT method (TRL and transformers apply it to SFT)",
    "load_best_model_at_end": "not needed: the run keeps the last adapter; every checkpoint-N holds its own "
    "(evaluate one with silkie evaluate --adapter)",
    # LLaMA-Factory's and ms-swift's run keys
    "stage": "not needed: Silkie trains preference objectives (dpo.loss_type)",
    "do_train": "not needed: train_dpo.py trains",
    "finetuning_type": "lora.enabled (true: LoRA, false: full fine-tuning)",
    "train_type": "lora.enabled (true: LoRA, false: full fine-tuning)",
    "lora_rank": "lora.r",
    "template": "not needed: the chat template is the checkpoint's own (model.path)",
    "dataset_dir": "data.path (the data file or folder itself)",
    "media_dir": "data.images",
    "image_dir": "data.images",
    "output_dir": "the run folder is --working",
    "overwrite_output_dir": "--force (moves the old outputs aside)",
    "lora_target": "lora.target_modules",
    "val_size": "data.eval_fraction",
    "max_samples": "data.max_prompts",
    "preprocessing_num_workers": "data.num_proc",
    "model": "model.path",
}
# keys only a LLaMA-Factory or ms-swift recipe has: a flat file holding one is said to be such a recipe
OTHER_RECIPE_KEYS = ("stage", "finetuning_type", "template", "dataset_dir", "pref_beta", "pref_loss", "train_type",
                     "rlhf_type", "media_dir")  # fmt: skip
_KEY = re.compile(r"[a-z_]+\.[a-z_]+")


def suggest(name: str, known: list[str]) -> str:
    """` (did you mean 'x'?)` for the closest known name (or the one another library calls `name`, also in another
    section, or what to do instead of a setting Silkie does without), else empty."""
    if KNOWN_ALIASES.get(name) in known:
        return f" (did you mean '{KNOWN_ALIASES[name]}'?)"
    if name in ELSEWHERE:
        where = ELSEWHERE[name]
        return f" (did you mean '{where}'?)" if _KEY.fullmatch(where) else f" ({where})"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def refuse_unknown(prefix: str, names: Any, known: list[str]) -> None:
    """RecipeError listing every one of `names` (keys of section `prefix`) that is not in `known`, each with its
    suggestion: all at once, as a section written for another library has several."""
    unknown = [f"'{prefix}.{name}'{suggest(name, known)}" for name in names if name not in known]
    if unknown:
        raise RecipeError(f"recipe: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")


def type_ok(value: Any, annotation: Any) -> bool:
    """Whether `value` (from YAML) fits the type `annotation` (unions, lists, dicts; ints are not floats' bools)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            type_ok(k, key_type) and type_ok(v, value_type) for k, v in value.items()
        )
    return isinstance(value, annotation)


def coerce(value: Any, annotation: Any) -> Any:
    """A numeric string becomes a float where only a float is allowed; ints stay ints (a float field takes them,
    and config.yaml keeps `logging_steps: 5` as written)."""
    if isinstance(value, str) and not type_ok(value, annotation) and type_ok(1.0, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def describe(annotation: Any) -> str:
    """A type annotation as a user reads it."""
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def changed_from_default(section: Any, names: tuple[str, ...]) -> list[str]:
    """Those of `names` that a recipe section sets away from the schema's default (to say they go unused)."""
    defaults = {field.name: field.default for field in dataclasses.fields(section)}
    return [name for name in names if getattr(section, name) != defaults[name]]


def key(default: Any = None, help: str = "", read_by: str = "", factory: Any = None) -> Any:
    """A recipe key: its default, its one-line help (the recipe reference) and the functions that read it
    (`module:qualname` under `silkie.`, space-separated)."""
    metadata = {"help": help, "read_by": read_by}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
