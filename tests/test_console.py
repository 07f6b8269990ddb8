"""The run's console: the compact step, evaluation and summary lines, pairs/s and ETA, the filtered warnings."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest

from silkie.logs import quiet_libraries
from silkie.train import console
from silkie.train.console import ConsoleCallback, eval_line, summary_line, train_line

LOGS = {
    "loss": 0.69201,
    "grad_norm": 0.19,
    "learning_rate": 0.0002857,
    "rewards/accuracies": 0.325,
    "rewards/margins": 0.002347,
    "rewards/chosen": -0.00085,
    "entropy": 6.43,
    "epoch": 0.0185,
}


def test_lines_carry_what_a_user_follows():
    assert train_line(5, 270, LOGS, 4.74, 56.2) == (
        "step 5/270 | loss 0.6920 | acc 0.325 | margin 0.0023 | lr 2.86e-04 | 4.7 pairs/s | ETA 0:56"
    )
    assert train_line(5, 270, {"loss": 0.5}, None, 3725) == (
        "step 5/270 | loss 0.5000 | acc n/a | margin n/a | lr n/a | ETA 1:02:05"
    )
    assert train_line(5, 270, LOGS | {"aux_loss": 2.0312}, None, None) == (  # a MoE model's balancing loss
        "step 5/270 | loss 0.6920 | acc 0.325 | margin 0.0023 | aux 2.031 | lr 2.86e-04"
    )
    evaluation = {"eval_loss": 0.68, "eval_rewards/accuracies": 0.72, "eval_rewards/margins": 0.102}
    evaluation |= {"eval_rewards/image_gain": 0.25, "eval_runtime": 3.1, "eval_samples_per_second": 77.42}
    assert eval_line(50, evaluation) == (
        "eval at step 50 | loss 0.6800 | acc 0.720 | margin 0.1020 | image gain 0.250 | 240 pairs in 3.1 s"
    )
    summary = {"train_runtime": 62.4, "train_loss": 0.61, "train_samples_per_second": 34.53, "total_flos": 1.0}
    assert summary_line(270, summary) == "trained 270 steps in 1:02 | train loss 0.6100 | 34.5 pairs/s"
    assert summary_line(270, summary, 95, 0.66, 52.04) == (
        "trained steps 96-270 in 1:02 (resumed at step 95) | train loss 0.6600 (whole run) | 52.0 pairs/s training, "
        "34.5 with evaluations and saves"
    )


def test_a_resumed_launch_reports_the_whole_runs_loss():
    from silkie.train.metrics import run_train_loss

    history = [  # restored from the checkpoint at step 6 (logged every 2 steps, then a step 5 resume's records)
        {"step": 2, "loss": 0.7},
        {"step": 4, "loss": 0.6},
        {"step": 5, "loss": 0.5},
        {"step": 6, "eval_loss": 0.1},
        {"step": 8, "loss": 0.9},  # this launch's own record: in its mean already
        {"step": 10, "train_runtime": 9.0, "train_loss": 0.4},
    ]
    # steps 1-5 from the records (2 x 0.7 + 2 x 0.6 + 1 x 0.5), step 6 unlogged, steps 7-10 at this launch's 0.4
    assert run_train_loss(history, 6, 0.4, 10) == pytest.approx((1.4 + 1.2 + 0.5 + 4 * 0.4) / 9)
    assert run_train_loss(history, 0, 0.4, 10) == 0.4  # a fresh run: the Trainer's own mean
    assert run_train_loss(history, 6, None, 10) is None


def test_callback_writes_one_line_per_record_with_measured_pairs_per_second(monkeypatch, capsys):
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=2, world_size=2)
    state = SimpleNamespace(is_world_process_zero=True, global_step=10, max_steps=100)
    callback = ConsoleCallback(terminal=False)
    callback.on_train_begin(args, state, None)  # resumed at step 10
    state.global_step = 15
    callback.on_log(args, state, None, logs=LOGS)  # 5 steps x 8 pairs in 10 s; 85 steps left at 2 s each
    state.global_step = 20
    callback.on_log(args, state, None, logs=LOGS)  # 5 steps x 8 pairs in 20 s; 80 steps at 3 s each
    callback.on_log(args, state, None, logs={"eval_loss": 0.7, "epoch": 1.0})
    other_rank = SimpleNamespace(is_world_process_zero=False, global_step=20, max_steps=100)
    callback.on_log(args, other_rank, None, logs=LOGS)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[silkie] step 15/100 | loss 0.6920 | acc 0.325 | margin 0.0023 | lr 2.86e-04 | 4.0 pairs/s | ETA 2:50",
        "[silkie] step 20/100 | loss 0.6920 | acc 0.325 | margin 0.0023 | lr 2.86e-04 | 2.0 pairs/s | ETA 4:00",
        "[silkie] eval at step 20 | loss 0.7000 | acc n/a | margin n/a",
    ]
    assert callback.bar is None  # no progress bar off a terminal


def test_pairs_per_second_leave_out_evaluations_and_saves_but_the_eta_does_not(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=20)
    callback = ConsoleCallback(terminal=False)
    callback.on_train_begin(args, state, None)
    for step in range(1, 11):  # 1 s per step; after step 5 an evaluation (6 s) and a save (2 s)
        now[0] += 1.0
        state.global_step = step
        callback.on_step_end(args, state, None)
        if step % 5 == 0:
            callback.on_log(args, state, None, logs=LOGS)
        if step == 5:
            now[0] += 6.0
            callback.on_evaluate(args, state, None)
            now[0] += 2.0
            callback.on_save(args, state, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| 4.0 pairs/s | ETA 0:15")
    # 5 steps x 4 pairs in 5 s of training (13 s of wall time); 10 steps took 18 s, so 10 more take 18 s
    assert lines[1].endswith("| 4.0 pairs/s | ETA 0:18")


def test_known_harmless_warnings_are_filtered(capsys):
    deepspeed_logger = logging.getLogger("DeepSpeed")
    before = list(deepspeed_logger.filters)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_libraries(terminal=True)
            for message in ("`is_gradient_checkpointing` is deprecated, use ...", "another deprecation"):
                warnings.warn(message, FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["another deprecation"]
        records = [
            logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, text, (), None)
            for text in ("Setting accelerator to CPU. If you have GPU ...", "ZeRO stage 3 warning")
        ]
        assert [deepspeed_logger.filter(r) for r in records] == [False, True]
        accelerate_logger = logging.getLogger("accelerate.accelerator")
        records = [
            logging.LogRecord("accelerate.accelerator", logging.WARNING, __file__, 1, text, (), None)
            for text in (
                "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 16. ...",
                "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 4, DeepSpeed config has 16. ...",
            )
        ]
        assert [accelerate_logger.filter(r) for r in records] == [False, True]  # only the Trainer's deliberate 1
    finally:
        deepspeed_logger.filters[:] = before


def test_tools_off_a_terminal_show_no_progress_bars(monkeypatch):
    import os

    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from silkie.tools import cli

    monkeypatch.setattr(cli, "on_terminal", lambda: False)
    try:
        hf_logging.enable_progress_bar()
        seen = []
        assert cli.run_cli(lambda: seen.append(hf_logging.is_progress_bar_enabled()) or 0) == 0
        assert seen == [False] and hub_utils.are_progress_bars_disabled()
        assert not datasets.is_progress_bar_enabled()
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # a process a tool starts keeps its own bars
    finally:
        hub_utils.enable_progress_bars()
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()


def test_the_settings_line_shows_the_defaults_the_recipe_left_out(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, lr_scheduler_type="cosine", warmup_steps=0.1)  # fmt: skip
    assert console.settings_line(args, 0.1, "sigmoid") == (
        "training: lr 5.00e-05 (cosine, warmup 0.1) | 4 pairs/device x 2 accumulation x 1 process = 8 pairs/step | "
        "3 epochs | adamw_torch_fused, weight decay 0, grad norm 1 | fp32 | dpo: sigmoid, beta 0.1"
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=270)
    assert " | 270 steps | " in console.settings_line(args, 0.2, ["sigmoid", "sft"])
    assert console.settings_line(args, 0.2, ["sigmoid", "sft"]).endswith("dpo: sigmoid+sft, beta 0.2")


def test_the_package_s_own_warnings_are_console_lines():
    """A pair dropped for a broken picture printed Python's two lines, pointing into torch's DataLoader code."""
    import subprocess
    import sys

    from silkie.data.collator import DroppedPairWarning
    from silkie.logs import say_own_warnings

    dropped = "dropping pair 'n22' (kept in the batch with weight 0): corrupt"
    code = (  # outside pytest, whose recorder is on during a test
        "import warnings\nfrom silkie.data.collator import DroppedPairWarning\nfrom silkie.logs import "
        "say_own_warnings\nsay_own_warnings()\nsay_own_warnings()\n"
        f"warnings.warn({dropped!r}, DroppedPairWarning)\nwarnings.warn(\"a library's own\", UserWarning)\n"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout == f"[silkie] warning: {dropped}\n"  # once, though installed twice
    assert "UserWarning: a library's own" in shown.stderr and dropped not in shown.stderr
    with warnings.catch_warnings(record=True) as recorded:  # as pytest.warns records: the hook stands aside
        warnings.simplefilter("always")
        say_own_warnings()
        warnings.warn(dropped, DroppedPairWarning, stacklevel=1)
        warnings.warn("a library's own", UserWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in recorded] == [(DroppedPairWarning, dropped),
                                                                 (UserWarning, "a library's own")]  # fmt: skip
