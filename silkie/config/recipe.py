"""Typed recipe schema: YAML -> dataclasses, validated at load time. Imports no torch.

Every section is a dataclass; `training` holds Hugging Face `TrainingArguments` fields
(a documented subset, checked by name, type and range in `training`). Errors name the key, the value and
what is allowed; unknown keys suggest the closest known key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from silkie.errors import RecipeError

from .checkpoint import checkpoint_family
from .checks import coerce, describe, refuse_unknown, suggest, type_ok
from .cluster import DeepSpeedSection, LaunchSection, SlurmSection
from .data_section import DataSection
from .dpo_section import DPOSection
from .flat import is_flat, translate_flat
from .lora_section import LoraSection, module_names
from .model_section import ModelSection
from .names import MOE_FAMILIES
from .objective import uses_reference
from .training import TRAINING_KEYS, check_training
from .yaml_io import apply_overrides, dump_yaml, override_named_in, parse_yaml, yaml_error


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
        check_training(self.training)
        held_out = self.data.eval_size or self.data.eval_fraction or self.data.eval_path
        evaluates = held_out and self.training.get("eval_strategy") != "no"
        if self.dpo.generate_during_eval and not evaluates:
            raise RecipeError(
                "recipe: dpo.generate_during_eval answers held-out prompts at each evaluation, but this recipe never "
                "evaluates; give held-out pairs (data.eval_size, data.eval_fraction or data.eval_path) and "
                "training.eval_strategy steps or epoch, or set dpo.generate_during_eval=false"
            )
        if self.training.get("save_strategy") == "best" and not evaluates:
            raise RecipeError(
                "recipe: training.save_strategy = 'best' needs evaluations (held-out pairs from data.eval_size, "
                "data.eval_fraction or data.eval_path, and training.eval_strategy steps or epoch)"
            )
        if self.model.attn_implementation == "varlen" and not self.dpo.share_prompt:
            raise RecipeError(
                "recipe: model.attn_implementation = 'varlen' needs dpo.share_prompt = true (its sequences are the "
                "packed rows' prompt+chosen and rejected); set dpo.share_prompt=true or another attention"
            )
        if self.model.ref_model and not uses_reference(self.dpo.loss_type):
            raise RecipeError(
                f"recipe: model.ref_model = {self.model.ref_model!r} is set, but dpo.loss_type {self.dpo.loss_type} "
                "reads no reference (cpo, simpo and orpo are reference-free); leave model.ref_model out"
            )
        if self.dpo.sync_ref_model and self.lora.enabled and self.model.ref_model:
            raise RecipeError(
                "recipe: dpo.sync_ref_model under LoRA moves a snapshot of the adapters on model.path, so it cannot "
                f"start from model.ref_model = {self.model.ref_model!r}; leave model.ref_model out, or set "
                "lora.enabled=false to mix the policy into that checkpoint"
            )
        moe = self.model.family in MOE_FAMILIES
        if moe and self.lora.load_in_4bit:
            raise RecipeError(
                f"recipe: lora.load_in_4bit with model.family {self.model.family}: bitsandbytes quantizes linear "
                "layers only, so the experts (most of the weights) would stay unquantized and peft's k-bit preparation "
                "would cast them to fp32; train it in bf16 (deepspeed.stage=3 spreads it over the GPUs)"
            )
        if moe and self.model.compile_blocks and self.dpo.router_aux_loss_coef != 0:
            raise RecipeError(
                "recipe: model.compile_blocks: a compiled decoder block does not run the hooks that read the routers' "
                f"logits, so {self.model.family}'s load-balancing loss (dpo.router_aux_loss_coef; null: the "
                "checkpoint's) would be lost; set dpo.router_aux_loss_coef=0 or model.compile_blocks=false"
            )
        if self.lora.load_in_4bit and self.launch.cpu:  # refused before the launcher writes anything
            raise RecipeError(
                "recipe: lora.load_in_4bit = True needs a CUDA GPU (bitsandbytes 4-bit), but launch.cpu = True; "
                "set lora.load_in_4bit=false or launch.cpu=false"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for `config.yaml` in the working directory)."""
        return dataclasses.asdict(self)


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: section '{prefix}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    refuse_unknown(prefix, raw, known)
    values = {}
    for key, value in raw.items():
        value = coerce(value, hints[key])
        if f"{prefix}.{key}" == "lora.target_modules" and isinstance(value, str):
            value = module_names(value)
        if not type_ok(value, hints[key]):
            raise RecipeError(f"recipe: {prefix}.{key} = {value!r} has the wrong type; expected {describe(hints[key])}")
        values[key] = value
    return cls(**values)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Build and validate a Recipe from a nested dict."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: the top level must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    built = {}
    if isinstance(raw.get("model"), dict):
        raw = {**raw, "model": with_checkpoint_family(raw["model"])}
    for name, value in raw.items():
        if name not in sections:
            raise RecipeError(f"recipe: unknown section '{name}'{suggest(name, list(sections))}")
        if name == "training":
            if not isinstance(value, dict):
                raise RecipeError("recipe: section 'training' must be a mapping")
            built[name] = dict(value)
        else:
            built[name] = _build_section(typing.get_type_hints(Recipe)[name], value or {}, name)
    recipe = Recipe(**built)
    recipe.check()
    return recipe


def with_checkpoint_family(model: dict[str, Any]) -> dict[str, Any]:
    """The `model:` section with `family` read from the checkpoint's config.json when the recipe leaves it out
    and `path` is a local folder of a known model_type (else as given: the default, qwen_vl, applies)."""
    path = model.get("path")
    if "family" in model or not isinstance(path, str) or not path:
        return model
    family = checkpoint_family(Path(path).expanduser())
    return {**model, "family": family} if family else model


def read_recipe_file(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The recipe file as a sectioned dict, and (for a flat recipe in the Silkie repository's format) one line per
    key saying where its translation put it; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(yaml_error(err, str(path))) from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path} is not UTF-8 text (byte {err.start})") from None
    if not is_flat(raw):
        return raw, []
    try:
        return translate_flat(raw)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (sectioned, or flat as in the Silkie repository), apply overrides, validate; errors name
    the file and key."""
    path = Path(path)
    raw, translation = read_recipe_file(path)
    overrides = overrides or []
    for text in overrides:
        _refuse_bare_key(text)
    merged = apply_overrides(raw, overrides)  # its errors name the malformed override
    try:
        return recipe_from_dict(merged)
    except RecipeError as err:  # named after the override that set the key when there is one, else the file
        source = override_named_in(str(err), overrides)
        if source is not None and not _valid(raw):  # the file has faults of its own (all unknown keys are listed)
            source = f"{path} and {source}"
        if source is None and overrides and _valid(raw):  # the file is fine: the overrides made the clash
            source = f"{path} with {' '.join(overrides)}"
        flat = _flat_key_of(str(err), translation) if source is None else None
        written = f" (the flat recipe's {flat})" if flat else ""
        raise RecipeError(f"{source or path}: {err}{written}") from None


def _flat_key_of(message: str, translation: list[str]) -> str | None:
    """The flat recipe's key that became the sectioned key an error names (`beta` for `dpo.beta`), from the lines
    `translate_flat` wrote (`beta: "high" -> dpo.beta`)."""
    for line in translation:
        written, arrow, target = line.rpartition(" -> ")
        key = written.split(":", 1)[0]
        if arrow and not key.startswith("(") and re.search(rf"(?<![\w.]){re.escape(target)}\b", message):
            return key
    return None


def _refuse_bare_key(text: str) -> None:
    """`beta=0.2`: a key without its section; the error names the section(s) that have it."""
    key, _, value = text.partition("=")
    key = key.strip()
    if not _ or not key or "." in key:
        return
    sections = [f.name for f in dataclasses.fields(Recipe) if f.name != "training"]
    owners = [name for name in sections if key in {f.name for f in dataclasses.fields(getattr(Recipe(), name))}]
    owners += ["training"] if key in TRAINING_KEYS else []
    hint = " or ".join(f"{owner}.{key}={value}" for owner in owners) or "e.g. training.learning_rate=5e-6"
    raise RecipeError(f"override '{text}': the key must be section.key ({hint})")


def _valid(raw: Any) -> bool:
    try:
        recipe_from_dict(raw)
    except RecipeError:
        return False
    return True


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML."""
    Path(path).write_text(dump_yaml(recipe.to_dict()))
