"""Helpers for the launcher tests: demo assets, launcher subprocesses, and a real one-node Slurm cluster.

The cluster comes from `.ci/setup_slurm.sh` (Debian's slurm-wlm + munge on this machine). `ensure_cluster`
uses a running one, or runs the script (which installs the packages if needed) and remembers to stop the
daemons it started; it returns a skip reason only when Slurm cannot be installed or started here.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = REPO_ROOT / "launch_dpo.py"
DEMO_RECIPE = REPO_ROOT / "dpo_config" / "demo.yaml"
SETUP_SLURM = REPO_ROOT / ".ci" / "setup_slurm.sh"
SLURM_BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")


def make_demo_assets(root: Path, n: int = 80) -> dict[str, Path]:
    """Tiny Qwen-VL checkpoint + synthetic VLFeedback (n rows) under `root`."""
    from silkie.dev.synthetic import write_synthetic_vlfeedback
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    model = build_tiny_checkpoint(root / "tiny-qwen-vl")
    write_synthetic_vlfeedback(root / "vlfeedback", n=n, seed=0)
    return {
        "model": Path(model),
        "jsonl": root / "vlfeedback" / "vlfeedback_80k.jsonl",
        "zip": root / "vlfeedback" / "merged_images.zip",
    }


def asset_overrides(assets: dict[str, Path]) -> list[str]:
    """Point the demo recipe at test assets; 60 prompts, no held-out split, log every step."""
    return [
        f"model.path={assets['model']}",
        f"data.path={assets['jsonl']}",
        f"data.images={assets['zip']}",
        "data.max_prompts=60",
        "data.eval_fraction=0.0",
        "training.logging_steps=1",
    ]


def launcher_env(**extra: str) -> dict[str, str]:
    """Environment for launcher subprocesses (offline, unbuffered, without a caller's OMP_NUM_THREADS)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def launcher_command(working: Path, *args: str, config: Path = DEMO_RECIPE) -> list[str]:
    """`python launch_dpo.py --config ... --working ... ARGS`."""
    return [sys.executable, str(LAUNCHER), "--config", str(config), "--working", str(working), *args]


def run_launcher(
    working: Path, *args: str, timeout: float = 120, config: Path = DEMO_RECIPE, **env: str
) -> subprocess.CompletedProcess:
    """Run the launcher to completion (text output captured)."""
    return subprocess.run(
        launcher_command(working, *args, config=config),
        cwd=REPO_ROOT,
        env=launcher_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2, proc: subprocess.Popen | None = None) -> None:
    """Poll until `predicate()` is true; fail with `what` on timeout or if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def train_steps(working: Path) -> list[int]:
    """Steps of the per-step training records in metrics.jsonl (the end-of-training summary excluded)."""
    rows = [json.loads(line) for line in (working / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "loss" in row]


def fake_checkpoint(working: Path, step: int) -> Path:
    """`working/checkpoint-<step>` with the files a resume needs, as stand-ins that pass the structure check."""
    checkpoint = working / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    for name in ("optimizer.pt", "scheduler.pt"):
        (checkpoint / name).write_bytes(pickle.dumps({}))  # torch's legacy (pickle) format
    return checkpoint


def read_log(path: Path) -> str:
    """A job log as text (several processes write it, so a multi-byte character may be cut)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def finished_step(working: Path) -> int:
    """The step recorded in the FINISHED marker."""
    return json.loads((working / "FINISHED").read_text())["step"]


def job_id_from(output: str) -> str:
    """The job id the launcher printed ("submitted job N")."""
    match = re.search(r"submitted job (\d+)", output)
    assert match, f"no job id in launcher output:\n{output}"
    return match.group(1)


def slurm_binaries_missing() -> list[str]:
    """Slurm/munge programs that are not on PATH (sbin included)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in SLURM_BINARIES if shutil.which(name, path=path) is None]


def cluster_idle() -> bool:
    """True when `sinfo` answers and shows an idle (or mixed) node."""
    if shutil.which("sinfo") is None:
        return False
    try:
        shown = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return shown.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed") for s in shown.stdout.split())


def ensure_cluster() -> tuple[bool, str | None]:
    """Make a one-node cluster available: (started_here, skip_reason)."""
    if cluster_idle():
        return False, None
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if slurm_binaries_missing() and not can_install:
        missing = ", ".join(slurm_binaries_missing())
        return False, f"Slurm is not installed ({missing} missing) and cannot be installed here (needs root + apt-get)"
    try:
        setup = subprocess.run(["bash", str(SETUP_SLURM)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return False, ".ci/setup_slurm.sh did not finish within 15 minutes"
    if setup.returncode != 0:
        if slurm_binaries_missing():
            tail = " ".join((setup.stderr or setup.stdout).split()[-30:])
            return False, f"Slurm could not be installed by .ci/setup_slurm.sh: {tail}"
        raise RuntimeError(f".ci/setup_slurm.sh failed:\n{setup.stdout}\n{setup.stderr}")
    return True, None


def stop_cluster() -> None:
    """Stop the daemons that `.ci/setup_slurm.sh` recorded (by pid)."""
    subprocess.run(["bash", str(SETUP_SLURM), "stop"], capture_output=True, text=True, timeout=60)


def cancel_jobs(job_ids: list[str]) -> None:
    """scancel these jobs (cleanup after a failed test); unknown ids are ignored."""
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=30)


def job_field(job_id: str, name: str) -> str | None:
    """One field of `scontrol show job` (e.g. JobState, Restarts)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    fields = dict(part.split("=", 1) for part in shown.stdout.split() if "=" in part)
    return fields.get(name)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The launcher's error: exit code 2, a single `error: ...` line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
