"""launch_dpo.py --dry-run: the exact local torchrun command or Slurm script, the global batch it trains with, and
nothing written."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from .slurm_cluster import REPO_ROOT, one_line_error, run_launcher

TRAIN_SCRIPT = REPO_ROOT / "train_dpo.py"
LOCAL_TORCHRUN = f"{shlex.quote(sys.executable)} {REPO_ROOT / 'silkie' / 'launch' / 'torchrun_entry.py'}"
TORCHRUN = LOCAL_TORCHRUN  # Slurm scripts too: no traceback after a signal or an input error
SIGNALS = "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # read by torchrun's --signals_to_handle


def test_dry_run_local_cpu_prints_torchrun_and_writes_nothing(tmp_path):
    working = tmp_path / "run"
    result = run_launcher(working, "--dry-run", "launch.nproc_per_node=2", "training.max_steps=7")
    assert result.returncode == 0, result.stderr
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert result.stdout == (
        f"CUDA_VISIBLE_DEVICES='' OMP_NUM_THREADS={threads} {SIGNALS} PET_SHUTDOWN_TIMEOUT=120 "
        f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 {LOCAL_TORCHRUN} --standalone --nproc_per_node 2 "
        f"{TRAIN_SCRIPT} --config {working}/config.yaml --working {working}\n"
    )
    assert "new run" in result.stderr
    # the command reads the resolved recipe that a real launch writes first: the dry run says so
    assert f"a launch first writes the resolved recipe (file + overrides) to {working}/config.yaml" in result.stderr
    assert not working.exists()


def test_dry_run_names_the_global_batch_and_refuses_one_that_does_not_divide(tmp_path):
    working = tmp_path / "run"
    paper = ["training.global_batch_size=256", "training.per_device_train_batch_size=2"]
    for gpus, accumulation in (("8", 16), ("16", 8)):
        result = run_launcher(working, "--dry-run", "--gpus", gpus, *paper)
        assert result.returncode == 0, result.stderr
        assert f"256 pairs per optimizer step ({gpus} process(es) x 2 pairs x {accumulation} accumulation)" in (
            result.stderr
        )
    refused = run_launcher(working, "--dry-run", "--gpus", "24", "slurm.gpus_per_node=8", *paper)
    assert one_line_error(refused).startswith("error: recipe: training.global_batch_size = 256 is not a multiple of")
    both = run_launcher(working, "--dry-run", *paper, "training.gradient_accumulation_steps=4")
    assert "global_batch_size and training.gradient_accumulation_steps are both set" in one_line_error(both)
    # the paper recipe's global batch dropped for a fixed accumulation, from the command line
    dropped = run_launcher(working, "--dry-run", *paper, "training.global_batch_size=null",
                           "training.gradient_accumulation_steps=4")  # fmt: skip
    assert "8 pairs per optimizer step (1 process(es) x 2 pairs x 4 accumulation)" in dropped.stderr


def test_dry_run_without_a_gpu_prints_the_gpu_command_with_a_warning(tmp_path):
    # a login node: the recipe asks for 8 GPU processes, the dry run shows them instead of refusing
    result = run_launcher(
        tmp_path / "run", "--dry-run", "launch.cpu=false", "launch.nproc_per_node=8", CUDA_VISIBLE_DEVICES=""
    )
    assert result.returncode == 0, result.stderr
    assert "--standalone --nproc_per_node 8 " in result.stdout
    assert "no GPU is visible here; the command below starts 8 GPU process(es)" in result.stderr
    refused = run_launcher(tmp_path / "run", "launch.cpu=false", "launch.nproc_per_node=8", CUDA_VISIBLE_DEVICES="")
    assert one_line_error(refused).startswith("error: no GPU is visible")
    # no process count in the recipe (as in the Silkie repository's flat recipes): one per GPU, torchrun's `gpu`
    unset = run_launcher(
        tmp_path / "run", "--dry-run", "launch.cpu=false", "launch.nproc_per_node=null", CUDA_VISIBLE_DEVICES=""
    )
    assert unset.returncode == 0, unset.stderr
    assert "--standalone --nproc_per_node gpu " in unset.stdout
    assert "no GPU is visible here; the command below starts one process per GPU on a machine with them" in (
        unset.stderr
    )
    assert "; one process per GPU, the GPU count sets the global batch" in unset.stderr


def test_dry_run_local_gpus_one_process_per_visible_gpu(tmp_path):
    working = tmp_path / "run"
    result = run_launcher(
        working, "--dry-run", "launch.cpu=false", "launch.nproc_per_node=null", CUDA_VISIBLE_DEVICES="0,1,2"
    )
    assert result.returncode == 0, result.stderr
    assert f"{LOCAL_TORCHRUN} --standalone --nproc_per_node 3 " in result.stdout
    too_many = run_launcher(
        working, "--dry-run", "launch.cpu=false", "launch.nproc_per_node=4", CUDA_VISIBLE_DEVICES="0"
    )
    assert one_line_error(too_many) == "error: launch.nproc_per_node = 4 but only 1 GPU(s) are visible"
    assert not working.exists()


@pytest.mark.parametrize(("gpus", "nodes", "per_node"), [(4, 1, 4), (8, 1, 8), (16, 2, 8)])
def test_dry_run_slurm_script(tmp_path, gpus, nodes, per_node):
    working = tmp_path / "run"
    result = run_launcher(
        working,
        "--dry-run",
        "--gpus",
        str(gpus),
        "launch.cpu=false",
        "slurm.partition=gpu",
        "slurm.time=02:00:00",
        "slurm.signal_seconds=120",
        'slurm.extra_sbatch=["--exclusive"]',
        'slurm.setup=["module load cuda/12.4", "source /opt/env/bin/activate"]',
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in (
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gres=gpu:{per_node}",
        "#SBATCH --cpus-per-gpu=8",
        "#SBATCH --time=02:00:00",
        "#SBATCH --partition=gpu",
        f"#SBATCH --chdir={REPO_ROOT}",
        f"#SBATCH --output={working}/slurm/%j.log",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "module load cuda/12.4",
        "source /opt/env/bin/activate",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        f"export {SIGNALS}",
        "export PET_SHUTDOWN_TIMEOUT=90",  # 120 s of warning less 30 s for the requeue
        "trap on_preempt USR1",
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        f"    {TORCHRUN} \\",
        f'    --nnodes "$SLURM_NNODES" --nproc_per_node {per_node} \\',
        '    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \\',
        f"    {TRAIN_SCRIPT} --config {working}/config.yaml --working {working} &",
        '    scontrol requeue "$SLURM_JOB_ID"',
        'if [ -e "$WORKING/ERROR" ]; then  # bad input: a requeue would stop the same way',
        '    echo "error: $(cat "$WORKING/ERROR")"',
    ):
        assert expected in lines, f"missing line {expected!r} in:\n{script}"
    assert "CUDA_VISIBLE_DEVICES" not in script  # GPU mode
    assert sum(line.startswith("#SBATCH") for line in lines) == 13  # the 12 above + --job-name
    assert "#SBATCH --job-name=silkie-dpo" in lines
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not working.exists()


def test_dry_run_slurm_script_with_spaces_in_paths_and_a_fixed_port(tmp_path):
    working = tmp_path / "my runs" / "run 1"
    result = run_launcher(working, "--dry-run", "--gpus", "2", "slurm.rdzv_port=29500", "slurm.job_name=dpo run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for expected in (f'#SBATCH --output="{working}/slurm/%j.log"', '#SBATCH --job-name="dpo run"', "MASTER_PORT=29500"):
        assert expected in lines, f"missing line {expected!r} in:\n{result.stdout}"
    assert f"WORKING='{working}'" in lines


def test_dry_run_slurm_cpu_mode_and_no_requeue(tmp_path):
    result = run_launcher(tmp_path / "run", "--dry-run", "--gpus", "2", "slurm.requeue=false", "slurm.signal=SIGUSR2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "#SBATCH --gres=gpu:2" in lines and "#SBATCH --nodes=1" in lines
    assert "export CUDA_VISIBLE_DEVICES=" in lines
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --signal=B:USR2@300" in lines
    assert "trap on_preempt USR2" in lines
    assert "scontrol requeue" not in result.stdout


def test_a_tracker_that_is_not_installed_is_said_before_the_launch(tmp_path):
    """report_to=wandb without wandb was a torchrun traceback after the data loaded, and advice to rerun."""
    import importlib.util

    assert importlib.util.find_spec("wandb") is None  # the test's premise: CI installs no wandb
    said = "training.report_to = 'wandb': wandb is not installed (pip install wandb, or drop it)"
    dry = run_launcher(tmp_path / "run", "--dry-run", "training.report_to=wandb")
    assert dry.returncode == 0 and f"[launch] warning: {said}" in dry.stderr
    refused = run_launcher(tmp_path / "run", "training.report_to=wandb")
    assert said in one_line_error(refused) and not (tmp_path / "run").exists()


def test_a_cpu_recipe_sent_to_slurm_warns_that_its_gpus_go_unused(tmp_path):
    result = run_launcher(tmp_path / "run", "--dry-run", "--gpus", "2")  # the demo recipe: launch.cpu true
    assert result.returncode == 0, result.stderr
    assert ("[launch] warning: launch.cpu is true: the job books 2 GPU(s) and hides them from training "
            "(CUDA_VISIBLE_DEVICES=); set launch.cpu=false to train on them") in result.stderr  # fmt: skip
    assert "launch.cpu is true" not in run_launcher(tmp_path / "run", "--dry-run", "--gpus", "2",
                                                    "launch.cpu=false").stderr  # fmt: skip
