"""The run directory: is it new, a resumable run of the same recipe, finished, or something else?

The launcher decides from `DIR/config.yaml` (the resolved recipe of the run there) and the `FINISHED`
marker that `silkie.train` writes at the end; it never deletes anything: `--force` moves the files a
new run would overwrite into `DIR/backup-<timestamp>/` (outside the `checkpoint-*` names that checkpoint rotation
counts and deletes).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from silkie.config import Recipe, RecipeError, recipe_from_dict, save_recipe
from silkie.config.recipe import read_recipe_file
from silkie.run_dir import (
    ADAPTER_DIR,
    BACKUP_PREFIX,
    CONFIG_NAME,
    CORRUPT_PREFIX,
    ERROR_NAME,
    EVAL_SAMPLES_NAME,
    EVALUATION_OUTPUTS,
    FINISHED_NAME,
    FINISHED_OUTPUTS,
    METRICS_NAME,
    REFERENCE_DIR,
    RUN_HISTORY,
    SLURM_DIR,
    checkpoint_step,
    checkpoints,
    holds_training_output,
    resume_plan,
    verify_checkpoint,
)

EXIT_USAGE = 2  # the launcher's exit code for a refusal or bad input


class LaunchError(Exception):
    """A refusal or a bad request: printed as one line, exit code 2."""


@dataclass
class WorkdirPlan:
    """What launching into a directory will do."""

    working: Path
    state: str  # "new", "resume", "finished" or "force"
    message: str
    backups: list[tuple[Path, Path]] = field(default_factory=list)  # (original, renamed to)
    resume_from: Path | None = None  # the checkpoint training will continue from
    new_settings: bool = False  # a resume with changed settings that do not change the results (config rewritten)
    history_until: int | None = None  # a shortened run: its step logs are kept up to the step it goes on from

    @property
    def config_path(self) -> Path:
        return self.working / CONFIG_NAME


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"section.key": value} (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ, each as "key (old -> new)", in recipe order."""
    flat_old, flat_new = flatten(old), flatten(new)
    keys = list(flat_new) + [k for k in flat_old if k not in flat_new]
    missing = object()
    diffs = []
    for key in keys:
        a, b = flat_old.get(key, missing), flat_new.get(key, missing)
        if a != b:
            show = ["(absent)" if v is missing else repr(v) for v in (a, b)]
            diffs.append(f"{key} ({show[0]} -> {show[1]})")
    return diffs


def _read_recipe(path: Path) -> dict[str, Any]:
    """The recipe stored in a run directory, normalised through the schema (defaults filled in)."""
    return recipe_from_dict(read_recipe_file(path)[0]).to_dict()


def _summary(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def inspect_workdir(working: str | Path, recipe: Recipe, force: bool = False) -> WorkdirPlan:
    """Decide what a launch into `working` does; raise LaunchError when it must be refused."""
    working = Path(working)
    if working.exists() and not working.is_dir():
        raise LaunchError(f"--working {working} exists and is not a directory")
    config = working / CONFIG_NAME
    resolved = recipe.to_dict()
    if config.is_file():
        try:
            stored = _read_recipe(config)
            diffs = recipe_differences(stored, resolved)
        except RecipeError as err:
            diffs = [f"its {CONFIG_NAME} is not a valid recipe: {err}"]
        launch_only = [d for d in diffs if not d.startswith(FREE_CHANGES)] == []
        if not diffs or launch_only:  # how the run is launched and fed may change on a resume; its results may not
            if (working / FINISHED_NAME).exists():
                return WorkdirPlan(working, "finished", _finished_message(working))
            if force and holds_training_output(working):  # e.g. the data changed under the same recipe
                return _forced(working, "a run of this recipe was there (it starts over)", resumable=False)
            ckpt, damaged = resume_plan(working, checksums=False)
            where = f"resumes from {ckpt.name}" if ckpt else "starts (no checkpoint yet)"
            where += "".join(f"; {bad.name} is damaged ({why}) and is moved aside first" for bad, why in damaged)
            launch_note = f" (new settings: {_summary(diffs)})" if diffs else ""
            return WorkdirPlan(
                working,
                "resume",
                f"{working} holds a run of this recipe{launch_note}; training {where}",
                resume_from=ckpt,
                new_settings=bool(diffs),
            )
        if not holds_training_output(working):  # a start that stopped early (e.g. on bad input): nothing to keep
            return WorkdirPlan(
                working, "new", f"{working} held a recipe that wrote no checkpoint or metrics: replaced by this one"
            )
        resumable = _only_schedule_changes(diffs)
        max_steps = recipe.training.get("max_steps") or -1
        if not force:
            ckpt, later = _resume_within(working, max_steps) if resumable else (None, [])
            if ckpt and later:
                how = f"--force to go on from {ckpt.name} (the later {_summary([p.name for p in later])} moved aside)"
            elif ckpt:
                how = f"--force to extend it from {ckpt.name} with the new schedule"
            else:
                how = "--force to start over there from step 0 (the old run is moved to a backup folder)"
            raise LaunchError(
                f"{working} holds a different recipe: {_summary(diffs)}; "
                f"use another --working, or {how} (nothing is deleted)"
            )
        return _forced(working, "a different recipe was there", resumable=resumable, max_steps=max_steps)
    if working.is_dir():
        entries = sorted(p.name for p in working.iterdir())
        if entries:
            if not force:
                raise LaunchError(
                    f"{working} is not empty and holds no {CONFIG_NAME} (found: {_summary(entries)}); "
                    "use another --working, or --force to run there anyway (nothing is deleted)"
                )
            return _forced(working, "the folder held other files", resumable=False)
    return WorkdirPlan(working, "new", f"new run in {working}")


def _finished_message(working: Path) -> str:
    step = ""
    try:
        step = f" at step {yaml.safe_load((working / FINISHED_NAME).read_text())['step']}"
    except Exception:  # an old or hand-made marker: the message just has no step
        pass
    return (
        f"{working} holds a finished run of this recipe (FINISHED{step}); nothing to do "
        f"(adapter: {working / ADAPTER_DIR}; use another --working to train again)"
    )


# Settings that change how a run is launched, fed and logged, never what it computes: a resume takes them as they are.
FREE_CHANGES = (
    "launch.",
    "slurm.",
    "data.num_proc",
    "training.dataloader_",
    "training.report_to",
    "training.logging_steps",
    "training.save_total_limit",
    "training.disable_tqdm",
    "training.log_level",
    "dpo.precompute_ref_batch_size",
    "dpo.generate_",  # answers shown at evaluations (greedy: no random draws)
)
RESUMABLE_CHANGES = (
    "training.max_steps",
    "training.num_train_epochs",
    "training.save_steps",
    "training.save_total_limit",
    "training.eval_steps",
    "training.eval_strategy",
    "training.logging_steps",
    "training.report_to",
    "launch.",
    "slurm.",
)


def _only_schedule_changes(diffs: list[str]) -> bool:
    """True when only run length, logging/saving cadence or launch settings changed (the checkpoints still fit)."""
    return all(diff.split(" (")[0].startswith(RESUMABLE_CHANGES) for diff in diffs)


def _resume_within(working: Path, max_steps: int) -> tuple[Path | None, list[Path]]:
    """(the checkpoint a resume with `max_steps` goes on from, [the later checkpoints it must move aside]): a run
    shortened below its newest checkpoints goes back to the newest intact one at or before its new end."""
    later = [c for c in checkpoints(working) if 0 < max_steps < checkpoint_step(c)]
    if not later:
        return resume_plan(working, checksums=False)[0], []
    within = [c for c in checkpoints(working) if checkpoint_step(c) <= max_steps]
    intact = next((c for c in reversed(within) if verify_checkpoint(c, checksums=False) is None), None)
    return intact, later


def _forced(working: Path, why: str, resumable: bool, max_steps: int = -1) -> WorkdirPlan:
    """--force: move the old outputs (and what `silkie evaluate` wrote of them) to backup-<stamp>/; the checkpoints
    too unless the recipe change keeps them, and those past a shortened run's new end."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = list(FINISHED_OUTPUTS) + sorted({p.name for glob in EVALUATION_OUTPUTS for p in working.glob(glob)})
    ckpt, later = _resume_within(working, max_steps) if resumable else (None, [])
    until = checkpoint_step(ckpt) if ckpt is not None and later else None
    if resumable and (ckpt is not None or not later):
        names += [c.name for c in later]
        if until is not None:  # the abandoned steps' logs go too; the kept steps' lines are written back
            names += [name for name in RUN_HISTORY if name != REFERENCE_DIR]
    else:  # another model, data or optimisation (or a run shortened below every checkpoint): the old checkpoints and
        # history must not continue (the reference cache stays: it is keyed by what it was computed from)
        ckpt = None
        names += sorted(p.name for p in working.glob("checkpoint-*")) + [n for n in RUN_HISTORY if n != REFERENCE_DIR]
        names += sorted(p.name for p in working.glob(f"{CORRUPT_PREFIX}checkpoint-*"))
    backup = working / f"{BACKUP_PREFIX}{stamp}"
    backups = [(working / name, backup / name) for name in names if (working / name).exists()]
    kept = f"; moves the old {_summary([a.name for a, _ in backups], 6)} to {backup.name}/" if backups else ""
    where = f"resumes from {ckpt.name}" if ckpt else "starts from step 0"
    message = f"--force: {why}{kept}; training {where}"
    return WorkdirPlan(working, "force", message, backups, resume_from=ckpt, history_until=until)


def prepare_workdir(plan: WorkdirPlan, recipe: Recipe) -> None:
    """Create the directory, make the --force renames (a shortened run gets back its step logs up to the step it
    goes on from) and write the resolved recipe to config.yaml."""
    plan.working.mkdir(parents=True, exist_ok=True)
    (plan.working / ERROR_NAME).unlink(missing_ok=True)  # from an earlier start: this one gets its own
    for original, backup in plan.backups:
        backup.parent.mkdir(exist_ok=True)
        original.rename(backup)
        if plan.history_until is not None and original.name in (METRICS_NAME, EVAL_SAMPLES_NAME):
            kept = [line for line in backup.read_text().splitlines(keepends=True) if _step(line) <= plan.history_until]
            original.write_text("".join(kept))
    if plan.state != "resume" or plan.new_settings:
        save_recipe(recipe, plan.config_path)


def _step(line: str) -> float:
    """The `step` of a metrics.jsonl / eval_samples.jsonl line (a line without one sorts last)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def undo_prepare(plan: WorkdirPlan, created: bool) -> None:
    """Take back what `prepare_workdir` did (a refused submission): the new config.yaml, the renames, the folder."""
    if plan.state != "resume":
        plan.config_path.unlink(missing_ok=True)
    for original, backup in plan.backups:
        backup.rename(original)
    for folder in {backup.parent for _, backup in plan.backups}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if created:
        for folder in (plan.working / SLURM_DIR, plan.working):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
