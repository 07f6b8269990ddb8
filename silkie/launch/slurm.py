"""Slurm launch: an sbatch script running `srun torchrun` (one task per node, c10d rendezvous on the first node).

Preemption and the time limit: Slurm sends the batch shell `slurm.signal` (`--signal=B:USR1@N`); the
script's trap passes SIGUSR1 to the srun step, srun forwards it to torchrun on every node, torchrun
(started with SIGUSR1 in `--signals_to_handle`) forwards it to its workers and waits up to
`--shutdown_timeout` seconds (the signal's lead time less a margin for the requeue); the workers finish the
optimizer step, save `checkpoint-N` and exit 0.
The script then requeues the job (`scontrol requeue`), and the requeued job resumes from that checkpoint.
A run with `FINISHED` is never started or requeued again.
"""

from __future__ import annotations

import codecs
import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from silkie.config import Recipe
from silkie.config.cluster import SLURM_SIGNALS, SlurmSection
from silkie.logs import LAUNCH, LAUNCH_STDOUT, get_logger
from silkie.run_dir import ADAPTER_DIR, ERROR_NAME, FINISHED_NAME, SLURM_DIR, checkpoint_status

from .local import TORCHRUN_ENTRY, torchrun_env, train_command
from .workdir import LaunchError

notes, news = get_logger(LAUNCH), get_logger(LAUNCH_STDOUT)
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


@dataclass(frozen=True)
class SlurmLayout:
    """How `--gpus N` maps onto nodes: `nodes` x `gpus_per_node` (one torchrun task per node)."""

    nodes: int
    gpus_per_node: int


def slurm_layout(gpus: int, gpus_per_node: int) -> SlurmLayout:
    """N GPUs -> whole nodes of `gpus_per_node` (or one node with N < gpus_per_node GPUs)."""
    if gpus < 1:
        raise LaunchError(f"--gpus must be a positive integer, got {gpus}")
    if gpus <= gpus_per_node:
        return SlurmLayout(1, gpus)
    if gpus % gpus_per_node:
        raise LaunchError(
            f"--gpus {gpus} is not a multiple of slurm.gpus_per_node = {gpus_per_node}; "
            f"use a multiple of {gpus_per_node}, at most {gpus_per_node} on one node, or set slurm.gpus_per_node"
        )
    return SlurmLayout(gpus // gpus_per_node, gpus_per_node)


def check_signal(name: str) -> str:
    """`slurm.signal` as Slurm spells it (USR1/USR2)."""
    short = name.upper().removeprefix("SIG")
    if short not in SLURM_SIGNALS:
        raise LaunchError(
            f"slurm.signal = {name!r} is not allowed; expected one of {', '.join(SLURM_SIGNALS)} "
            "(SIGTERM is what scancel sends, so it cannot mean 'checkpoint and requeue')"
        )
    return short


def sbatch_options(
    slurm: SlurmSection,
    nodes: int,
    tasks_per_node: int,
    gpus_per_node: int,
    cwd: Path,
    log_dir: Path,
    more: tuple[tuple[str, object], ...] = (),
) -> list[str]:
    """The `#SBATCH` lines every silkie job shares: size, resources, the slurm section's choices, the log under
    `log_dir` (`%j.log`, appended across requeues), the job's `more` options, requeue and the extra lines."""
    options: list[tuple[str, object]] = [
        ("job-name", slurm.job_name),
        ("nodes", nodes),
        ("ntasks-per-node", tasks_per_node),
        ("gres", f"gpu:{gpus_per_node}"),
        ("cpus-per-gpu", slurm.cpus_per_gpu),
        ("mem-per-gpu", slurm.mem_per_gpu),
        ("time", slurm.time),
        ("partition", slurm.partition),
        ("account", slurm.account),
        ("qos", slurm.qos),
        ("constraint", slurm.constraint),
        ("chdir", cwd),
        ("output", log_dir / "%j.log"),
        ("open-mode", "append"),
        *more,
    ]
    lines = [f"#SBATCH --{key}={_sbatch_value(key, value)}" for key, value in options if value is not None]
    lines.append("#SBATCH --requeue" if slurm.requeue else "#SBATCH --no-requeue")
    for extra in slurm.extra_sbatch:
        extra = extra.strip()
        lines.append(extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}")
    return lines


def _sbatch_lines(recipe: Recipe, working: Path, layout: SlurmLayout, cwd: Path) -> list[str]:
    slurm = recipe.slurm
    signal = ("signal", f"B:{check_signal(slurm.signal)}@{slurm.signal_seconds}")
    return sbatch_options(slurm, layout.nodes, 1, layout.gpus_per_node, cwd, working / SLURM_DIR, (signal,))


def _sbatch_value(key: str, value: object) -> str:
    """An #SBATCH value; quoted when it holds spaces (sbatch splits unquoted directive values). The recipe's values
    are checked at load; a path with a newline (--working, the current folder) is refused here."""
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise LaunchError(f"--{key} {text!r} holds a control character, which would end the #SBATCH lines")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def shutdown_grace(signal_seconds: int) -> int:
    """How long torchrun waits for the workers to checkpoint: the signal's lead time less a margin (up to 60 s),
    so the batch script still has time to requeue before the time limit."""
    return max(1, signal_seconds - min(60, signal_seconds // 4))


def _torchrun_line(recipe: Recipe, working: Path, layout: SlurmLayout, python: str | None) -> str:
    # torchrun through torchrun_entry.py, as a local launch: no traceback after a signal or an input error
    return (
        f"{shlex.join([python or sys.executable, str(TORCHRUN_ENTRY)])} \\\n"
        f'    --nnodes "$SLURM_NNODES" --nproc_per_node {layout.gpus_per_node} \\\n'
        f'    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \\\n'
        f"    {shlex.join(train_command(working))}"
    )


def _torchrun_env_lines(signal_seconds: int) -> list[str]:
    env = torchrun_env(shutdown_grace(signal_seconds))
    return ["# torchrun forwards SIGUSR1 to the workers and waits for their checkpoint (srun passes these on)"] + [
        f"export {key}={shlex.quote(value)}" for key, value in env.items()
    ]


def _cpu_lines(nproc: int) -> list[str]:
    return [
        "# CPU mode (launch.cpu: true): gloo processes; the GPUs are still requested so the layout is the same",
        "export CUDA_VISIBLE_DEVICES=",
        f"threads=$(( ${{SLURM_CPUS_ON_NODE:-{nproc}}} / {nproc} ))",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}",
    ]


def _after_signal_lines(requeue: bool, signal_name: str) -> list[str]:
    stopped = f"[silkie] stopped at ${{last:-no checkpoint}} after SIG{signal_name}"
    if requeue:
        return [
            f'    echo "{stopped}; requeueing job $SLURM_JOB_ID"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "    exit 0",
        ]
    return [f'    echo "{stopped}; slurm.requeue is false: submit again to resume"', "    exit 1"]


def render_script(
    recipe: Recipe, working: str | Path, layout: SlurmLayout, cwd: str | Path | None = None, python: str | None = None
) -> str:
    """The complete sbatch script for this recipe and layout (paths made absolute)."""
    working = Path(working).resolve()
    cwd = Path(cwd or os.getcwd()).resolve()
    slurm = recipe.slurm
    signal_name = check_signal(slurm.signal)
    lines = [
        "#!/bin/bash",
        "# silkie DPO training job, written by launch_dpo.py. Submitting it again resumes the run.",
        *_sbatch_lines(recipe, working, layout, cwd),
        "",
        "set -o pipefail",
        *(["# environment setup (slurm.setup)", *slurm.setup] if slurm.setup else []),
        f"WORKING={shlex.quote(str(working))}",
        f'if [ -e "$WORKING/{FINISHED_NAME}" ]; then',
        f'    echo "[silkie] $WORKING is finished ({FINISHED_NAME} exists): nothing to do"',
        "    exit 0",
        "fi",
        'echo "[silkie] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $(date)"',
        "",
        "# c10d rendezvous on the first node of the allocation",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        # a per-job port: jobs sharing a node must not meet at one rendezvous store
        f"MASTER_PORT={slurm.rdzv_port}" if slurm.rdzv_port else "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        *_torchrun_env_lines(slurm.signal_seconds),
        *(_cpu_lines(layout.gpus_per_node) if recipe.launch.cpu else []),
        "",
        f"# SIG{signal_name} (Slurm's warning before the time limit, or scancel --signal={signal_name} --batch):",
        "# srun forwards SIGUSR1 to torchrun on every node, torchrun to its workers; they checkpoint and exit.",
        "PREEMPTED=0",
        "STEP=",
        "on_preempt() {",
        '    [ "$PREEMPTED" = 1 ] && return',
        "    PREEMPTED=1",
        f'    echo "[silkie] SIG{signal_name}: asking the workers to save a checkpoint and stop"',
        '    [ -n "$STEP" ] && kill -USR1 "$STEP" 2>/dev/null',
        "}",
        f"trap on_preempt {signal_name}",
        "trap 'echo \"[silkie] SIGTERM (scancel or preemption): the workers save a checkpoint and stop\"' TERM",
        "",
        f'rm -f "$WORKING/{ERROR_NAME}"  # an input error of an earlier job (the recipe may have been fixed since)',
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        f"    {_torchrun_line(recipe, working, layout, python)} &",
        "STEP=$!",
        '[ "$PREEMPTED" = 1 ] && kill -USR1 "$STEP" 2>/dev/null',
        "while :; do",
        '    wait "$STEP"; status=$?',
        '    kill -0 "$STEP" 2>/dev/null || break  # wait returns early when a trapped signal arrives',
        "done",
        "",
        f'if [ -e "$WORKING/{FINISHED_NAME}" ]; then',
        '    echo "[silkie] finished: adapter in $WORKING/adapter"',
        "    exit 0",
        "fi",
        'last=$(ls -d "$WORKING"/checkpoint-* 2>/dev/null | sort -V | tail -n1)',
        'if [ "$PREEMPTED" = 1 ]; then',
        *_after_signal_lines(slurm.requeue, signal_name),
        "fi",
        f'if [ -e "$WORKING/{ERROR_NAME}" ]; then  # bad input: a requeue would stop the same way',
        f'    echo "error: $(cat "$WORKING/{ERROR_NAME}")"',
        '    echo "[silkie] training stopped on this input error; fix it and launch again"',
        "    exit 2",
        "fi",
        'echo "[silkie] training exited with status $status before finishing (last checkpoint: ${last:-none})"',
        "exit $(( status > 0 ? status : 1 ))",
        "",
    ]
    return "\n".join(lines)


def active_jobs(working: str | Path) -> list[str]:
    """Ids of this run's earlier jobs (DIR/slurm/<id>.sh) that are still queued or running."""
    ids = [p.stem for p in Path(working, SLURM_DIR).glob("*.sh") if p.stem.isdigit()]
    if not ids or shutil.which("squeue") is None:
        return []
    listing = subprocess.run(
        ["squeue", "-h", "-o", "%i", "-u", getpass.getuser()], capture_output=True, text=True, timeout=60
    )
    if listing.returncode != 0:  # not knowing must not allow a second job on the same run
        reason = " ".join(listing.stderr.split()) or f"exit code {listing.returncode}"
        raise LaunchError(
            f"squeue failed ({reason}): cannot tell whether job {', '.join(ids)} of {working} still runs; retry when "
            "squeue works"
        )
    queued = set(listing.stdout.split())
    return sorted((i for i in ids if i in queued), key=int)


RESOURCE_KEYS = {  # #SBATCH option -> the recipe key that writes it
    "--gres": "--gpus / slurm.gpus_per_node",
    "--cpus-per-gpu": "slurm.cpus_per_gpu",
    "--mem-per-gpu": "slurm.mem_per_gpu",
    "--partition": "slurm.partition",
    "--constraint": "slurm.constraint",
    "--time": "slurm.time",
    "--qos": "slurm.qos",
    "--account": "slurm.account",
}
_NODE_SHAPE = ("--gres", "--cpus-per-gpu", "--mem-per-gpu", "--partition", "--constraint")
RESOURCE_REFUSALS = {  # words of sbatch's refusal -> the options that can cause it
    "node configuration is not available": _NODE_SHAPE,
    "more processors requested": _NODE_SHAPE,
    "invalid generic resource": ("--gres",),
    "memory specification": ("--mem-per-gpu",),
    "time limit": ("--time",),
    "invalid partition": ("--partition",),
    "invalid qos": ("--qos",),
    "invalid feature": ("--constraint",),
    "invalid account": ("--account",),
}


def _resource_hint(script: str, reason: str) -> str:
    """For a refusal about resources: what the job asked for that can cause it, each with its recipe key."""
    causes = next((options for words, options in RESOURCE_REFUSALS.items() if words in reason.lower()), ())
    asked, extra = [], False
    for line in script.splitlines():
        option, _, value = line.removeprefix("#SBATCH ").partition("=")
        if line.startswith("#SBATCH ") and option in causes:
            asked.append(f"{option}={value} ({'slurm.extra_sbatch' if extra else RESOURCE_KEYS[option]})")
        extra = extra or line in ("#SBATCH --requeue", "#SBATCH --no-requeue")  # slurm.extra_sbatch comes after
    return f"; the job asks for {', '.join(asked)}" if asked else ""


def submit(script: str, working: str | Path) -> tuple[str, Path, Path]:
    """Write the script to DIR/slurm/, `sbatch` it; returns (job id, script path, log path)."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: Slurm is not installed here (run without --gpus to train locally)")
    folder = Path(working).resolve() / SLURM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pending = folder / f"submit-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sh"
    pending.write_text(script)
    pending.chmod(0o755)
    result = subprocess.run(["sbatch", "--parsable", str(pending)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pending.unlink()
        reason = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        hint = _resource_hint(script, reason)
        raise LaunchError(f"sbatch refused the job ({reason}){hint}; --dry-run prints the script")
    match = re.match(r"^(\d+)", result.stdout.strip())
    if not match:
        raise LaunchError(f"could not read a job id from sbatch's answer {result.stdout.strip()!r}")
    job_id = match.group(1)
    script_path = folder / f"{job_id}.sh"
    pending.rename(script_path)
    return job_id, script_path, folder / f"{job_id}.log"


def job_state(job_id: str) -> tuple[str | None, str]:
    """(JobState, ExitCode) from scontrol, or from sacct once the controller forgot the job; None if unknown."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if shown.returncode == 0:
        fields = dict(part.split("=", 1) for part in shown.stdout.split() if "=" in part)
        return fields.get("JobState"), fields.get("ExitCode", "")
    if shutil.which("sacct"):
        acct = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"], capture_output=True, text=True
        )
        rows = [line.split("|") for line in acct.stdout.splitlines() if "|" in line]
        if acct.returncode == 0 and rows:
            return rows[-1][0].split()[0], rows[-1][1]
    return None, ""


def stream_job(job_id: str, log_path: Path, poll_s: float = 2.0) -> tuple[str | None, str]:
    """Print the job's log as it grows until the job ends (requeues included); its (state, exit code). Ctrl-C
    stops following (KeyboardInterrupt), not the job."""
    offset = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a read may end inside a character
    while True:
        state, exit_code = job_state(job_id)
        offset = _stream(log_path, offset, decoder)
        if state is None or state in FINAL_STATES:
            break
        time.sleep(poll_s)
    _stream(log_path, offset, decoder)
    return state, exit_code


def follow(job_id: str, log_path: Path, working: str | Path, poll_s: float = 2.0) -> int:
    """Stream the training job's log until it ends; 0 only when the run is FINISHED."""
    working = Path(working)
    try:
        state, exit_code = stream_job(job_id, log_path, poll_s)
    except KeyboardInterrupt:
        print(f"\n[launch] stopped following job {job_id}; it keeps running (scancel {job_id} stops it)", flush=True)
        return 130
    if (working / FINISHED_NAME).exists():
        news.info(f"job {job_id} {state or 'ended'}: finished, adapter in {working / ADAPTER_DIR}")
        return 0
    notes.info(
        f"job {job_id} ended {state or 'in an unknown state'} (exit code {exit_code or '?'}) "
        f"without finishing; {checkpoint_status(working)}; log: {log_path}"
    )
    return 1


def _stream(path: Path, offset: int, decoder: codecs.IncrementalDecoder) -> int:
    """Print what was appended to `path` since `offset`; returns the new offset."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return offset
    if chunk:
        sys.stdout.write(decoder.decode(chunk))
        sys.stdout.flush()
    return offset + len(chunk)
