"""Metrics as JSON lines: every log record of the Trainer (train and eval), one object per line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log record (train and eval) to `path` as one JSON object per line (main process only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with self.path.open("a+b") as handle:
            torn = False
            if handle.seek(0, os.SEEK_END) > 0:  # a killed run may have left a half-written line: start a fresh one
                handle.seek(-1, os.SEEK_END)
                torn = handle.read(1) != b"\n"
            handle.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
