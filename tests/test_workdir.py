"""The run folder a launch goes into: resume or refusal, --force backups, the lock, missing inputs, input errors."""

from __future__ import annotations

import importlib.util

import pytest

from silkie.config import load_recipe, save_recipe

from .slurm_cluster import DEMO_RECIPE, REPO_ROOT, asset_overrides, fake_checkpoint, one_line_error, run_launcher


def test_different_recipe_or_other_files_are_refused(tmp_path):
    working = tmp_path / "run"
    working.mkdir()
    save_recipe(load_recipe(DEMO_RECIPE, ["training.max_steps=6"]), working / "config.yaml")
    same = run_launcher(working, "--dry-run", "training.max_steps=6")
    assert same.returncode == 0 and "holds a run of this recipe" in same.stderr
    relaunched = run_launcher(working, "--dry-run", "training.max_steps=6", "slurm.time=02:00:00")
    assert relaunched.returncode == 0 and "new settings: slurm.time" in relaunched.stderr
    # a start that wrote nothing but config.yaml (it stopped on bad input): the new recipe replaces it
    replaced = run_launcher(working, "--dry-run", "training.max_steps=8", "lora.r=8")
    assert replaced.returncode == 0 and "held a recipe that wrote no checkpoint or metrics" in replaced.stderr
    (working / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    differs = run_launcher(working, "--dry-run", "training.max_steps=8", "lora.r=8")
    assert one_line_error(differs) == (
        f"error: {working} holds a different recipe: lora.r (16 -> 8), training.max_steps (6 -> 8); "
        "use another --working, or --force to start over there from step 0 (the old run is moved to a backup folder) "
        "(nothing is deleted)"
    )
    fake_checkpoint(working, 3)  # a checkpoint that verifies
    longer = run_launcher(working, "--dry-run", "training.max_steps=8", "training.logging_steps=2")
    assert one_line_error(longer) == (  # integers stay integers in config.yaml and in the difference
        f"error: {working} holds a different recipe: training.logging_steps (5 -> 2), training.max_steps (6 -> 8); "
        "use another --working, or --force to extend it from checkpoint-3 with the new schedule (nothing is deleted)"
    )
    assert "logging_steps: 5\n" in (working / "config.yaml").read_text()
    forced = run_launcher(working, "--dry-run", "--force", "training.max_steps=8")
    assert forced.returncode == 0 and "--force: a different recipe was there" in forced.stderr
    assert "resumes from checkpoint-3" in forced.stderr  # only the run length changed: the checkpoint fits
    incompatible = run_launcher(working, "--dry-run", "--force", "lora.r=8")
    assert "checkpoint-3" in incompatible.stderr and "starts from step 0" in incompatible.stderr
    assert "moves the old" in incompatible.stderr  # a dry run moves nothing
    assert sorted(p.name for p in working.iterdir()) == ["checkpoint-3", "config.yaml", "metrics.jsonl"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = run_launcher(other, "--dry-run")
    assert "is not empty and holds no config.yaml (found: notes.txt)" in one_line_error(refused)
    assert run_launcher(other, "--dry-run", "--force").returncode == 0


def test_force_moves_old_checkpoints_where_checkpoint_rotation_cannot_delete_them(tmp_path):
    """Backups named checkpoint-N.*.bak were counted (and deleted) by transformers' rotation, with the new run's
    first checkpoint; backup-<stamp>/ is outside what rotation looks at."""
    from transformers.trainer_utils import rotate_checkpoints

    from silkie.launch.workdir import inspect_workdir, prepare_workdir

    working = tmp_path / "run"
    working.mkdir()
    save_recipe(load_recipe(DEMO_RECIPE, ["training.max_steps=300"]), working / "config.yaml")
    for step in (100, 200, 300):
        fake_checkpoint(working, step)
    (working / "metrics.jsonl").write_text('{"loss": 0.5}\n')
    (working / "runs").mkdir()
    plan = inspect_workdir(working, load_recipe(DEMO_RECIPE, ["training.max_steps=300", "lora.r=8"]), force=True)
    assert "starts from step 0" in plan.message
    prepare_workdir(plan, load_recipe(DEMO_RECIPE, ["training.max_steps=300", "lora.r=8"]))
    (backup,) = working.glob("backup-*")
    moved = ["checkpoint-100", "checkpoint-200", "checkpoint-300", "config.yaml", "metrics.jsonl", "runs"]
    assert sorted(p.name for p in backup.iterdir()) == moved
    (working / "checkpoint-100").mkdir()  # the new run's first save, then its rotation with save_total_limit 2
    rotate_checkpoints(str(working), save_total_limit=2, use_mtime=False)
    assert (working / "checkpoint-100").is_dir() and sorted(p.name for p in backup.iterdir()) == moved


def test_a_resume_with_another_process_count_is_refused_before_launch(tmp_path):
    working = tmp_path / "run"
    working.mkdir()
    save_recipe(load_recipe(DEMO_RECIPE, ["training.max_steps=6"]), working / "config.yaml")
    fake_checkpoint(working, 3)
    (working / "checkpoint-3" / "silkie_run.json").write_text('{"world_size": 2}')
    same = run_launcher(working, "--dry-run", "training.max_steps=6", "launch.nproc_per_node=2")
    assert same.returncode == 0 and "resumes from checkpoint-3" in same.stderr
    other = run_launcher(working, "--dry-run", "training.max_steps=6", "launch.nproc_per_node=1")
    assert one_line_error(other).startswith(
        "error: checkpoint-3 was saved by a run of 2 processes and this launch has 1: the global batch"
    )
    assert run_launcher(working, "--dry-run", "--gpus", "4", "training.max_steps=6").returncode == 2
    fresh = run_launcher(working, "--dry-run", "--force", "training.max_steps=6", "lora.r=8", "launch.nproc_per_node=1")
    assert fresh.returncode == 0 and "starts from step 0" in fresh.stderr  # its checkpoints are moved aside


def test_a_second_launch_into_a_folder_being_trained_is_refused(tmp_path):
    """A local launch holds a lock on its folder (torchrun inherits it) while it trains; another launch there,
    even a dry run, is refused instead of resuming from the checkpoints the first one is still writing, and the
    refusal names the process that holds the folder (here a child that inherited the lock, as torchrun does)."""
    import os
    import subprocess
    import sys

    from silkie.launch.local import lock_run_dir

    working = tmp_path / "run"
    working.mkdir()
    save_recipe(load_recipe(DEMO_RECIPE), working / "config.yaml")
    held = lock_run_dir(working)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=(held,))
    os.close(held)
    try:
        refused = run_launcher(working, "--dry-run")
        assert one_line_error(refused) == (
            f"error: another launch is training in {working} (held by PID {holder.pid} ({sys.executable} -c import "
            "time; time.sleep(120))); wait for it to end or stop it (two runs in one folder would write the same "
            "checkpoints)"
        )
    finally:
        holder.kill()
        holder.wait()
    assert run_launcher(working, "--dry-run").returncode == 0


def test_a_model_folder_of_the_wrong_kind_is_refused_before_torchrun(tmp_path):
    """A folder without config.json, or another family's checkpoint, is named in one line by the launcher itself
    (no torchrun start, no tokenized data first); a dry run warns."""
    working, model = tmp_path / "run", tmp_path / "model"
    model.mkdir()
    data = [f"data.path={model}", f"data.images={model}"]
    refused = run_launcher(working, f"model.path={model}", *data)
    assert (
        one_line_error(refused)
        == f"error: model.path: {model} has no config.json (expected a qwen_vl checkpoint folder)"
    )
    assert "torchrun" not in refused.stderr and "exitcode" not in refused.stderr
    (model / "config.json").write_text('{"model_type": "llava"}')  # left out, model.family would be read from it
    refused = run_launcher(working, f"model.path={model}", "model.family=qwen_vl", *data)
    assert one_line_error(refused) == (
        f"error: model.family: {model} holds a 'llava' checkpoint (config.json model_type), not a qwen_vl one; "
        "set model.family=llava"
    )
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    dry = run_launcher(working, "--dry-run", f"model.path={model}", *data)
    assert (
        dry.returncode == 0
        and "'gpt2' checkpoint (config.json model_type), not a qwen_vl one; model.family "
        "takes qwen_vl, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, llava"
        in dry.stderr
    )
    assert not working.exists()


def test_missing_input_paths_refuse_a_local_launch_before_it_starts(tmp_path):
    """A local launch checks the recipe's paths first (a dry run and a Slurm submission warn: a job's nodes may see
    paths this machine does not); a hub-id-like model path is left to the hub unless HF_HUB_OFFLINE is set."""
    working = tmp_path / "run"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen"}')
    paths = [f"model.path={model}", f"data.images={model}"]
    refused = run_launcher(working, "data.path=/no/such/vlfeedback.jsonl", *paths)
    assert one_line_error(refused) == (
        f"error: data.path: /no/such/vlfeedback.jsonl does not exist (expected the vlfeedback data; relative paths "
        f"are from {REPO_ROOT})"
    )
    assert not working.exists()
    dry = run_launcher(working, "--dry-run", "data.path=/no/such/vlfeedback.jsonl", *paths)
    assert dry.returncode == 0 and "[launch] warning: data.path: /no/such/vlfeedback.jsonl does not exist" in dry.stderr
    hub = run_launcher(
        working,
        "--dry-run",
        f"data.path={model}",
        "data.images=null",
        "model.path=Qwen/Qwen-VL-Chat",
        HF_HUB_OFFLINE="0",
    )
    assert hub.returncode == 0 and "Qwen/Qwen-VL-Chat is no local folder and not in the hub cache" in hub.stderr
    offline = run_launcher(
        working,
        "--dry-run",
        f"data.path={model}",
        "model.path=Qwen/Qwen-VL-Chat",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "hub-cache"),
    )
    assert "model.path: Qwen/Qwen-VL-Chat is no local folder, and HF_HUB_OFFLINE is set" in offline.stderr


def test_a_local_path_that_reads_as_a_hub_id_is_missing_before_torchrun(tmp_path, monkeypatch):
    """`checkpoints/Qwen-VL-Chat` (one slash, no such folder) is asked of the hub at once: no such model means
    missing, offline it is missing unless cached; the message says how to write it as a local folder."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from silkie.launch.preflight import missing_inputs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    recipe = load_recipe(DEMO_RECIPE, ["model.path=checkpoints/Qwen-VL-Chat", f"data.path={data}", "data.images=null"])
    asked = []

    class NotFound(RepositoryNotFoundError):  # what the hub's 404 raises, without an HTTP response
        def __init__(self):
            Exception.__init__(self, "404")

    def not_on_the_hub(self, repo_id, timeout=None):
        asked.append(repo_id)
        raise NotFound()

    monkeypatch.setattr(HfApi, "model_info", not_on_the_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert missing_inputs(recipe) == [
        "model.path: checkpoints/Qwen-VL-Chat is neither a local folder nor a model on the hub (for a local folder "
        f"write ./checkpoints/Qwen-VL-Chat) (expected a checkpoint folder or a hub id; relative paths are from "
        f"{tmp_path})"
    ]
    assert asked == ["checkpoints/Qwen-VL-Chat"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        "HF_HUB_OFFLINE is set with no cached copy of that hub id (for a local folder write ./checkpoints"
        in (missing_inputs(recipe)[0])
    )
    local = load_recipe(DEMO_RECIPE, ["model.path=./checkpoints/Qwen-VL-Chat", f"data.path={data}", "data.images=null"])
    assert missing_inputs(local)[0].startswith("model.path: ./checkpoints/Qwen-VL-Chat does not exist (expected")
    assert asked == ["checkpoints/Qwen-VL-Chat"]  # offline and ./ paths never ask the hub
    (tmp_path / "checkpoints" / "Qwen-VL-Chat").mkdir(parents=True)
    (tmp_path / "checkpoints" / "Qwen-VL-Chat" / "config.json").write_text('{"model_type": "qwen"}')
    assert missing_inputs(local) == []
    files = load_recipe(DEMO_RECIPE, [f"model.path={data}", f"data.path={data}", f"data.images={data}"])
    assert missing_inputs(files) == [  # files where folders go ("does not exist" once the worker looked)
        f"model.path: {data} is a file (expected a checkpoint folder or a hub id)",
        f"data.images: {data} is a file (expected the images zip or folder)",
    ]


def test_a_filesystem_without_flock_launches_with_a_warning(tmp_path, monkeypatch, capsys):
    """NFS without write access to the folder descriptor or Lustre without -o flock: no lock, a warning, no crash."""
    import errno
    import fcntl

    from silkie.launch import cli

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    working = tmp_path / "run"
    working.mkdir()
    save_recipe(load_recipe(DEMO_RECIPE), working / "config.yaml")
    argv = ["--config", str(DEMO_RECIPE), "--working", str(working), "--dry-run"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"[launch] warning: cannot lock {working} here (Function not implemented)" in err


def test_train_dpo_reports_an_input_error_once_and_lets_bugs_through(tmp_path, monkeypatch, capsys):
    """Bad input: one line from the rank that recorded <working>/ERROR (or rank 0), none when the launcher prints it;
    any other exception (a FileNotFoundError from a bug, say) keeps its traceback."""
    import silkie.train
    from silkie.errors import InputError

    spec = importlib.util.spec_from_file_location("train_dpo_entry", REPO_ROOT / "train_dpo.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    working = tmp_path / "run"
    working.mkdir()
    argv = ["--config", str(DEMO_RECIPE), "--working", str(working)]

    def bad_input(recipe, working):
        raise InputError("data.path: rows.jsonl has no usable pair")

    monkeypatch.setattr(silkie.train, "run_training", bad_input)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("SILKIE_LAUNCHER_REPORTS_ERRORS", raising=False)
    assert entry.main(argv) == 2  # rank 1 recorded it first: it prints (a Slurm log has only the workers' output)
    assert capsys.readouterr().err == "error: data.path: rows.jsonl has no usable pair\n"
    assert (working / "ERROR").read_text() == "data.path: rows.jsonl has no usable pair\n"
    assert entry.main(argv) == 2 and capsys.readouterr().err == ""  # another non-zero rank: already said
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SILKIE_LAUNCHER_REPORTS_ERRORS", "1")
    assert entry.main(argv) == 2 and capsys.readouterr().err == ""  # the launcher prints it from ERROR

    def bug(recipe, working):
        raise FileNotFoundError("/internal/state.json")

    monkeypatch.setattr(silkie.train, "run_training", bug)
    with pytest.raises(FileNotFoundError):
        entry.main(argv)


def test_torchrun_lines_the_launcher_says_better_are_dropped(tmp_path):
    import logging

    from silkie.launch.torchrun_entry import _SaidElsewhere

    def kept(message: str, *args) -> bool:
        record = logging.LogRecord("torch.distributed.elastic", logging.WARNING, __file__, 1, message, args, None)
        return quiet.filter(record)

    quiet = _SaidElsewhere(tmp_path)
    assert not kept("Received %s death signal, shutting down workers", 2)
    assert not kept("Sending process %s closing signal %s", 123, "SIGINT")
    assert kept("Unable to shutdown process %s via %s, forcefully exiting via %s", 123, "SIGINT", "SIGKILL")
    failed = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"
    assert kept(failed, 1, 0, 123, "python")  # no input error reported: torchrun's line is the news
    (tmp_path / "ERROR").write_text("bad row\n")
    assert not kept(failed, 2, 0, 123, "python")


def run_with_a_checkpoint(tmp_path):
    """A run folder of the demo recipe (6 steps) stopped after checkpoint-3."""
    working = tmp_path / "run"
    working.mkdir()
    save_recipe(load_recipe(DEMO_RECIPE, ["training.max_steps=6"]), working / "config.yaml")
    (working / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    fake_checkpoint(working, 3)
    return working


def test_settings_that_do_not_change_results_resume_and_take_effect(tmp_path):
    """Tokenizing processes, DataLoader workers, the reference pass's batch, answers shown at evaluations: a resume
    takes them (no --force, which would start over), and config.yaml, which training reads, gets them."""
    from silkie.launch.workdir import inspect_workdir, prepare_workdir

    working = run_with_a_checkpoint(tmp_path)
    changed = ["data.num_proc=2", "training.dataloader_num_workers=1", "dpo.precompute_ref_batch_size=2",
               "dpo.generate_during_eval=true"]  # fmt: skip
    recipe = load_recipe(DEMO_RECIPE, ["training.max_steps=6", *changed])
    plan = inspect_workdir(working, recipe)
    assert plan.state == "resume" and plan.resume_from == working / "checkpoint-3"
    assert ("(new settings: data.num_proc (1 -> 2), dpo.generate_during_eval (False -> True), "
            "dpo.precompute_ref_batch_size (None -> 2) and 1 more)") in plan.message  # fmt: skip
    prepare_workdir(plan, recipe)
    stored = load_recipe(working / "config.yaml")
    assert stored.data.num_proc == 2 and stored.dpo.precompute_ref_batch_size == 2 and stored.dpo.generate_during_eval
    assert (working / "checkpoint-3").is_dir() and (working / "metrics.jsonl").is_file()


def test_force_on_a_run_of_the_same_recipe_starts_over(tmp_path):
    """The way out when a checkpoint no longer fits its data (same recipe, other rows): --force moves it aside."""
    working = run_with_a_checkpoint(tmp_path)
    resumed = run_launcher(working, "--dry-run", "training.max_steps=6")
    assert resumed.returncode == 0 and "resumes from checkpoint-3" in resumed.stderr
    forced = run_launcher(working, "--dry-run", "--force", "training.max_steps=6")
    assert forced.returncode == 0 and "--force: a run of this recipe was there (it starts over)" in forced.stderr
    assert "moves the old config.yaml, checkpoint-3, metrics.jsonl" in forced.stderr
    assert "starts from step 0" in forced.stderr


def test_a_run_folder_that_cannot_be_made_or_read_is_one_line(assets, tmp_path):
    """A working folder under a file (as under a read-only disk) and a stored config.yaml that is not UTF-8 were
    tracebacks, the second even in a dry run."""
    (tmp_path / "file").write_text("")
    working = tmp_path / "file" / "run"
    refused = run_launcher(working, *asset_overrides(assets))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == f"error: {working}: Not a directory"
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.yaml").write_bytes(b"model:\n  path: \xff\xfe\n")
    (garbled / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    dry = run_launcher(garbled, "--dry-run")
    assert one_line_error(dry).startswith(
        f"error: {garbled} holds a different recipe: its config.yaml is not a valid recipe: {garbled / 'config.yaml'} "
        "is not UTF-8 text (byte 15)"
    )


def test_a_stop_before_the_first_checkpoint_says_a_rerun_starts_over(tmp_path, capsys):
    import signal

    from silkie.launch.local import _report

    working = tmp_path / "run"
    working.mkdir()
    assert _report(working, 130, signal.SIGINT) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip().endswith(
        "interrupted (SIGINT): no checkpoint had been written yet; run the same command again to start over"
    )
    fake_checkpoint(working, 3)
    assert _report(working, 1, None) == 1
    assert capsys.readouterr().err.strip().endswith("is intact; run the same command again to resume")
