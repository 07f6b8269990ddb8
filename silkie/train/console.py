"""The run's console: one compact line per logging step (step, loss, reward accuracy, margin, lr, pairs/s, ETA),
one line per evaluation, one line for the train summary; a single training progress bar on a terminal and plain
lines only when stdout is not one (a log file, Slurm); the library noise is filtered by `silkie.logs.quiet_libraries`,
which `build_trainer` calls."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from silkie.logs import get_logger, on_terminal

from .metrics import run_train_loss

logger = get_logger(__name__)
HF_CONSOLE_CALLBACKS = (ProgressCallback, PrinterCallback)  # replaced by ConsoleCallback: they print the raw dict


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def train_line(step: int, max_steps: int, logs: dict, pairs_per_s: float | None, eta_s: float | None) -> str:
    """`step 5/270 | loss 0.6920 | acc 0.325 | margin 0.0023 | lr 2.86e-04 | 4.7 pairs/s | ETA 0:56` (+ a MoE
    model's `aux 2.031`, its routers' load-balancing loss, after the margin)."""
    parts = [f"step {step}/{max_steps}", f"loss {_number(logs.get('loss'), '.4f')}"]
    parts.append(f"acc {_number(logs.get('rewards/accuracies'), '.3f')}")
    parts.append(f"margin {_number(logs.get('rewards/margins'), '.4f')}")
    if "aux_loss" in logs:
        parts.append(f"aux {_number(logs['aux_loss'], '.3f')}")
    parts.append(f"lr {_number(logs.get('learning_rate'), '.2e')}")
    if pairs_per_s is not None:
        parts.append(f"{pairs_per_s:.1f} pairs/s")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def eval_line(step: int, logs: dict) -> str:
    """`eval at step 50 | loss 0.6801 | acc 0.720 | margin 0.1020 | 240 pairs in 3.1 s` (+ image gain, if scored)."""
    parts = [f"eval at step {step}", f"loss {_number(logs.get('eval_loss'), '.4f')}"]
    parts.append(f"acc {_number(logs.get('eval_rewards/accuracies'), '.3f')}")
    parts.append(f"margin {_number(logs.get('eval_rewards/margins'), '.4f')}")
    gain = next((v for k, v in logs.items() if k.startswith("eval_") and k.endswith("image_gain")), None)
    if gain is not None:
        parts.append(f"image gain {_number(gain, '.3f')}")
    runtime, rate = logs.get("eval_runtime"), logs.get("eval_samples_per_second")
    if isinstance(runtime, (int, float)) and isinstance(rate, (int, float)):
        parts.append(f"{round(runtime * rate)} pairs in {runtime:.1f} s")
    return " | ".join(parts)


def settings_line(args: TrainingArguments, beta: float, loss_type: Any) -> str:
    """The run's effective optimisation settings, defaults included (the recipe's `training:` holds only what it
    sets): `training: lr 5.00e-05 (cosine, warmup 0.05) | 8 pairs/device x 2 accumulation x 4 processes = 64
    pairs/step | 3 epochs | adamw_torch_fused, weight decay 0, grad norm 1 | bf16 | dpo: sigmoid, beta 0.1`."""
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    optimizer = getattr(args.optim, "value", args.optim)
    epochs = args.num_train_epochs
    length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{epochs:g} epoch{'s' if epochs != 1 else ''}"
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    losses = loss_type if isinstance(loss_type, str) else "+".join(loss_type)
    return " | ".join([
        f"training: lr {args.learning_rate:.2e} ({scheduler}, warmup {args.warmup_steps:g})",
        f"{args.per_device_train_batch_size} pairs/device x {args.gradient_accumulation_steps} accumulation x "
        f"{args.world_size} process{'es' if args.world_size != 1 else ''} = {_pairs_per_step(args)} pairs/step",
        length,
        f"{optimizer}, weight decay {args.weight_decay:g}, grad norm {args.max_grad_norm:g}",
        precision,
        f"dpo: {losses}, beta {beta:g}",
    ])  # fmt: skip


def summary_line(
    step: int, logs: dict, start_step: int = 0, run_loss: float | None = None, training_rate: float | None = None
) -> str:
    """`trained 270 steps in 1:02 | train loss 0.6100 | 52.0 pairs/s training, 34.5 with evaluations and saves`;
    a resumed launch names its steps and gives the whole run's loss (`run_loss`; else the Trainer's, of this
    launch)."""
    took = _duration(logs.get("train_runtime", 0))
    loss = logs.get("train_loss") if run_loss is None else run_loss
    overall = _number(logs.get("train_samples_per_second"), ".1f")
    if start_step > 0:
        parts = [f"trained steps {start_step + 1}-{step} in {took} (resumed at step {start_step})"]
        parts.append(f"train loss {_number(loss, '.4f')}" + (" (whole run)" if run_loss is not None else ""))
    else:
        parts = [f"trained {step} steps in {took}", f"train loss {_number(loss, '.4f')}"]
    if training_rate is None:
        parts.append(f"{overall} pairs/s")
    else:
        parts.append(f"{training_rate:.1f} pairs/s training, {overall} with evaluations and saves")
    if logs.get("pairs_left_out"):
        parts.append(f"{logs['pairs_left_out']} pairs left out (a picture or video failed to load)")
    return " | ".join(parts)


def _pairs_per_step(args: TrainingArguments) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


class ConsoleCallback(TrainerCallback):
    """Writes the lines above on rank 0 (`[silkie] ...` on stdout); on a terminal also one progress bar of the
    training steps (stderr), cleared around each line."""

    def __init__(self, terminal: bool | None = None):
        self.terminal = on_terminal() if terminal is None else terminal
        self.bar: Any = None
        self.start = self.last_time = 0.0
        self.start_step = self.last_step = 0
        self.step_end = 0.0  # when the last step ended (an evaluation or a save runs after it)
        self.paused = 0.0  # seconds of evaluation and saving since the last train line: not training throughput
        self.paused_total = 0.0  # the same since the launch began (for the summary's training pairs/s)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        self.start = self.last_time = self.step_end = time.monotonic()
        self.start_step = self.last_step = state.global_step
        if self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.step_end = time.monotonic()
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._pause_ends()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._pause_ends()

    def _pause_ends(self) -> None:
        """An evaluation or a save (they run after a step's end) just ended: its time is not training time."""
        now = time.monotonic()
        self.paused += now - self.step_end
        self.paused_total += now - self.step_end
        self.step_end = now

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:
            self._write(self._summary_line(args, state, logs))
        elif "eval_loss" in logs:
            self._write(eval_line(state.global_step, logs))
        elif "loss" in logs:
            self._write(self._train_line(args, state, logs))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _train_line(self, args: TrainingArguments, state: TrainerState, logs: dict) -> str:
        now, step = time.monotonic(), state.global_step
        pairs_per_step = _pairs_per_step(args)
        training = now - self.last_time - self.paused  # pairs/s of training alone; the ETA includes evaluations
        rate = (step - self.last_step) * pairs_per_step / training if training > 0 else None
        done = step - self.start_step
        eta = (state.max_steps - step) * (now - self.start) / done if done > 0 else None
        self.last_time, self.last_step, self.paused = now, step, 0.0
        return train_line(step, state.max_steps, logs, rate if step > self.start_step else None, eta)

    def _summary_line(self, args: TrainingArguments, state: TrainerState, logs: dict) -> str:
        step, start = state.global_step, self.start_step
        training = time.monotonic() - self.start - self.paused_total
        pairs = (step - start) * _pairs_per_step(args)
        rate = pairs / training if training > 0 and step > start else None
        run_loss = run_train_loss(state.log_history, start, logs.get("train_loss"), step)
        return summary_line(step, logs, start, run_loss, rate)

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        logger.info(line)
        if self.bar is not None:
            self.bar.refresh()


class CompileWatchCallback(TrainerCallback):
    """With compiled decoder blocks (`model.compile_blocks`): a warning the first time dynamo gives up on them at
    its recompile limit (from then on they run eager, which it does not report), and the number of graphs
    compiled at the end of training."""

    def __init__(self):
        from silkie.models.kernels import CompileWatch

        self.watch = CompileWatch()
        self.warned = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._check()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._check()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._check()
        if state.is_world_process_zero:
            logger.info(f"torch.compile: {self.watch.graphs()} graphs compiled")

    def _check(self) -> None:
        if not self.warned and self.watch.gave_up():
            import torch._dynamo

            self.warned = True
            limit = torch._dynamo.config.recompile_limit
            logger.warning(
                f"the compiled decoder blocks reached torch._dynamo's recompile limit ({limit}): they run eager "
                "from here; TORCH_LOGS=recompiles shows each variant"
            )
