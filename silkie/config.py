"""Typed recipe schema: YAML -> dataclasses, validated at load time. Imports no torch.

Every section is a dataclass; `training` holds Hugging Face `TrainingArguments` fields
(a documented subset, checked by name and type here). Errors name the key, the value and
what is allowed; unknown keys suggest the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .dpo.loss_names import F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, LOSS_TYPES
from .errors import RecipeError
from .recipe_yaml import apply_overrides, dump_yaml, override_named_in, parse_yaml
from .training_keys import TRAINING_CHOICES, TRAINING_KEYS

FAMILIES = ("qwen_vl", "qwen2_vl", "qwen2_5_vl", "llava")  # keys of silkie.models.family.FAMILY_CLASSES


@dataclass
class ModelSection:
    """Which checkpoint to train and how to load it."""

    path: str = ""
    family: str = "qwen_vl"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None
    max_pixels: int | None = None

    def check(self) -> None:
        _require(bool(self.path), "model.path", self.path, "a checkpoint folder (config.json, weights, tokenizer)")
        _choice("model.family", self.family, FAMILIES)
        _choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        _choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flex_attention"))
        _require(
            self.family == "qwen_vl" or self.attn_implementation != "flex_attention",
            "model.attn_implementation",
            self.attn_implementation,
            f"sdpa or eager for family {self.family} (flex_attention is implemented for qwen_vl)",
        )
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"model.{name}", value, "null or an integer >= 1")
            _require(
                value is None or self.family in ("qwen2_vl", "qwen2_5_vl"),
                f"model.{name}",
                value,
                "null: only qwen2_vl/qwen2_5_vl take per-image pixel bounds",
            )
        if self.min_pixels is not None and self.max_pixels is not None:
            _require(self.min_pixels <= self.max_pixels, "model.min_pixels", self.min_pixels, "<= model.max_pixels")


@dataclass
class DataSection:
    """Where the preference data comes from and how pairs are built."""

    source: str = "vlfeedback"
    path: str = ""
    images: str | None = None
    split: str = "train"
    aspect_weights: dict[str, float] | None = None
    min_margin: float = 0.0
    max_pairs_per_prompt: int | None = None
    cap_strategy: str = "margin"
    max_prompts: int | None = None
    eval_fraction: float = 0.0
    eval_size: int | None = None
    truncation: str = "drop"
    num_proc: int = 1
    cache_dir: str | None = None
    seed: int = 0

    def check(self) -> None:
        _choice("data.source", self.source, ("vlfeedback", "hf", "preference"))
        _require(bool(self.path), "data.path", self.path, "the data file, folder or dataset id")
        _choice("data.cap_strategy", self.cap_strategy, ("margin", "random"))
        _choice("data.truncation", self.truncation, ("drop", "answer"))
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "a number in [0, 1)")
        _require(self.min_margin >= 0, "data.min_margin", self.min_margin, "a number >= 0")
        _require(self.num_proc >= 1, "data.num_proc", self.num_proc, "an integer >= 1")
        for name, value in (
            ("max_pairs_per_prompt", self.max_pairs_per_prompt),
            ("max_prompts", self.max_prompts),
            ("eval_size", self.eval_size),
        ):
            _require(value is None or value >= 1, f"data.{name}", value, "null or an integer >= 1")


@dataclass
class LoraSection:
    """LoRA adapters through peft (Silkie defaults); `enabled: false` means full fine-tuning."""

    enabled: bool = True
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # null: the family's default (all LLM linears / Qwen-VL's four)
    vision: bool = False
    load_in_4bit: bool = False

    def check(self) -> None:
        _require(self.r >= 1, "lora.r", self.r, "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a number in [0, 1)")
        _require(
            self.target_modules is None or bool(self.target_modules),
            "lora.target_modules",
            self.target_modules,
            "null (the family's default) or a non-empty list",
        )


@dataclass
class DPOSection:
    """DPO knobs with TRL's names, plus the efficient-step switches."""

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    ld_alpha: float | None = None
    use_weighting: bool = False
    disable_dropout: bool = True
    max_length: int = 2048
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    image_once: bool = True
    share_prompt: bool = True
    logps_chunk_size: int = 1024

    def check(self) -> None:
        _require(self.beta > 0, "dpo.beta", self.beta, "a number > 0")
        types_ = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        _require(bool(types_), "dpo.loss_type", self.loss_type, "a loss type or a non-empty list of them")
        for name in types_:
            _choice("dpo.loss_type", name, LOSS_TYPES)
        if self.loss_weights is not None:
            _require(
                len(self.loss_weights) == len(types_),
                "dpo.loss_weights",
                self.loss_weights,
                f"{len(types_)} weights, one per loss_type",
            )
        _require(0.0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        if "exo_pair" in types_:
            _require(self.label_smoothing > 0, "dpo.label_smoothing", 0.0, "> 0 for exo_pair (the EXO paper: 1e-3)")
        _choice("dpo.f_divergence_type", self.f_divergence_type, F_DIVERGENCES)
        plain = [name for name in types_ if name not in F_DIVERGENCE_LOSS_TYPES]
        if self.f_divergence_type != "reverse_kl" and plain:
            _require(False, "dpo.f_divergence_type", self.f_divergence_type, f"reverse_kl with loss types {plain}")
        _require(self.discopop_tau > 0, "dpo.discopop_tau", self.discopop_tau, "a number > 0")
        if self.ld_alpha is not None:
            _require(0.0 <= self.ld_alpha <= 1.0, "dpo.ld_alpha", self.ld_alpha, "null or a number in [0, 1]")
        sorted_ = [name for name in types_ if name in ("aot", "aot_unpaired")]
        if self.use_weighting and sorted_:  # their per-pair values are by rank: no pair's own loss to weight
            _require(False, "dpo.use_weighting", True, f"false with loss types {sorted_}")
        _require(self.max_length >= 16, "dpo.max_length", self.max_length, "an integer >= 16")
        _require(self.logps_chunk_size >= 1, "dpo.logps_chunk_size", self.logps_chunk_size, "an integer >= 1")
        size = self.precompute_ref_batch_size
        _require(size is None or size >= 1, "dpo.precompute_ref_batch_size", size, "null or an integer >= 1")


@dataclass
class DeepSpeedSection:
    """ZeRO through the Hugging Face integration: `stage` 0 (off), 2 or 3, or a JSON `config` path."""

    stage: int = 0
    offload: bool = False
    config: str | None = None

    def check(self) -> None:
        _choice("deepspeed.stage", self.stage, (0, 1, 2, 3))
        _require(not (self.offload and self.stage == 0), "deepspeed.offload", self.offload, "false when stage is 0")


@dataclass
class LaunchSection:
    """Local launch: processes per node; `cpu: true` runs N gloo processes without GPUs."""

    nproc_per_node: int | None = None
    cpu: bool = False
    master_port: int = 29500

    def check(self) -> None:
        _require(
            self.nproc_per_node is None or self.nproc_per_node >= 1,
            "launch.nproc_per_node",
            self.nproc_per_node,
            "null (one per GPU) or an integer >= 1",
        )


@dataclass
class SlurmSection:
    """Slurm batch settings used with `--gpus N`."""

    gpus_per_node: int = 8
    job_name: str = "silkie-dpo"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | int = "24:00:00"  # sbatch --time: "HH:MM:SS", "D-HH:MM", or minutes
    cpus_per_gpu: int | None = 8
    mem_per_gpu: str | None = None
    constraint: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    requeue: bool = True
    signal: str = "USR1"
    signal_seconds: int = 300
    rdzv_port: int | None = None

    def check(self) -> None:
        _require(self.gpus_per_node >= 1, "slurm.gpus_per_node", self.gpus_per_node, "an integer >= 1")
        _require(self.signal_seconds >= 1, "slurm.signal_seconds", self.signal_seconds, "an integer >= 1")


@dataclass
class Recipe:
    """A whole training recipe (one YAML file)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    training: dict[str, Any] = field(default_factory=dict)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)

    def check(self) -> None:
        """Validate every section."""
        for section in (self.model, self.data, self.lora, self.dpo, self.deepspeed, self.launch, self.slurm):
            section.check()
        _check_training(self.training)
        evaluates = (self.data.eval_size or self.data.eval_fraction) and self.training.get("eval_strategy") != "no"
        if self.training.get("save_strategy") == "best" and not evaluates:
            raise RecipeError(
                "recipe: training.save_strategy = 'best' needs evaluations (held-out pairs from data.eval_size or "
                "data.eval_fraction, and training.eval_strategy steps or epoch)"
            )
        if self.lora.load_in_4bit and self.launch.cpu:  # refused before the launcher writes anything
            raise RecipeError(
                "recipe: lora.load_in_4bit = True needs a CUDA GPU (bitsandbytes 4-bit), but launch.cpu = True; "
                "set lora.load_in_4bit=false or launch.cpu=false"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for `config.yaml` in the working directory)."""
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise RecipeError(f"recipe: {key} = {value!r} is not allowed; expected {allowed}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, key, value, "one of " + ", ".join(repr(a) for a in allowed))


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            _type_ok(k, key_type) and _type_ok(v, value_type) for k, v in value.items()
        )
    return isinstance(value, annotation)


def _coerce(value: Any, annotation: Any) -> Any:
    """Ints become floats for float fields; a numeric string becomes a float where only a float is allowed."""
    if isinstance(value, int) and not isinstance(value, bool) and _type_ok(float(value), annotation):
        return float(value)
    if isinstance(value, str) and not _type_ok(value, annotation) and _type_ok(1.0, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _describe(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: section '{prefix}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise RecipeError(f"recipe: unknown key '{prefix}.{key}'{_suggest(key, known)}")
        value = _coerce(value, hints[key])
        if not _type_ok(value, hints[key]):
            raise RecipeError(
                f"recipe: {prefix}.{key} = {value!r} has the wrong type; expected {_describe(hints[key])}"
            )
        values[key] = value
    return cls(**values)


def _check_training(training: dict[str, Any]) -> None:
    for key, value in list(training.items()):
        if key not in TRAINING_KEYS:
            raise RecipeError(f"recipe: unknown key 'training.{key}'{_suggest(key, sorted(TRAINING_KEYS))}")
        value = training[key] = _coerce(value, TRAINING_KEYS[key])
        if not _type_ok(value, TRAINING_KEYS[key]):
            raise RecipeError(
                f"recipe: training.{key} = {value!r} has the wrong type; expected {_describe(TRAINING_KEYS[key])}"
            )
        if key in TRAINING_CHOICES:
            _choice(f"training.{key}", value, TRAINING_CHOICES[key])


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Build and validate a Recipe from a nested dict."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: the top level must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise RecipeError(f"recipe: unknown section '{name}'{_suggest(name, list(sections))}")
        if name == "training":
            if not isinstance(value, dict):
                raise RecipeError("recipe: section 'training' must be a mapping")
            built[name] = dict(value)
        else:
            built[name] = _build_section(typing.get_type_hints(Recipe)[name], value or {}, name)
    recipe = Recipe(**built)
    recipe.check()
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides, validate; errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    overrides = overrides or []
    merged = apply_overrides(raw, overrides)  # its errors name the malformed override
    try:
        return recipe_from_dict(merged)
    except RecipeError as err:  # named after the override that set the key when there is one, else the file
        source = override_named_in(str(err), overrides)
        if source is None and overrides and _valid(raw):  # the file is fine: the overrides made the clash
            source = f"{path} with {' '.join(overrides)}"
        raise RecipeError(f"{source or path}: {err}") from None


def _valid(raw: Any) -> bool:
    try:
        recipe_from_dict(raw)
    except RecipeError:
        return False
    return True


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML."""
    Path(path).write_text(dump_yaml(recipe.to_dict()))
