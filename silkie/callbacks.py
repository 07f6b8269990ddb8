"""Trainer callbacks: metrics as JSON lines, and checkpoint-then-stop on a preemption signal."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log record (train and eval) to `path` as one JSON object per line (main process only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class PreemptionCallback(TrainerCallback):
    """On SIGUSR1/SIGTERM (Slurm's warning before preemption or the time limit) save a checkpoint and stop.

    The handler only sets a flag; at the end of the current optimizer step every rank agrees
    (all-reduce) and the Trainer saves `checkpoint-N` and leaves the loop cleanly.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.requested = False
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.received = signum

    def _agreed(self, args: TrainingArguments) -> bool:
        flag = torch.tensor(1.0 if self.requested else 0.0, device=args.device if args.device.type != "cpu" else "cpu")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._agreed(args):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
        return control
