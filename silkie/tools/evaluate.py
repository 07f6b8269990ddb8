"""Held-out DPO reward metrics of a trained run: rebuild its split, score policy vs reference, summarize.

Rewards are beta * (policy - reference) answer log-probs, as in training. For a LoRA run the reference is
the same model with the adapter disabled; for a full fine-tuning run (the run's `adapter/` holds a whole
checkpoint) it is the base checkpoint of the recipe.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from silkie.config.names import BATCH_LEVEL_LOSS_TYPES
from silkie.errors import InputError
from silkie.run_dir import ADAPTER_DIR, CACHE_DIR, CONFIG_NAME
from silkie.tools.cli import ToolError, require_dir, require_file

METRIC_ROWS = (
    ("pairs", "n_pairs"),
    ("reward accuracy", "rewards/accuracies"),
    ("reward margin", "rewards/margins"),
    ("chosen reward", "rewards/chosen"),
    ("rejected reward", "rewards/rejected"),
    ("DPO loss", "loss"),
    ("policy logp chosen", "logps/chosen"),
    ("policy logp rejected", "logps/rejected"),
)


@dataclass
class Scorer:
    """The policy, how to get the reference (a context that turns the policy into it, or a separate model)."""

    policy: nn.Module
    reference: nn.Module | None = None

    def reference_context(self) -> AbstractContextManager:
        """Inside it, `policy` computes reference log-probs (adapter disabled), unless `reference` is separate."""
        if self.reference is None:
            return self.policy.disable_adapter()
        return nullcontext()

    def reference_model(self) -> nn.Module:
        """The module to score the reference with (inside `reference_context`)."""
        return self.reference if self.reference is not None else self.policy


@dataclass
class PairTable:
    """Per-pair results, in dataset order of the scored pairs."""

    pair_index: list[int] = field(default_factory=list)
    prompt_id: list[str] = field(default_factory=list)
    columns: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, values: torch.Tensor) -> None:
        """Append a batch of one per-pair column."""
        self.columns.setdefault(name, []).extend(float(v) for v in values.detach().float().cpu())


VISION_PARTS = ("visual", "vision_tower")  # Qwen-VL / Qwen2-VL towers, LLaVA's CLIP tower


def _adapter_has_vision(model: nn.Module) -> bool:
    return any(part in name and "lora_" in name for name, _ in model.named_parameters() for part in VISION_PARTS)


def build_scorer(model_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype, device: torch.device) -> Scorer:
    """Policy + reference for a LoRA adapter folder or a full fine-tuned checkpoint folder, set up as the trainer's
    evaluation scores (the family's training settings: no inference-only long-context rules)."""
    from silkie.models.family import get_family
    from silkie.tools.common import family_of, load_model

    family = get_family(family_of(model_dir))

    def scoring(folder: str | Path, adapter: str | Path | None) -> torch.nn.Module:
        model = load_model(folder, adapter, dtype).to(device)
        family.prepare_for_training(model)
        return model

    adapter_dir = require_dir(adapter_dir, "adapter folder")
    if (adapter_dir / "adapter_config.json").is_file():
        return Scorer(scoring(model_dir, adapter_dir))
    if (adapter_dir / "config.json").is_file():
        return Scorer(scoring(adapter_dir, None), scoring(model_dir, None))
    raise ToolError(f"{adapter_dir} holds neither a LoRA adapter (adapter_config.json) nor a checkpoint (config.json)")


def score_pairs(
    scorer: Scorer,
    dataset: Any,
    collator: Any,
    objective: Any,
    pad_token_id: int,
    batch_size: int,
    options: Any,
) -> PairTable:
    """Per-pair policy/reference log-probs, rewards and DPO loss terms over `dataset` (no gradients)."""
    from torch.utils.data import DataLoader

    from silkie.dpo.objective import loss_from_scores
    from silkie.dpo.step import encode_images_once, score_answers

    table = PairTable()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    for batch in loader:
        features = encode_images_once(scorer.policy, batch) if options.image_once else None
        policy = score_answers(scorer.policy, batch, options, pad_token_id, features, no_grad=True, policy=True)
        with scorer.reference_context():
            ref = score_answers(scorer.reference_model(), batch, options, pad_token_id, features, no_grad=True)
        out = loss_from_scores(policy, ref.chosen_logps, ref.rejected_logps, objective, batch["pair_weight"])
        kept = batch["pair_weight"] > 0  # a pair whose image failed is left out (counted as dropped)
        table.pair_index.extend(int(i) for i in batch["pair_index"][kept])
        for name, values in (
            ("logps/chosen", policy.chosen_logps),
            ("logps/rejected", policy.rejected_logps),
            ("ref_logps/chosen", ref.chosen_logps),
            ("ref_logps/rejected", ref.rejected_logps),
            ("rewards/chosen", out.chosen_rewards),
            ("rewards/rejected", out.rejected_rewards),
            ("loss", out.per_pair),
        ):
            table.add(name, values[kept.to(values.device)])
    table.prompt_id = [dataset[i]["prompt_id"] for i in table.pair_index]
    return table


def summarize(table: PairTable) -> dict[str, float | int]:
    """Means over pairs: accuracy (chosen reward > rejected reward), margin, rewards, loss, log-probs."""
    chosen = torch.tensor(table.columns["rewards/chosen"], dtype=torch.float64)
    rejected = torch.tensor(table.columns["rewards/rejected"], dtype=torch.float64)
    summary: dict[str, float | int] = {
        "n_pairs": len(table.pair_index),
        "rewards/accuracies": float((chosen > rejected).double().mean()),
        "rewards/margins": float((chosen - rejected).mean()),
    }
    for name in ("rewards/chosen", "rewards/rejected", "loss", "logps/chosen", "logps/rejected"):
        summary[name] = float(torch.tensor(table.columns[name], dtype=torch.float64).mean())
    return summary


def _split_dataset(run_dir: Path, recipe: Any, tokenizer: Any, split: str) -> tuple[Any, Any]:
    from silkie.data.build import prepare_data

    cache_dir = recipe.data.cache_dir or run_dir / CACHE_DIR
    try:
        data = prepare_data(recipe.data, tokenizer, recipe.dpo.max_length, cache_dir)
    except FileNotFoundError as err:
        raise ToolError(f"{err} (relative paths in config.yaml are relative to where training ran)") from err
    dataset = data.eval if split == "eval" else data.train
    if dataset is None:
        raise ToolError(
            f"run {run_dir} has no eval split (data.eval_fraction / data.eval_size unset); use --split train"
        )
    return dataset, data.image_store


def evaluate_run(
    run_dir: str | Path,
    adapter_dir: str | Path | None = None,
    split: str = "eval",
    batch_size: int | None = None,
    model_dir: str | Path | None = None,
    device: str = "auto",
    max_pairs: int | None = None,
) -> dict[str, Any]:
    """Score `split` of the run's recipe with its adapter; returns {summary, run facts, per-pair table}."""
    from silkie.config import RecipeError, load_recipe
    from silkie.data.collator import PairCollator
    from silkie.dpo.losses import DPOObjective
    from silkie.dpo.step import recipe_step_options
    from silkie.models.family import get_family
    from silkie.tools.common import family_of, load_codec_from, resolve_device, resolve_tool_dtype

    run_dir = require_dir(run_dir, "run directory")
    try:
        recipe = load_recipe(require_file(run_dir / CONFIG_NAME, "run recipe"))
    except RecipeError as err:
        raise ToolError(str(err)) from err
    adapter_dir = Path(adapter_dir) if adapter_dir else run_dir / ADAPTER_DIR
    if not adapter_dir.is_dir():  # an interrupted run has checkpoints but no final adapter yet
        from silkie.run_dir import latest_checkpoint

        last = latest_checkpoint(run_dir)
        hint = f"; the run has not finished: score its last checkpoint with --adapter {last}" if last else ""
        raise ToolError(f"adapter folder not found: {adapter_dir}{hint}")
    if model_dir is None:  # the run's model.path: a folder, or a hub id in the hub cache
        from silkie.models.loading import local_checkpoint

        try:
            model_dir = local_checkpoint(recipe.model.path)
        except InputError as err:
            hint = "relative paths in config.yaml are relative to where training ran (or pass --model)"
            raise ToolError(f"{err}; {hint}") from err
    model_dir = Path(model_dir)
    tokenizer = load_codec_from(model_dir, adapter_dir, section=recipe.model)
    dataset, store = _split_dataset(run_dir, recipe, tokenizer, split)
    if max_pairs is not None:
        dataset = dataset.select(range(min(max_pairs, len(dataset))))
    dtype, target = resolve_tool_dtype(recipe.model.dtype), resolve_device(device)
    scorer = build_scorer(model_dir, adapter_dir, dtype, target)
    config = scorer.policy.config
    section = dataclasses.replace(recipe.model, path=str(model_dir), family=family_of(model_dir))
    images = get_family(section.family).image_processor(config, section)
    collator = PairCollator(store, images, tokenizer.pad_token_id)
    image_once = recipe.dpo.image_once and scorer.reference is None and not _adapter_has_vision(scorer.policy)
    options = recipe_step_options(recipe.dpo, image_once)
    size = batch_size or int(recipe.training.get("per_device_eval_batch_size", 8))
    objective = DPOObjective.from_section(recipe.dpo)
    table = score_pairs(scorer, dataset, collator, objective, tokenizer.pad_token_id, size, options)
    loss_types = [recipe.dpo.loss_type] if isinstance(recipe.dpo.loss_type, str) else recipe.dpo.loss_type
    columns = dict(table.columns)
    if set(loss_types) & set(BATCH_LEVEL_LOSS_TYPES):  # a value per rank or per batch, not the pair's own loss
        columns["loss"] = [None] * len(table.pair_index)
    return {
        "run": str(run_dir),
        "adapter": str(adapter_dir),
        "model": str(model_dir),
        "split": split,
        "split_size": len(dataset),
        "dropped_pairs": len(dataset) - len(table.pair_index),
        "beta": recipe.dpo.beta,
        "loss_type": recipe.dpo.loss_type,
        "summary": summarize(table),
        "pairs": [
            {"pair_index": index, "prompt_id": prompt_id, **{k: v[row] for k, v in columns.items()}}
            for row, (index, prompt_id) in enumerate(zip(table.pair_index, table.prompt_id))
        ],
    }


def format_table(result: dict[str, Any]) -> str:
    """A short text table of the summary."""
    summary = result["summary"]
    lines = [f"{result['split']} split of {result['run']} (beta {result['beta']}, adapter {result['adapter']})"]
    for label, key in METRIC_ROWS:
        value = summary[key]
        lines.append(f"  {label:<22}{value:>12}" if isinstance(value, int) else f"  {label:<22}{value:>12.4f}")
    if result["dropped_pairs"]:
        lines.append(f"  ({result['dropped_pairs']} pairs skipped: their images failed to load)")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path, per_pair: bool = False) -> Path:
    """Write the result as JSON (the per-pair table only with `per_pair`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = result if per_pair else {k: v for k, v in result.items() if k != "pairs"}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
