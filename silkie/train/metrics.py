"""Metrics as JSON lines: every log record of the Trainer (train and eval), one object per line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def append_jsonl(path: Path, record: dict) -> None:
    """Append `record` as one JSON line (after a line break first where a killed run left a half-written line)."""
    with path.open("a+b") as handle:
        torn = False
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        handle.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log record (train and eval) to `path` as one JSON object per line (main process only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs})


def run_train_loss(log_history: list[dict], start_step: int, launch_loss: float | None, end_step: int) -> float | None:
    """The whole run's mean training loss when this launch resumed at `start_step`: the losses logged before it
    (each the mean of the steps since the log before) joined with this launch's mean over its `end_step -
    start_step` steps (the Trainer's `train_loss` covers this launch only). A fresh run: `launch_loss` itself."""
    if launch_loss is None or start_step <= 0:
        return launch_loss
    total, steps, previous = 0.0, 0, 0
    for record in log_history:
        step = record.get("step", 0)
        if "loss" in record and "train_runtime" not in record and previous < step <= start_step:
            total += record["loss"] * (step - previous)
            steps += step - previous
            previous = step
    launch_steps = end_step - start_step
    if steps + launch_steps <= 0:
        return launch_loss
    return (total + launch_loss * launch_steps) / (steps + launch_steps)
