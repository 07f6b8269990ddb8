"""launch_dpo.py --gpus N against a real one-node Slurm cluster (.ci/setup_slurm.sh): CPU-mode gloo jobs
that request GRES GPUs, `--wait`, and checkpoint + requeue + resume after the preemption signal."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from .slurm_cluster import (
    REPO_ROOT,
    asset_overrides,
    cancel_jobs,
    ensure_cluster,
    finished_step,
    job_field,
    job_id_from,
    launcher_command,
    launcher_env,
    make_demo_assets,
    read_log,
    run_launcher,
    stop_cluster,
    train_steps,
    wait_for,
)

JOB_STEPS = 6
PREEMPT_STEPS = 40
# The test node has 2 CPUs and gres gpu:2.
SLURM_OVERRIDES = ["slurm.gpus_per_node=2", "slurm.cpus_per_gpu=1", "slurm.time=00:10:00"]


@pytest.fixture(scope="module")
def cluster():
    """A running one-node cluster; stopped afterwards only if this fixture started it."""
    started, reason = ensure_cluster()
    if reason:
        pytest.skip(reason)
    yield
    if started:
        stop_cluster()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_demo_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def jobs():
    """Job ids a test submitted; cancelled at the end in case the test failed half-way."""
    submitted: list[str] = []
    yield submitted
    cancel_jobs(submitted)


def test_gpus_2_cpu_job_runs_to_the_end_with_wait(cluster, assets, jobs, tmp_path):
    working = tmp_path / "run"
    overrides = [*asset_overrides(assets), *SLURM_OVERRIDES, f"training.max_steps={JOB_STEPS}", "training.save_steps=3"]
    result = run_launcher(working, "--gpus", "2", "--wait", *overrides, timeout=110)
    output = result.stdout + result.stderr
    job = job_id_from(output)
    jobs.append(job)
    assert result.returncode == 0, output
    log = working / "slurm" / f"{job}.log"
    assert f"[launch] log: {log}" in result.stdout
    assert f"[launch] script: {working / 'slurm' / f'{job}.sh'}" in result.stdout
    assert f"[launch] job {job} COMPLETED: finished" in result.stdout
    text = read_log(log)
    assert f"[silkie] job {job} (restart 0)" in text
    assert "[silkie] finished: adapter in" in text
    assert text.splitlines()[-1] in result.stdout  # --wait streamed the log
    assert (working / "adapter" / "adapter_config.json").is_file()
    assert (working / "adapter" / "adapter_model.safetensors").is_file()
    assert train_steps(working) == list(range(1, JOB_STEPS + 1))
    assert finished_step(working) == JOB_STEPS
    assert job_field(job, "JobState") == "COMPLETED"
    assert job_field(job, "TresPerNode") == "gres:gpu:2" and job_field(job, "TRES").startswith("cpu=2,node=1")

    # The finished run is not submitted again, and its script (if resubmitted by hand) does nothing.
    again = run_launcher(working, "--gpus", "2", *overrides)
    assert again.returncode == 0 and "holds a finished run of this recipe" in again.stdout
    assert "submitted" not in again.stdout
    resubmit = subprocess.run(
        ["sbatch", "--parsable", str(working / "slurm" / f"{job}.sh")], capture_output=True, text=True, timeout=30
    )
    assert resubmit.returncode == 0, resubmit.stderr
    second = resubmit.stdout.strip().split(";")[0]
    jobs.append(second)
    wait_for(lambda: job_field(second, "JobState") == "COMPLETED", 60, f"job {second} to complete", poll=0.5)
    assert "FINISHED exists): nothing to do" in read_log(working / "slurm" / f"{second}.log")
    assert train_steps(working) == list(range(1, JOB_STEPS + 1))


def test_an_input_error_in_a_job_is_one_line_and_no_requeue(cluster, assets, jobs, tmp_path):
    import json

    rows = tmp_path / "own.jsonl"
    rows.write_text(json.dumps({"question": "What is shown?", "chosen": "A cat.", "rejected": "A dog."}) + "\n")
    working = tmp_path / "run"
    overrides = [*asset_overrides(assets), *SLURM_OVERRIDES, "data.source=preference", "data.images=null"]
    result = run_launcher(working, "--gpus", "2", "--wait", *overrides, f"data.path={rows}", timeout=110)
    job = job_id_from(result.stdout + result.stderr)
    jobs.append(job)
    assert result.returncode == 1
    text = read_log(working / "slurm" / f"{job}.log")
    message = f"no usable preference pairs in {rows}: rows seen=1 kept=0"
    assert text.count(message) == 1 and f"error: {message}" in text, text
    assert "[silkie] training stopped on this input error; fix it and launch again" in text
    assert "Traceback" not in text and "exitcode" not in text and "requeue" not in text
    assert job_field(job, "JobState") == "FAILED" and job_field(job, "Restarts") == "0"


def test_refused_submission_leaves_nothing_behind(cluster, assets, tmp_path):
    working = tmp_path / "run"
    result = run_launcher(working, "--gpus", "2", *asset_overrides(assets), *SLURM_OVERRIDES, "slurm.partition=nope")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line == (
        "error: sbatch refused the job (sbatch: error: invalid partition specified: nope "
        "sbatch: error: Batch job submission failed: Invalid partition name specified); the job asks for "
        "--partition=nope (slurm.partition); --dry-run prints the script"
    )
    assert not working.exists()


def test_a_refusal_for_resources_names_what_the_job_asked_and_its_keys():
    from silkie.launch.slurm import _resource_hint

    script = "#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --gres=gpu:2\n#SBATCH --cpus-per-gpu=8\n#SBATCH --time=24:00:00\n"
    reason = "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    assert _resource_hint(script, reason) == (
        "; the job asks for --gres=gpu:2 (--gpus / slurm.gpus_per_node), --cpus-per-gpu=8 (slurm.cpus_per_gpu)"
    )
    assert _resource_hint(script, "sbatch: error: Batch job submission failed: Invalid qos") == ""  # none asked
    extra = script + "#SBATCH --requeue\n#SBATCH --cpus-per-gpu=4\n"  # slurm.extra_sbatch lines follow --requeue
    assert _resource_hint(extra, reason).endswith("--cpus-per-gpu=4 (slurm.extra_sbatch)")


def test_preemption_signal_checkpoints_requeues_and_resumes(cluster, assets, jobs, tmp_path):
    working = tmp_path / "run"
    overrides = [
        *asset_overrides(assets),
        *SLURM_OVERRIDES,
        f"training.max_steps={PREEMPT_STEPS}",
        "training.save_steps=5",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        launcher_command(working, "--gpus", "2", "--wait", *overrides),
        cwd=REPO_ROOT,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: any((working / "slurm").glob("[0-9]*.sh")), 30, "the job script", proc=proc)
        job = next((working / "slurm").glob("[0-9]*.sh")).stem
        jobs.append(job)
        busy = run_launcher(working, *overrides)  # a second launch into the same run directory
        assert busy.returncode == 2
        assert busy.stderr.strip() == (
            f"error: Slurm job {job} for {working} is still queued or running; wait for it or scancel it"
        )
        wait_for(lambda: (working / "checkpoint-5").is_dir(), 80, "checkpoint-5", proc=proc)
        signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True)
        assert signalled.returncode == 0, signalled.stderr
        output, _ = proc.communicate(timeout=110)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, output
    text = read_log(working / "slurm" / f"{job}.log")
    stopped = re.search(r"\[silkie\] stopped on SIGUSR1: checkpoint saved at step (\d+)", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert 5 <= step < PREEMPT_STEPS
    order = [
        f"[silkie] job {job} (restart 0)",
        "[silkie] SIGUSR1: asking the workers to save a checkpoint and stop",
        f"stopped on SIGUSR1: checkpoint saved at step {step}",
        f"[silkie] stopped at {working / f'checkpoint-{step}'} after SIGUSR1; requeueing job {job}",
        f"[silkie] job {job} (restart 1)",
        f"[silkie] resuming from checkpoint-{step}",
        "[silkie] finished: adapter in",
    ]
    positions = [text.find(marker) for marker in order]
    assert -1 not in positions and positions == sorted(positions), list(zip(order, positions))
    assert "Traceback" not in text and "SignalException" not in text  # a planned stop is no crash
    assert finished_step(working) == PREEMPT_STEPS
    steps = train_steps(working)
    assert steps[-1] == PREEMPT_STEPS and set(steps) == set(range(1, PREEMPT_STEPS + 1))
    assert job_field(job, "Restarts") == "1" and job_field(job, "JobState") == "COMPLETED"
    assert (working / "adapter" / "adapter_model.safetensors").is_file()
    assert f"[launch] job {job} COMPLETED: finished" in output
    assert elapsed < 115
