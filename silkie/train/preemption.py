"""Checkpoint-then-stop on a preemption signal or Ctrl-C, and the all-rank flag it agrees on."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True when `flag` is set on any rank (every rank must call it: an all-reduce)."""
    value = torch.as_tensor(flag, dtype=torch.float32).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class PreemptionCallback(TrainerCallback):
    """On SIGUSR1/SIGTERM (Slurm's warning before preemption or the time limit) save a checkpoint and stop; on
    SIGINT (Ctrl-C, forwarded by torchrun) the same once training has begun, else stop at once.

    The handler only sets a flag; at the end of the current optimizer step every rank agrees
    (all-reduce) and the Trainer saves `checkpoint-N` and leaves the loop cleanly. A second SIGINT or SIGTERM
    stops at once (SIGINT: `KeyboardInterrupt`).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM), interrupt: bool = True):
        self.requested = False  # this process got a signal
        self.stopped = False  # every rank agreed to stop after a step (the same on all ranks)
        self.received: int | None = None
        self.training = False  # inside Trainer.train's loop: there is work a checkpoint keeps
        for sig in signals:
            signal.signal(sig, self._handle)
        if interrupt:
            signal.signal(signal.SIGINT, self._interrupt)

    def _interrupt(self, signum, frame) -> None:
        if self.requested or not self.training:  # before training (loading data or the model), or again
            raise KeyboardInterrupt
        self.requested = True
        self.received = signum

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, Ctrl-C stops at once: a long pass within training that no checkpoint keeps (the reference
        precompute), which would otherwise run to its end before the step could be saved."""
        if self.requested and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        training, self.training = self.training, False
        try:
            yield
        finally:
            self.training = training

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.training = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.training = False

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGTERM:  # a second SIGTERM: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.received = signum

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if any_rank(self.requested, args.device):
            self.requested = self.stopped = True
            control.should_save = True
            control.should_evaluate = False  # save first (an evaluation could outlast the shutdown grace)
            control.should_training_stop = True
        return control
