"""launch_dpo.py without Slurm: errors, the run directory rules, and real local CPU runs (gloo); dry runs:
test_dry_run.py."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from silkie.config import load_recipe

from .slurm_cluster import (
    DEMO_RECIPE,
    REPO_ROOT,
    asset_overrides,
    finished_step,
    launcher_command,
    launcher_env,
    make_demo_assets,
    one_line_error,
    run_launcher,
    train_steps,
    wait_for,
)

MAX_STEPS = 20


def test_launcher_does_not_import_torch(tmp_path):
    code = (
        "import sys, launch_dpo\n"
        "from silkie.launch import cli, local, slurm, workdir\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "rc = launch_dpo.main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'dry run'\n"
        "print('torch-free', rc)\n"
    )
    for extra in ([], ["--gpus", "16"]):
        args = ["--config", str(DEMO_RECIPE), "--working", str(tmp_path / "run"), "--dry-run", *extra]
        result = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "torch-free 0"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["training.learnin_rate=1e-3"],
            "error: override 'training.learnin_rate=1e-3': recipe: unknown key 'training.learnin_rate' "
            "(did you mean 'learning_rate'?)",
        ),
        (["dpo.betta=0.2"], "error: override 'dpo.betta=0.2': recipe: unknown key 'dpo.betta' (did you mean 'beta'?)"),
        (["lora.r=abc"], "error: override 'lora.r=abc': recipe: lora.r = 'abc' has the wrong type; expected int"),
        (
            ["dpo.beta=-1"],
            "error: override 'dpo.beta=-1': recipe: dpo.beta = -1 is not allowed; expected a number > 0",
        ),
        (
            ["data.cap_strategy=best"],
            "error: override 'data.cap_strategy=best': recipe: data.cap_strategy = 'best' is not allowed; "
            "expected one of 'margin', 'random'",
        ),
        (
            ["dpo.loss_type=exo_pair"],
            f"error: {DEMO_RECIPE} with dpo.loss_type=exo_pair: recipe: dpo.label_smoothing = 0.0 is not allowed; "
            "expected > 0 for exo_pair",
        ),
        (
            ["dpo.loss_type=[sigmoid, aot]", "dpo.f_divergence_type=js_divergence"],
            "error: override 'dpo.f_divergence_type=js_divergence': recipe: dpo.f_divergence_type = 'js_divergence' "
            "is not allowed; "
            "expected reverse_kl with loss types ['aot']",
        ),
        (["c=d"], "error: override 'c=d': the key must be section.key (e.g. training.learning_rate=5e-6)"),
        (["beta=0.2"], "error: override 'beta=0.2': the key must be section.key (dpo.beta=0.2)"),
        (["--gpus", "0"], "error: --gpus must be a positive integer, got 0"),
        (["--gpus", "two"], "error: argument --gpus: invalid int value: 'two' (see --help)"),
        (
            ["--gpus", "12"],
            "error: --gpus 12 is not a multiple of slurm.gpus_per_node = 8; "
            "use a multiple of 8, at most 8 on one node, or set slurm.gpus_per_node",
        ),
        (["--gpus", "3", "slurm.gpus_per_node=2"], "error: --gpus 3 is not a multiple of slurm.gpus_per_node = 2"),
        (
            ["--gpus", "8", "slurm.signal=TERM"],
            "error: override 'slurm.signal=TERM': recipe: slurm.signal = 'TERM' is not allowed; expected one of USR1",
        ),
        # every training value is range-checked when the recipe is read, in a dry run too (issue 16)
        *(
            (
                ["--dry-run", f"training.{key}={value}"],
                f"error: override 'training.{key}={value}': recipe: training.{key} = {shown} is not allowed; "
                f"expected {allowed}",
            )
            for key, value, shown, allowed in [
                ("per_device_train_batch_size", "0", "0", "an integer >= 1"),
                ("gradient_accumulation_steps", "0", "0", "an integer >= 1"),
                ("learning_rate", "-1e-5", "-1e-05", "a number >= 0"),
                ("max_steps", "-5", "-5", "-1 (use num_train_epochs) or an integer >= 1"),
                ("logging_steps", "0", "0", "a ratio of the run in (0, 1) or a whole number of steps >= 1"),
                ("save_steps", "0", "0", "a ratio of the run in (0, 1) or a whole number of steps >= 1"),
                ("eval_steps", "0", "0", "null or a ratio of the run in (0, 1) or a whole number of steps >= 1"),
                ("warmup_ratio", "2", "2", "a number in [0, 1]"),
                ("optim", "adamw_torchh", "'adamw_torchh'", "one of 'adamw_torch', 'adamw_torch_fused'"),
            ]
        ),
        (
            ["--dry-run", "lora.alpha=-5"],
            "error: override 'lora.alpha=-5': recipe: lora.alpha = -5 is not allowed; expected an integer >= 1",
        ),
        (
            ["--dry-run", "training.bf16=true", "training.fp16=true"],  # neither alone: named with the file
            f"error: {DEMO_RECIPE} with training.bf16=true training.fp16=true: recipe: training.bf16 and "
            "training.fp16 are both true; set one of them",
        ),
        (
            ["--dry-run", "--gpus", "8", 'slurm.job_name="a\\nid > /tmp/x #"'],
            "error: override 'slurm.job_name=\"a\\nid > /tmp/x #\"': recipe: slurm.job_name = 'a\\nid > /tmp/x #' is "
            "not allowed; expected text without control characters (it goes into an #SBATCH line; found '\\n')",
        ),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, args, message):
    line = one_line_error(run_launcher(tmp_path / "run", *args))
    assert line.startswith(message)
    assert not (tmp_path / "run").exists()


def test_missing_recipe_and_cpu_hint(tmp_path):
    result = subprocess.run(
        launcher_command(tmp_path / "run", config=tmp_path / "nope.yaml"),
        cwd=REPO_ROOT,
        env=launcher_env(),
        capture_output=True,
        text=True,
    )
    assert one_line_error(result) == f"error: recipe file not found: {tmp_path / 'nope.yaml'}"
    no_gpu = run_launcher(tmp_path / "run", "launch.cpu=false", CUDA_VISIBLE_DEVICES="")
    assert "add launch.cpu=true" in one_line_error(no_gpu)
    assert not (tmp_path / "run").exists()


def test_recipe_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("recipe_reference", REPO_ROOT / "scripts" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.undocumented() == [], "add a meaning to MEANINGS in scripts/recipe_reference.py"
    assert (REPO_ROOT / "dpo_config" / "README.md").read_text() == module.render(), (
        "dpo_config/README.md is stale: python scripts/recipe_reference.py > dpo_config/README.md"
    )


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A 2-process CPU run interrupted with Ctrl-C after its first checkpoint, then launched again to the end."""
    assets = make_demo_assets(tmp_path_factory.mktemp("assets"))
    working = tmp_path_factory.mktemp("local") / "run"
    overrides = [
        *asset_overrides(assets),
        f"training.max_steps={MAX_STEPS}",
        "training.save_steps=3",
        "launch.nproc_per_node=2",
    ]
    proc = subprocess.Popen(
        launcher_command(working, *overrides),
        cwd=REPO_ROOT,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: (working / "checkpoint-3").is_dir(), 120, "checkpoint-3", proc=proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does to the launcher
        first_out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted = {
        "code": proc.returncode,
        "out": first_out,
        "checkpoints": sorted(p.name for p in working.glob("checkpoint-*")),
        "finished": (working / "FINISHED").exists(),
    }
    second = run_launcher(working, *overrides, timeout=240)
    return {"working": working, "overrides": overrides, "interrupted": interrupted, "resumed": second}


def test_ctrl_c_stops_the_run_and_keeps_the_checkpoint(local_run):
    interrupted = local_run["interrupted"]
    assert interrupted["code"] == 130, interrupted["out"]
    assert not interrupted["finished"]
    assert "checkpoint-3" in interrupted["checkpoints"]
    last = max(interrupted["checkpoints"], key=lambda name: int(name.split("-")[1]))
    assert "[launch] SIGINT: the workers save a checkpoint after this step and stop (at once" in interrupted["out"]
    assert last != "checkpoint-3"  # Ctrl-C came after checkpoint-3: the step it stopped at was saved too
    assert "Traceback" not in interrupted["out"] and "KeyboardInterrupt" not in interrupted["out"]
    assert f"the last complete checkpoint, {local_run['working'] / last}, is intact" in interrupted["out"]


def test_relaunch_resumes_and_finishes_at_the_same_step(local_run):
    working, resumed = local_run["working"], local_run["resumed"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    last = max(local_run["interrupted"]["checkpoints"], key=lambda name: int(name.split("-")[1]))
    assert "holds a run of this recipe; training resumes from " + last in resumed.stderr
    assert f"[silkie] resuming from {last}" in resumed.stdout
    assert finished_step(working) == MAX_STEPS
    steps = train_steps(working)
    assert steps[-1] == MAX_STEPS and set(steps) == set(range(1, MAX_STEPS + 1))
    assert (working / "adapter" / "adapter_config.json").is_file()
    assert (working / "adapter" / "adapter_model.safetensors").is_file()
    stored = yaml.safe_load((working / "config.yaml").read_text())
    assert stored == load_recipe(DEMO_RECIPE, local_run["overrides"]).to_dict()
    assert stored["training"]["max_steps"] == MAX_STEPS and stored["launch"]["nproc_per_node"] == 2
    assert stored["data"]["max_prompts"] == 60


def test_finished_run_is_not_restarted(local_run):
    working = local_run["working"]
    before = {p.name: p.stat().st_mtime_ns for p in working.iterdir()}
    again = run_launcher(working, *local_run["overrides"])
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"[launch] {working} holds a finished run of this recipe (FINISHED at step 20)")
    assert {p.name: p.stat().st_mtime_ns for p in working.iterdir()} == before


def test_force_keeps_the_finished_run_and_continues_it(local_run, tmp_path):
    working = tmp_path / "run"
    shutil.copytree(local_run["working"], working)
    overrides = [o for o in local_run["overrides"] if not o.startswith("training.max_steps")]
    more = [*overrides, f"training.max_steps={MAX_STEPS + 2}"]
    refused = run_launcher(working, *more)
    assert f"training.max_steps ({MAX_STEPS} -> {MAX_STEPS + 2})" in one_line_error(refused)
    forced = run_launcher(working, "--force", *more, timeout=240)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert f"[silkie] resuming from checkpoint-{MAX_STEPS}" in forced.stdout
    (backup,) = working.glob("backup-*")
    assert sorted(p.name for p in backup.iterdir()) == sorted(
        ["config.yaml", "FINISHED", "final_metrics.json", "adapter", "training_curves.png"]
    )
    old_config = backup / "config.yaml"
    assert yaml.safe_load(old_config.read_text())["training"]["max_steps"] == MAX_STEPS
    assert finished_step(working) == MAX_STEPS + 2
    assert yaml.safe_load((working / "config.yaml").read_text())["training"]["max_steps"] == MAX_STEPS + 2


def test_a_failing_squeue_refuses_instead_of_allowing_a_second_job(tmp_path, monkeypatch):
    from silkie.launch.slurm import active_jobs
    from silkie.launch.workdir import LaunchError

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    working = tmp_path / "run"
    (working / "slurm").mkdir(parents=True)
    (working / "slurm" / "4242.sh").write_text("#!/bin/bash\n")
    with pytest.raises(LaunchError, match=r"squeue failed \(slurm_load_jobs error: .*\): cannot tell whether job 4242"):
        active_jobs(working)


def test_a_working_path_with_a_newline_is_not_written_into_the_sbatch_lines(tmp_path):
    """A newline in an #SBATCH value would start a shell line there and end the directives after it (nodes, gres,
    signal, requeue, output): the recipe's values are refused when it is read, a path here."""
    from silkie.launch.slurm import render_script, slurm_layout
    from silkie.launch.workdir import LaunchError

    recipe = load_recipe(DEMO_RECIPE)
    script = render_script(recipe, tmp_path / "run", slurm_layout(8, 8), cwd=tmp_path)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert len(directives) == 11 and script.splitlines()[len(directives) + 2] == ""
    with pytest.raises(LaunchError, match=r"^--chdir '.*\\nid > x #' holds a control character"):
        render_script(recipe, tmp_path / "run", slurm_layout(8, 8), cwd=tmp_path / "a\nid > x #")
