"""Interrupted and resumed training: kill and resume, half-written checkpoints, epochs, last step, extended runs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from silkie.run_dir import verify_checkpoint
from silkie.train import latest_checkpoint, remove_staging

from .train_fixtures import (
    FAST,
    asset_overrides,
    read_metrics,
    run_in_process,
    run_subprocess,
    subprocess_env,
    train_command,
)


def test_kill_and_resume_continues_same_run(assets, tmp_path):
    overrides = (
        asset_overrides(assets) + FAST + ["training.max_steps=12", "training.save_steps=4", "data.max_prompts=80"]
    )
    straight = run_subprocess(tmp_path / "straight", overrides)
    assert straight.returncode == 0, straight.stderr[-2000:]

    working = tmp_path / "killed"
    proc = subprocess.Popen(
        train_command(working, overrides), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while latest_checkpoint(working) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = latest_checkpoint(working)
    assert first is not None and not (working / "FINISHED").exists()
    resumed = run_subprocess(working, overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {first.name}" in resumed.stdout
    state = json.loads((working / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    layout = json.loads((working / "checkpoint-12" / "silkie_run.json").read_text())
    assert layout["world_size"] == 1 and layout["data"]["train_pairs"] > 0 and layout["data"]["eval"] is None
    losses_straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r}
    losses_resumed = {r["step"]: r["loss"] for r in read_metrics(working) if "loss" in r}
    resume_step = int(first.name.split("-")[1])
    for step in range(resume_step + 1, 13):  # same data order, optimizer and scheduler state after the resume
        assert losses_resumed[step] == pytest.approx(losses_straight[step], abs=1e-4), step


def test_half_written_checkpoints_are_ignored_and_removed(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "tmp-checkpoint-8").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert [p.name for p in remove_staging(tmp_path)] == ["tmp-checkpoint-8"]
    assert not (tmp_path / "tmp-checkpoint-8").exists()


def test_group_by_length_resume_in_a_later_epoch_on_two_ranks(assets, tmp_path):
    """On a resume the length sampler sits deeper than the Trainer's set_epoch reaches: without the trainer's own
    set_epoch, two ranks resumed in epoch 1 replayed epoch 0's order (the losses after the resume differed)."""
    import shutil

    overrides = (
        asset_overrides(assets)
        + FAST
        + [
            "data.max_prompts=6",
            "training.group_by_length=true",
            "training.per_device_train_batch_size=4",
            "training.max_steps=10",
            "training.save_steps=7",
        ]
    )
    command = [train_command(tmp_path, overrides)[0], "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2"]  # fmt: skip
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}

    def train(working: Path) -> None:
        done = subprocess.run(command + train_command(working, overrides)[1:], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    straight = tmp_path / "straight"
    train(straight)
    state = json.loads((straight / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["epoch"] > 1.0, state["epoch"]  # the resume point lies in the second epoch
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("checkpoint-10", "adapter", "FINISHED"))
    train(resumed)
    first = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}  # later lines win: the resume
    for step in (8, 9, 10):
        assert again[step] == pytest.approx(first[step], abs=1e-5), (step, first, again)


def test_a_checkpoint_is_not_resumed_with_another_number_of_processes(tmp_path):
    from silkie.train.trainer import ResumeError, check_resume_layout

    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    check_resume_layout(checkpoint, 16)  # written before the layout file existed: nothing to compare
    (checkpoint / "silkie_run.json").write_text(json.dumps({"world_size": 8}))
    check_resume_layout(checkpoint, 8)
    with pytest.raises(ResumeError, match=r"checkpoint-40 was saved by a run of 8 processes and this launch has 16"):
        check_resume_layout(checkpoint, 16)


def test_resume_at_the_last_step_finishes_without_another_step_or_evaluation(assets, tmp_path):
    """A crash after the last checkpoint (before FINISHED): the rerun trains no step 9 and reuses the evaluation
    at step 8; the best checkpoint (reduce_lr_on_plateau tracks one) is recorded under its final name."""
    working = tmp_path / "run"
    overrides = asset_overrides(assets) + [
        "data.max_prompts=24",
        "data.eval_fraction=0.25",
        "training.max_steps=8",
        "training.save_steps=4",
        "training.eval_steps=4",
        "training.save_total_limit=2",
        "training.lr_scheduler_type=reduce_lr_on_plateau",
        "training.logging_steps=1",
        "training.report_to=none",
    ]
    first = run_in_process(working, overrides)
    state = json.loads((working / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] in (str(working / "checkpoint-4"), str(working / "checkpoint-8"))
    assert [r["step"] for r in read_metrics(working) if "eval_loss" in r] == [4, 8]  # not evaluated twice at 8
    (working / "FINISHED").unlink()
    again = run_in_process(working, overrides)
    assert again["step"] == first["step"] == 8 and json.loads((working / "FINISHED").read_text())["step"] == 8
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert not (working / "checkpoint-9").exists()


def test_a_signal_during_the_last_save_still_finishes_the_run(assets, tmp_path, monkeypatch):
    """Slurm's warning can land after the last step: every step is done, so the run finishes (adapter, FINISHED)
    instead of stopping as preempted (on several ranks, only the signalled one would have gone to teardown)."""
    import signal as signals

    from silkie.train.trainer import SilkieDPOTrainer

    original = SilkieDPOTrainer._save_checkpoint

    def save_then_signal(self, model, trial):
        original(self, model, trial)
        if self.state.global_step == self.state.max_steps:
            signals.raise_signal(signals.SIGUSR1)

    monkeypatch.setattr(SilkieDPOTrainer, "_save_checkpoint", save_then_signal)
    working = tmp_path / "run"
    result = run_in_process(working, asset_overrides(assets) + FAST + ["training.max_steps=3", "data.max_prompts=8"])
    assert result["step"] == 3 and "preempted" not in result
    assert (working / "FINISHED").is_file() and (working / "adapter" / "adapter_model.safetensors").is_file()


def test_an_extended_run_trains_its_first_new_step_on_the_new_schedule(assets, tmp_path):
    """Finished at step 3 of a cosine schedule (learning rate 0), then extended to 5 steps (what --force does when
    only max_steps changed): step 4 must use the new schedule's rate; the optimizer state held the old schedule's 0,
    which left the weights of step 4 unchanged."""
    from safetensors.torch import load_file

    working = tmp_path / "run"
    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=16", "training.save_steps=1"]
    run_in_process(working, overrides + ["training.max_steps=3", "training.save_total_limit=null"])
    for name in ("FINISHED", "config.yaml", "final_metrics.json", "training_curves.png"):  # what --force moves
        (working / name).unlink()
    shutil.rmtree(working / "adapter")
    result = run_in_process(working, overrides + ["training.max_steps=5", "training.save_total_limit=null"])
    before, after = (load_file(working / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (3, 4))
    changed = sum(not torch.equal(before[name], after[name]) for name in before)
    assert changed == len(before)  # every adapter tensor moved at step 4
    # the summary's train loss is the whole run's (steps 1-5, logged every step), not the second launch's (4-5)
    losses = {r["step"]: r["loss"] for r in read_metrics(working) if "loss" in r and "train_runtime" not in r}
    assert sorted(losses) == [1, 2, 3, 4, 5] and result["resumed_at_step"] == 3
    assert result["train_loss"] == pytest.approx(sum(losses.values()) / 5, abs=1e-6)
    assert abs(result["train_loss"] - (losses[4] + losses[5]) / 2) > 1e-4
    assert json.loads((working / "final_metrics.json").read_text())["train_loss"] == result["train_loss"]
    tokens = {r["step"]: r["num_tokens"] for r in read_metrics(working) if "loss" in r and "train_runtime" not in r}
    assert 0 < tokens[1] < tokens[2] < tokens[3] < tokens[4] < tokens[5]  # the resume counts on from step 3


def test_ctrl_c_stops_at_once_before_training_and_after_a_step_once_training_began():
    """SIGINT (Ctrl-C, forwarded by torchrun): while data and model load there is nothing to keep, so it stops at
    once; in the training loop the first one asks for a checkpoint after the step, a second one stops at once."""
    import signal as signals

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from silkie.train.preemption import PreemptionCallback

    handlers = {sig: signals.getsignal(sig) for sig in (signals.SIGINT, signals.SIGTERM, signals.SIGUSR1)}
    try:
        callback = PreemptionCallback()
        with pytest.raises(KeyboardInterrupt):
            signals.raise_signal(signals.SIGINT)
        assert not callback.requested
        args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
        state, control = TrainerState(), TrainerControl()
        callback.on_train_begin(args, state, control)
        signals.raise_signal(signals.SIGINT)
        assert callback.requested and callback.received == signals.SIGINT
        control.should_evaluate = True  # an eval step: the checkpoint comes first, no evaluation
        control = callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and callback.stopped
        assert not control.should_evaluate
        with pytest.raises(KeyboardInterrupt):
            signals.raise_signal(signals.SIGINT)
    finally:
        for sig, handler in handlers.items():
            signals.signal(sig, handler)


def test_ctrl_c_during_the_reference_precompute_stops_at_once(assets, tmp_path, monkeypatch):
    """The precompute pass runs inside the first step and no checkpoint keeps it: Ctrl-C there stops at once
    instead of finishing the pass (longer than torchrun's shutdown grace on real data)."""
    import signal as signals

    import silkie.train.reference as reference

    original, calls = reference.compute_reference_table, []

    def interrupted_pass(*args, **kwargs):
        calls.append(1)
        signals.raise_signal(signals.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "compute_reference_table", interrupted_pass)
    handlers = {sig: signals.getsignal(sig) for sig in (signals.SIGINT, signals.SIGTERM, signals.SIGUSR1)}
    working = tmp_path / "run"
    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=8", "training.max_steps=3"]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_in_process(working, overrides + ["dpo.precompute_ref_log_probs=true"])
    finally:
        for sig, handler in handlers.items():
            signals.signal(sig, handler)
    assert calls == [1] and latest_checkpoint(working) is None and not (working / "reference_logps").exists()


def test_ctrl_c_during_a_mid_run_evaluation_saves_that_step_at_once(assets, tmp_path, monkeypatch, capsys):
    """The evaluation at step 2 is cut short at its next batch and checkpoint-2 is saved, instead of finishing the
    evaluation (minutes on the paper's held-out set) and training one more step before saving."""
    import signal as signals

    from silkie.train.trainer import SilkieDPOTrainer

    original, seen = SilkieDPOTrainer.prediction_step, []

    def signal_in_first_eval(self, *args, **kwargs):
        seen.append(self.state.global_step)
        if len(seen) == 1:
            signals.raise_signal(signals.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SilkieDPOTrainer, "prediction_step", signal_in_first_eval)
    handlers = {sig: signals.getsignal(sig) for sig in (signals.SIGINT, signals.SIGTERM, signals.SIGUSR1)}
    working = tmp_path / "run"
    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=24", "training.max_steps=6"]
    overrides += ["data.eval_fraction=0.3", "training.eval_strategy=steps", "training.eval_steps=2"]
    try:
        result = run_in_process(working, overrides + ["training.save_steps=100", "training.save_strategy=best"])
    finally:
        for sig, handler in handlers.items():
            signals.signal(sig, handler)
    assert result == {"preempted": True, "step": 2}
    assert seen == [2, 2]  # the batch that saw the signal and the next one, which ended the evaluation
    assert latest_checkpoint(working) == working / "checkpoint-2"
    records = read_metrics(working)
    assert not any("eval_loss" in record for record in records)
    assert max(record["step"] for record in records) == 2
    assert "stop signal during evaluation: saving this step's checkpoint" in capsys.readouterr().out
    layout = json.loads((working / "checkpoint-2" / "silkie_run.json").read_text())
    assert (layout["world_size"], layout["evaluation_pending"]) == (1, True) and set(layout) == {
        "world_size", "evaluation_pending", "data"}  # fmt: skip
    # the resume runs the cut-short evaluation of step 2 first, then trains on (its metrics are not missing)
    resumed = run_in_process(working, overrides + ["training.save_steps=100", "training.save_strategy=best"])
    assert resumed["step"] == 6
    assert [r["step"] for r in read_metrics(working) if "eval_loss" in r] == [2, 4, 6]
    assert "running step 2's evaluation, which a stop signal cut short" in capsys.readouterr().out
    # done: checkpoint-2 no longer asks for it, and its manifest follows the rewritten layout file
    assert json.loads((working / "checkpoint-2" / "silkie_run.json").read_text())["evaluation_pending"] is False
    assert verify_checkpoint(working / "checkpoint-2") is None


def test_a_checkpoint_is_not_resumed_on_other_data(assets, tmp_path):
    """Rows removed from the data file between launches: the split and the order would shift under the run."""
    from silkie.train.trainer import ResumeError

    working = tmp_path / "run"
    overrides = asset_overrides(assets) + FAST + ["training.save_steps=1", "training.save_total_limit=null"]
    run_in_process(working, overrides + ["data.max_prompts=16", "training.max_steps=2"])
    layout = json.loads((working / "checkpoint-2" / "silkie_run.json").read_text())
    assert layout["data"]["train_pairs"] > 0 and len(layout["data"]["train"]) >= 16  # a fingerprint
    for name in ("FINISHED", "config.yaml", "final_metrics.json", "training_curves.png"):  # what --force moves
        (working / name).unlink()
    shutil.rmtree(working / "adapter")
    with pytest.raises(ResumeError, match=r"checkpoint-2 was trained on other data \(\d+ training and \d+ held-out"):
        run_in_process(working, overrides + ["data.max_prompts=12", "training.max_steps=4"])
    result = run_in_process(working, overrides + ["data.max_prompts=16", "training.max_steps=4"])  # the same data
    assert result["resumed_at_step"] == 2
