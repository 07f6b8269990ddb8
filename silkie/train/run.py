"""One training process: recipe -> data -> model (+LoRA) -> DPO trainer -> adapter, metrics, plot.

Normally started by `launch_dpo.py` under torchrun; works as a single process too.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch.distributed as dist

from silkie.config import Recipe
from silkie.models.family import get_family
from silkie.run_dir import (
    ADAPTER_DIR,
    FINAL_METRICS_NAME,
    FINISHED_NAME,
    METRICS_NAME,
    TENSORBOARD_DIR,
    checkpoint_step,
    latest_checkpoint,
    remove_staging,
    resumable_checkpoint,
)

from .build import build_trainer, say
from .guards import disk_space_guard
from .metrics import run_train_loss

__all__ = ["latest_checkpoint", "remove_staging", "run_training"]
EXIT_PREEMPTED = 0


def run_training(recipe: Recipe, working: str | Path) -> dict:
    """Train as the recipe says in `working`; resume from its latest intact checkpoint; return final facts."""
    from .checkpointing import check_resume_data, data_facts
    from .plots import plot_metrics
    from .trainer import check_resume_layout

    built = build_trainer(recipe, working)
    trainer, working, preemption, args = built.trainer, built.working, built.preemption, built.trainer.args
    resume = _agreed_resume_checkpoint(working, args.process_index)
    try:
        if resume is not None:
            check_resume_layout(resume, args.world_size)
            check_resume_data(resume, data_facts(built.data.train, built.data.eval))
            say(f"resuming from {resume.name}")
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        # decided from state every rank shares: a signal after the last step (final evaluation or save) on one
        # rank only must not send that rank into teardown while the others finish
        if preemption.stopped and trainer.state.global_step < trainer.state.max_steps:
            name = signal.Signals(preemption.received).name
            say(f"stopped on {name}: checkpoint saved at step {trainer.state.global_step}")
            result = {"preempted": True, "step": trainer.state.global_step}
        else:
            start = checkpoint_step(resume) if resume is not None else 0
            result = _finish(trainer, built, recipe.model.path, plot_metrics, output.metrics, start)
    except BaseException:
        _teardown(trainer, synchronize=False)  # the other ranks may be inside a collective: no barrier
        raise
    _teardown(trainer, synchronize=True)
    return result


def _agreed_resume_checkpoint(working: Path, rank: int) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 checks it (and moves a bad one aside), the others take
    rank 0's choice, so that no rank resumes from a step the others do not."""
    chosen = resumable_checkpoint(working, say) if rank == 0 else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [str(chosen) if chosen is not None else None]
        dist.broadcast_object_list(shared, src=0)
        chosen = Path(shared[0]) if shared[0] is not None else None
    return chosen


def _finish(trainer, built, model_path: str, plot_metrics, train_metrics: dict, start_step: int) -> dict:
    """Adapter, tokenizer, model card, final metrics, plot and FINISHED; the closing lines."""
    from .model_card import finish_adapter

    tokenizer, working, recipe = built.codec, built.working, built.recipe
    has_eval = built.data.eval is not None
    pairs = (len(built.data.train), len(built.data.eval) if has_eval else 0)
    adapter_dir = working / ADAPTER_DIR
    with disk_space_guard(adapter_dir, working, "the adapter"):
        trainer.save_model(str(adapter_dir))
    step = trainer.state.global_step
    metrics: dict = {"step": step, **train_summary(train_metrics, trainer.state.log_history, start_step, step)}
    if has_eval:
        evaluation = _evaluation_at(trainer.state.log_history, trainer.state.global_step) or trainer.evaluate()
        metrics.update({k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and k != "step"})
    if trainer.is_world_process_zero():
        if not recipe.lora.enabled:  # a whole model: written in the release's layout
            with disk_space_guard(adapter_dir, working, "the model"):
                get_family(recipe.model.family).finish_saved_folder(str(adapter_dir))
        tokenizer.save_pretrained(adapter_dir)
        (working / FINAL_METRICS_NAME).write_text(json.dumps(metrics, indent=2))
        finish_adapter(recipe, model_path, working, metrics, pairs)
        plot = plot_metrics(working)
        (working / FINISHED_NAME).write_text(json.dumps({"step": trainer.state.global_step}))
        accuracy = metrics.get("eval_rewards/accuracies")
        say(f"adapter: {adapter_dir}")
        say(f"metrics: {working / METRICS_NAME} (tensorboard: {working / TENSORBOARD_DIR})")
        say(f"plot: {plot}")
        if accuracy is not None:
            say(f"held-out reward accuracy: {accuracy:.3f}")
    return metrics


def train_summary(train_metrics: dict, log_history: list[dict], start_step: int, end_step: int) -> dict:
    """The Trainer's end-of-train numbers under the names final_metrics.json keeps (a pair is one sample):
    `train_loss` over the whole run; runtime, pairs/s and `pairs_left_out` (pairs whose media failed to load) of
    this launch, which resumed at `resumed_at_step` (when it did; evaluations and saves are in its runtime)."""
    names = {"train_runtime": "train_runtime_s", "train_samples_per_second": "pairs_per_s",
             "pairs_left_out": "pairs_left_out"}  # fmt: skip
    summary = {ours: train_metrics[theirs] for theirs, ours in names.items() if theirs in train_metrics}
    loss = run_train_loss(log_history, start_step, train_metrics.get("train_loss"), end_step)
    if loss is not None:
        summary = {"train_loss": loss, **summary}
    if start_step > 0:
        summary["resumed_at_step"] = start_step
    return summary


def _evaluation_at(log_history: list[dict], step: int) -> dict | None:
    """The held-out evaluation the Trainer already ran at `step` (its last one), so the end does not repeat it."""
    latest = next((record for record in reversed(log_history) if "eval_loss" in record), None)
    return latest if latest is not None and latest.get("step") == step else None


def _teardown(trainer, synchronize: bool) -> None:
    """Release the DeepSpeed engine and the process group (a live gloo thread can abort the exit)."""
    engine = getattr(trainer, "model_wrapped", None)
    if trainer.is_deepspeed_enabled and hasattr(engine, "destroy"):
        engine.destroy()
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
