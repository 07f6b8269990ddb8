"""Held-out DPO reward metrics of a trained run: rebuild its split, score policy (vs reference), summarize.

Rewards are beta * (policy - reference) answer log-probs, as in training (beta * the policy's log-probs, per-token
averages for simpo and orpo, for the reference-free losses). For a LoRA run the reference is
the same model with the adapter disabled; for a full fine-tuning run (the run's `adapter/` holds a whole
checkpoint) it is the base checkpoint of the recipe.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from silkie.config.names import BATCH_LEVEL_LOSS_TYPES
from silkie.errors import InputError
from silkie.run_dir import ADAPTER_DIR, CONFIG_NAME
from silkie.tools.cli import ToolError, read_config, require_dir, require_file

METRIC_ROWS = (
    ("pairs", "n_pairs"),
    ("reward accuracy", "rewards/accuracies"),
    ("reward margin", "rewards/margins"),
    ("chosen reward", "rewards/chosen"),
    ("rejected reward", "rewards/rejected"),
    ("loss (objective)", "loss"),
    ("policy logp chosen", "logps/chosen"),
    ("policy logp rejected", "logps/rejected"),
    ("imageless accuracy", "rewards/imageless_accuracies"),
    ("chosen image gain", "logps/chosen_image_gain"),
)


@dataclass
class PairTable:
    """Per-pair results, in dataset order of the scored pairs."""

    pair_index: list[int] = field(default_factory=list)
    prompt_id: list[str] = field(default_factory=list)
    columns: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, values: torch.Tensor) -> None:
        """Append a batch of one per-pair column."""
        self.columns.setdefault(name, []).extend(float(v) for v in values.detach().float().cpu())


def score_pairs(trainer: Any, dataset: Any, batch_size: int) -> PairTable:
    """Per-pair policy/reference log-probs, rewards and DPO loss terms over `dataset`, each batch scored by the
    run's trainer as its training step scores it (no gradients)."""
    from torch.utils.data import DataLoader

    from silkie.dpo.objective import logged_logps

    table = PairTable()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=trainer.eval_data_collator)
    model = trainer.model.eval()
    for batch in loader:
        batch = trainer._prepare_inputs(batch)
        with torch.no_grad():
            scores = trainer.score_batch(model, batch)
        kept = batch["pair_weight"] > 0  # a pair whose image or video failed is left out (counted as dropped)
        table.pair_index.extend(int(i) for i in batch["pair_index"][kept])
        # a reference-free loss (cpo, simpo, orpo) has no reference log-probs to report
        reference = [("ref_logps/chosen", scores.ref_chosen), ("ref_logps/rejected", scores.ref_rejected)]
        chosen_logps, rejected_logps = logged_logps(scores)  # simpo, orpo: per-token averages, as the trainer's
        for name, values in (
            ("logps/chosen", chosen_logps),
            ("logps/rejected", rejected_logps),
            *(reference if trainer.objective.uses_reference else []),
            ("rewards/chosen", scores.out.chosen_rewards),
            ("rewards/rejected", scores.out.rejected_rewards),
            ("loss", scores.out.per_pair),
            *_imageless_columns(scores),
        ):
            table.add(name, values[kept.to(values.device)])
    table.prompt_id = [dataset[i]["prompt_id"] for i in table.pair_index]
    return table


def _imageless_columns(scores: Any) -> list[tuple[str, torch.Tensor]]:
    """The rewards under the corrupted images, and how much the picture raises the chosen answer's log-prob."""
    again = scores.corrupted
    if again is None:
        return []
    from silkie.dpo.objective import imageless_rewards

    device = again.policy.chosen_logps.device
    chosen, rejected = imageless_rewards(scores)
    gain = scores.policy.chosen_logps - again.policy.chosen_logps
    with_media = torch.ones_like(gain) if again.with_media is None else again.with_media.to(device)
    return [
        ("imageless_rewards/chosen", chosen),
        ("imageless_rewards/rejected", rejected),
        ("logps/chosen_image_gain", gain),
        ("with_media", with_media),
    ]


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
    if "imageless_rewards/chosen" in table.columns:  # the preference without the picture, over pairs that have one
        media = torch.tensor(table.columns["with_media"]) > 0
        summary["n_pairs_with_media"] = int(media.sum())
        if media.any():
            chosen = torch.tensor(table.columns["imageless_rewards/chosen"], dtype=torch.float64)[media]
            rejected = torch.tensor(table.columns["imageless_rewards/rejected"], dtype=torch.float64)[media]
            summary["rewards/imageless_accuracies"] = float((chosen > rejected).double().mean())
            gain = torch.tensor(table.columns["logps/chosen_image_gain"], dtype=torch.float64)[media]
            summary["logps/chosen_image_gain"] = float(gain.mean())
    return summary


def _scoring_recipe(
    recipe: Any, model_dir: Path, lora: bool, batch_size: int, device: str, image_corruption: str | None = None
) -> Any:
    """The run's recipe as the scoring trainer needs it: this model folder, one process without DeepSpeed, the
    reference scored on the fly (the run's cache is neither read, which holds only its own split's pairs, nor
    rewritten), `batch_size` pairs per batch, on the device asked; with `image_corruption`, the imageless
    diagnostics under that corruption (one a vision loss was not trained on tests it without the circle)."""
    from silkie.config import DeepSpeedSection
    from silkie.tools.common import family_of

    model = dataclasses.replace(recipe.model, path=str(model_dir), family=family_of(model_dir))
    training = {**recipe.training, "per_device_eval_batch_size": batch_size, "report_to": "none"}
    launch = dataclasses.replace(recipe.launch, cpu=device == "cpu")
    data, dpo = recipe.data, dataclasses.replace(recipe.dpo, precompute_ref_log_probs=False)
    if image_corruption is not None:
        data = dataclasses.replace(data, image_corruption=image_corruption)
        dpo = dataclasses.replace(dpo, image_diagnostics=True)
    return dataclasses.replace(
        recipe,
        data=data,
        model=model,
        lora=dataclasses.replace(recipe.lora, enabled=lora, load_in_4bit=False),
        training=training,
        deepspeed=DeepSpeedSection(),
        dpo=dpo,
        launch=launch,
    )


def _run_folder(value: str, override: str | Path | None, key: str, flag: str) -> Path:
    """The run's checkpoint folder for `key` (a folder, or a cached hub id), or `override` (the tool's `flag`)."""
    if override is not None:
        return Path(override)
    from silkie.models.loading import local_checkpoint

    try:
        return Path(local_checkpoint(value, key))
    except InputError as err:
        hint = f"relative paths in config.yaml are relative to where training ran (or pass {flag})"
        raise ToolError(f"{err}; {hint}") from err


def locate_run(
    run_dir: Path,
    adapter_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
    ref_model_dir: str | Path | None = None,
) -> tuple[Any, Path, Path, bool]:
    """(recipe, base checkpoint folder, adapter folder, whether it is a LoRA adapter) of a trained run; the
    adapter defaults to RUN/adapter, the base to the recipe's model.path, its `model.ref_model` (when it has one)
    to the recipe's, resolved here. `ToolError` naming what is missing."""
    from silkie.config import load_recipe

    recipe = read_config(load_recipe, require_file(run_dir / CONFIG_NAME, "run recipe"))
    adapter_dir = Path(adapter_dir) if adapter_dir else run_dir / ADAPTER_DIR
    if not adapter_dir.is_dir():  # an interrupted run has checkpoints but no final adapter yet
        from silkie.run_dir import latest_checkpoint

        last = latest_checkpoint(run_dir)
        hint = f"; the run has not finished: score its last checkpoint with --adapter {last}" if last else ""
        raise ToolError(f"adapter folder not found: {adapter_dir}{hint}")
    model_dir = _run_folder(recipe.model.path, model_dir, "model.path", "--model")
    if recipe.model.ref_model:
        ref_dir = _run_folder(recipe.model.ref_model, ref_model_dir, "model.ref_model", "--ref-model")
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, ref_model=str(ref_dir)))
    lora = (adapter_dir / "adapter_config.json").is_file()
    if not lora and not (adapter_dir / "config.json").is_file():
        raise ToolError(
            f"{adapter_dir} holds neither a LoRA adapter (adapter_config.json) nor a checkpoint (config.json)"
        )
    return recipe, model_dir, adapter_dir, lora


def evaluate_run(
    run_dir: str | Path,
    adapter_dir: str | Path | None = None,
    split: str = "eval",
    batch_size: int | None = None,
    model_dir: str | Path | None = None,
    device: str = "auto",
    max_pairs: int | None = None,
    image_corruption: str | None = None,
    ref_model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score `split` of the run's recipe with its adapter; returns {summary, run facts, per-pair table}
    (`image_corruption`: the imageless diagnostics under that corruption instead of the recipe's;
    `ref_model_dir`: the run's model.ref_model elsewhere)."""
    from silkie.tools.common import load_codec_from, load_model, resolve_device, resolve_tool_dtype
    from silkie.train.build import build_trainer

    run_dir = require_dir(run_dir, "run directory")
    recipe, model_dir, adapter_dir, lora = locate_run(run_dir, adapter_dir, model_dir, ref_model_dir)
    codec = load_codec_from(model_dir, adapter_dir, section=recipe.model)
    dtype, target = resolve_tool_dtype(recipe.model.dtype), resolve_device(device)
    if target.type == "cuda" and target.index not in (None, 0):  # the trainer scores on the first visible GPU
        raise ToolError(f"--device {device}: run with CUDA_VISIBLE_DEVICES={target.index} and --device cuda instead")
    # a LoRA run's policy is the base with its adapter (the reference: adapter off); a full fine-tuning run's is
    # its checkpoint (the reference: the base checkpoint); model.ref_model's is loaded by the trainer as in training
    policy = load_model(model_dir, adapter_dir, dtype) if lora else load_model(adapter_dir, None, dtype)
    size = batch_size or int(recipe.training.get("per_device_eval_batch_size", 8))
    scoring = _scoring_recipe(recipe, model_dir, lora, size, target.type, image_corruption)
    try:
        built = build_trainer(scoring, run_dir, bookkeeping=False, policy=policy, codec=codec)
    except FileNotFoundError as err:
        raise ToolError(f"{err} (relative paths in config.yaml are relative to where training ran)") from err
    dataset = built.data.eval if split == "eval" else built.data.train
    if dataset is None:
        raise ToolError(
            f"run {run_dir} has no eval split (data.eval_fraction / data.eval_size / data.eval_path unset); "
            "use --split train"
        )
    if max_pairs is not None:
        dataset = dataset.select(range(min(max_pairs, len(dataset))))
    table = score_pairs(built.trainer, dataset, size)
    columns = dict(table.columns)
    if set(built.trainer.objective.loss_types) & set(BATCH_LEVEL_LOSS_TYPES):  # a batch's value, not the pair's
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
        "image_corruption": scoring.data.image_corruption if scoring.dpo.image_diagnostics else None,
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
        if key not in summary:  # the imageless rows, when the run's recipe turned the diagnostics off
            continue
        value = summary[key]
        lines.append(f"  {label:<22}{value:>12}" if isinstance(value, int) else f"  {label:<22}{value:>12.4f}")
    if "rewards/imageless_accuracies" in summary:
        lines.append(f"  (imageless: under the {result['image_corruption']} corruption, over the "
                     f"{summary['n_pairs_with_media']} pairs with an image or video)")  # fmt: skip
    if result["dropped_pairs"]:
        lines.append(f"  ({result['dropped_pairs']} pairs skipped: an image or video of theirs failed to load)")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path, per_pair: bool = False) -> Path:
    """Write the result as JSON (the per-pair table only with `per_pair`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = result if per_pair else {k: v for k, v in result.items() if k != "pairs"}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
