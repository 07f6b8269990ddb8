"""Checkpoints of a DPO run: staged, sealed with a manifest and renamed, never with non-finite weights; on a
resume the same layout, the extended schedule's learning rate and the evaluation a stop signal cut short."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers.trainer as hf_trainer
from torch import nn

from silkie.errors import InputError, weight_mismatch_line
from silkie.run_dir import RUN_LAYOUT_FILE, STAGING_PREFIX, rotate_checkpoints, world_size_problem, write_manifest

from .guards import disk_space_guard, first_nonfinite_weight, nonfinite_weights_error
from .preemption import any_rank


class ResumeError(InputError, RuntimeError):
    """A checkpoint that this launch cannot continue exactly (printed as one line)."""


def check_resume_layout(checkpoint: Path, world_size: int) -> None:
    """Refuse to resume `checkpoint` with another number of processes (launch settings may change otherwise)."""
    problem = world_size_problem(checkpoint, world_size)
    if problem:
        raise ResumeError(problem)


def data_facts(train: Any, evaluation: Any) -> dict[str, Any]:
    """What a checkpoint was trained on: the tokenized splits' fingerprints (pairs, tokenizer and options) and
    sizes."""
    return {
        "train": getattr(train, "_fingerprint", None),
        "train_pairs": len(train) if train is not None else 0,
        "eval": getattr(evaluation, "_fingerprint", None),
        "eval_pairs": len(evaluation) if evaluation is not None else 0,
    }


def check_resume_data(checkpoint: Path, facts: dict[str, Any]) -> None:
    """Refuse to resume `checkpoint` on other data: the order it was in would not continue, and held-out pairs
    could be ones it trained on (older checkpoints, which did not record it, pass)."""
    path = checkpoint / RUN_LAYOUT_FILE
    saved = json.loads(path.read_text()).get("data") if path.is_file() else None
    if saved is None or saved == facts:
        return
    raise ResumeError(
        f"{checkpoint.name} was trained on other data ({saved['train_pairs']} training and {saved['eval_pairs']} "
        f"held-out pairs then, {facts['train_pairs']} and {facts['eval_pairs']} now: the data, the pair rules, the "
        "held-out split or the tokenization changed): resuming would go on in another order and could score pairs "
        "it trained on as held-out; restore the data, or train anew: another --working, or --force here (the old "
        "run is moved aside)"
    )


class CheckpointingMixin:
    """The checkpoint and resume half of `SilkieDPOTrainer` (goes before `transformers.Trainer` in its bases)."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        # The optimizer state carries the learning rate the checkpoint's schedule had reached. When the run was
        # extended (more steps, so another schedule), the next step must use the new schedule's value, not that.
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # DeepSpeed wraps it
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        step = scheduler.last_epoch
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(step)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except RuntimeError as err:  # the folder behind model.path was swapped for another model since the start
            if "size mismatch" not in str(err):
                raise
            raise InputError(
                f"{Path(resume_from_checkpoint).name} does not fit the model in model.path "
                f"({weight_mismatch_line(str(err))}): the model folder changed since the run began; point model.path "
                "at the model it was trained from, or train in another --working"
            ) from None

    def _init_training_state(self, max_steps: int, *args: Any, **kwargs: Any) -> Any:
        trained = super()._init_training_state(max_steps, *args, **kwargs)
        if self.state.global_step > max_steps:  # e.g. fewer epochs: the checkpoint is past the new end
            raise InputError(
                f"the checkpoint resumed is at step {self.state.global_step}, past this recipe's end (step "
                f"{max_steps}): the run was shortened; set training.max_steps={max_steps} and launch with --force "
                "(it goes on from the newest checkpoint at or before it), or train in another --working"
            )
        return trained

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        """The Trainer's train; a checkpoint saved while a stop signal cut its evaluation short runs that
        evaluation again first, and a TR-DPO run goes on from the reference its checkpoint saved."""
        if resume_from_checkpoint and self.reference_sync is not None:  # TR-DPO: the reference it had reached
            self.reference_sync.load(Path(resume_from_checkpoint))
        if resume_from_checkpoint and self.args.eval_strategy != "no":
            layout = Path(resume_from_checkpoint, RUN_LAYOUT_FILE)
            if layout.is_file() and json.loads(layout.read_text()).get("evaluation_pending"):
                self._evaluation_pending = Path(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _rerun_cut_short_evaluation(self, trial: Any, ignore_keys: Any) -> None:
        """The evaluation a stop signal cut short at the resumed step, as `_maybe_log_save_evaluate` would have run
        it: a new best is this step's checkpoint, and the checkpoint no longer asks for the evaluation."""
        checkpoint, self._evaluation_pending = self._evaluation_pending, None
        self.log_line(f"running step {self.state.global_step}'s evaluation, which a stop signal cut short")
        metrics = self._evaluate(trial, ignore_keys)
        if self._determine_best_metric(metrics=metrics, trial=trial):
            self.state.best_model_checkpoint = str(checkpoint)
        if self.args.should_save and not self.control.should_training_stop:  # cut short again: it stays pending
            layout = {**json.loads((checkpoint / RUN_LAYOUT_FILE).read_text()), "evaluation_pending": False}
            (checkpoint / RUN_LAYOUT_FILE).write_text(json.dumps(layout))
            write_manifest(checkpoint)  # the layout file changed: the manifest follows it
        self.accelerator.wait_for_everyone()

    # ----- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write `tmp-checkpoint-N`, its manifest last, then rename it to `checkpoint-N`: a kill mid-write never
        leaves a partial one, and a file damaged later is found before a resume. Never with non-finite weights."""
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        bad = first_nonfinite_weight(self.model)
        if any_rank(bad is not None, self.args.device):
            raise nonfinite_weights_error(bad, step, Path(run_dir))
        staged = os.path.join(run_dir, f"{STAGING_PREFIX}-{step}")
        final = os.path.join(run_dir, f"{hf_trainer.PREFIX_CHECKPOINT_DIR}-{step}")
        original_prefix, original_limit = hf_trainer.PREFIX_CHECKPOINT_DIR, self.args.save_total_limit
        hf_trainer.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX
        self.args.save_total_limit = None  # rotate after the rename, over complete checkpoints only
        try:
            with disk_space_guard(Path(staged), Path(run_dir), f"checkpoint-{step}"):
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()
                renamed_best = self.state.best_model_checkpoint == staged  # recorded under the staging name
                if renamed_best:
                    self.state.best_model_checkpoint = final
                if self.reference_sync is not None:  # TR-DPO: the moving reference, before the manifest
                    self.reference_sync.save(Path(staged))  # every rank (ZeRO-3 gathers), the main one writes
                if self.args.should_save:
                    self._seal(staged, final, renamed_best)
        finally:
            hf_trainer.PREFIX_CHECKPOINT_DIR = original_prefix
            self.args.save_total_limit = original_limit
        if self.args.should_save:
            rotate_checkpoints(Path(run_dir), self.args.save_total_limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _seal(self, staged: str, final: str, renamed_best: bool) -> None:
        """The layout file and the manifest (last) into the staged checkpoint, then the rename (main process)."""
        layout: dict[str, Any] = {"world_size": self.args.world_size}
        layout["data"] = data_facts(self.train_dataset, self.eval_dataset)
        if self._evaluation_cut_short:
            layout["evaluation_pending"] = True
        Path(staged, RUN_LAYOUT_FILE).write_text(json.dumps(layout))
        if renamed_best:
            self.state.save_to_json(os.path.join(staged, hf_trainer.TRAINER_STATE_NAME))
        write_manifest(Path(staged))
        if os.path.exists(final):  # the same step saved again (a resume at it): keep the complete one
            shutil.rmtree(staged)
        else:
            os.replace(staged, final)
