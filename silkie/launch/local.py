"""Local launch: `torchrun --standalone` with one process per visible GPU (or N gloo processes on CPU).

Torch-free: GPUs are counted from `CUDA_VISIBLE_DEVICES` or `nvidia-smi -L`, and torchrun is started on the
launcher's Python through `torchrun_entry.py` (torchrun itself, minus its traceback after a one-line input error).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from silkie.config import Recipe
from silkie.logs import LAUNCH, LAUNCH_STDOUT, get_logger
from silkie.run_dir import ADAPTER_DIR, CONFIG_NAME, ERROR_NAME, FINISHED_NAME, describe_resume, resume_plan

from .workdir import EXIT_USAGE, LaunchError

notes, news = get_logger(LAUNCH), get_logger(LAUNCH_STDOUT)  # notes on stderr, what the user follows on stdout
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train_dpo.py"
TORCHRUN_ENTRY = Path(__file__).resolve().with_name("torchrun_entry.py")  # torchrun, quiet after an input error
# torchrun turns these into a clean shutdown that forwards the same signal to every worker; the workers
# (silkie.train.preemption.PreemptionCallback) answer SIGUSR1 and SIGTERM with checkpoint-and-exit-0.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
LOCAL_SHUTDOWN_TIMEOUT_S = 120
SIGNAL_FORWARDING_TORCH = (2, 9)  # the first torchrun that forwards SIGUSR1 to its workers


def torchrun_env(shutdown_timeout: int) -> dict[str, str]:
    """torchrun's signal forwarding and shutdown grace as environment variables: `--signals_to_handle` and
    `--shutdown_timeout` read them (PET_*), and a torch without those flags still starts (flags would fail it)."""
    return {
        "PET_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS,
        "PET_SHUTDOWN_TIMEOUT": str(shutdown_timeout),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout),  # read by torch versions before the flag
    }


def signal_forwarding_warning() -> str | None:
    """A warning when the installed torch's torchrun cannot forward SIGUSR1 (read without importing torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("torch")
    except PackageNotFoundError:
        return None
    numbers = [int(part) for part in installed.split("+")[0].split(".")[:2] if part.isdigit()]
    if len(numbers) == 2 and tuple(numbers) < SIGNAL_FORWARDING_TORCH:
        return (
            f"torch {installed}: torchrun forwards SIGUSR1 only from torch 2.9, so Slurm's pre-timeout signal "
            "(and scancel --signal=USR1) stops the job without a fresh checkpoint; it resumes from the last saved one"
        )
    return None


@dataclass
class LocalPlan:
    """A resolved local launch: the environment changes and the torchrun command line."""

    nproc: int  # 0: one per GPU of the machine the command runs on (a dry run where none is visible)
    cpu: bool
    env: dict[str, str]
    command: list[str]
    warning: str | None = None  # a dry run's note that this machine could not run the command as it stands


def visible_gpus() -> int:
    """GPUs this process may use: `CUDA_VISIBLE_DEVICES` when set, else `nvidia-smi -L` (0 without it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return 0 if not ids or ids[0] == "-1" else len(ids)
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if listing.returncode != 0:
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def train_command(working: str | Path) -> list[str]:
    """The per-process entry: always the run directory's own recipe, so a resume reads the same one."""
    if not TRAIN_SCRIPT.is_file():
        raise LaunchError(f"train_dpo.py not found next to the silkie package ({TRAIN_SCRIPT})")
    return [str(TRAIN_SCRIPT), "--config", str(Path(working) / CONFIG_NAME), "--working", str(working)]


def cpu_threads(nproc: int) -> int:
    """OpenMP threads per process so that `nproc` CPU processes share this machine's cores."""
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def plan_local(recipe: Recipe, working: str | Path, dry_run: bool = False) -> LocalPlan:
    """Pick the process count and backend from the recipe's `launch:` section and the visible GPUs (a dry run on a
    machine without them, e.g. a login node, plans `launch.nproc_per_node` GPUs and warns)."""
    launch = recipe.launch
    env: dict[str, str] = {}
    warning = None
    if launch.cpu:
        nproc = launch.nproc_per_node or 1
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU mode: gloo processes even where GPUs exist
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(cpu_threads(nproc))
    else:
        gpus = visible_gpus()
        nproc = launch.nproc_per_node or gpus
        if gpus == 0 and dry_run:  # nproc 0: torchrun's `gpu`, one process per GPU of the machine it runs on
            many = f"{nproc} GPU process(es)" if nproc else "one process per GPU"
            warning = f"no GPU is visible here; the command below starts {many} on a machine with them"
        elif gpus == 0:
            raise LaunchError(
                "no GPU is visible (CUDA_VISIBLE_DEVICES / nvidia-smi -L); "
                "add launch.cpu=true to train with gloo processes on the CPU"
            )
        elif nproc > gpus:
            raise LaunchError(f"launch.nproc_per_node = {nproc} but only {gpus} GPU(s) are visible")
    env.update(torchrun_env(LOCAL_SHUTDOWN_TIMEOUT_S))
    command = [sys.executable, str(TORCHRUN_ENTRY), "--standalone", "--nproc_per_node", str(nproc or "gpu")]
    command += train_command(working)
    return LocalPlan(nproc, launch.cpu, env, command, warning)


def format_command(plan: LocalPlan) -> str:
    """The command line as a shell would run it (environment assignments first)."""
    assignments = [f"{key}={shlex.quote(value)}" for key, value in plan.env.items()]
    return " ".join([*assignments, shlex.join(plan.command)])


def lock_run_dir(working: Path) -> int | None:
    """An exclusive lock on `working` for one launch (flock on the folder, released when every holder exits);
    returns the descriptor, or None where the filesystem has no flock (warned). LaunchError when another launch
    holds it."""
    fd = os.open(working, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holders = lock_holders(working)
            who = f" (held by {'; '.join(holders)})" if holders else ""
            raise LaunchError(
                f"another launch is training in {working}{who}; wait for it to end or stop it (two runs in one folder "
                "would write the same checkpoints)"
            ) from None
        notes.warning(f"cannot lock {working} here ({err.strerror}); make sure no other launch trains there")
        return None
    return fd


def lock_holders(working: Path) -> list[str]:
    """The live processes holding `working` open, as `pid (command)`: the launch and the torchrun that inherited
    its lock (Linux /proc; empty elsewhere or when they cannot be read)."""
    target = os.path.realpath(working)
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if not any(os.path.realpath(fd) == target for fd in fd_dir.iterdir()):
                continue
            command = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # another user's process, or it just ended
            continue
        pid = int(fd_dir.parent.name)
        if pid != os.getpid():
            shown = command if len(command) <= 200 else command[:200] + " ..."  # a long command is cut, and marked so
            found.append((pid, f"PID {pid} ({shown})" if command else f"PID {pid}"))
    return [entry for _, entry in sorted(found)[:3]]


def check_not_running(working: Path) -> None:
    """LaunchError when a local launch is training in `working` now."""
    if working.is_dir():
        fd = lock_run_dir(working)
        if fd is not None:
            os.close(fd)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc; empty where there is none)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if fields and fields[1] == str(pid):
            children.append(int(stat.parent.name))
    return children


def run_local(plan: LocalPlan, working: str | Path, lock: int | None = None) -> int:
    """Run torchrun in its own process group; Ctrl-C/SIGTERM are forwarded to it. Returns the exit code.

    torchrun passes the signal to its workers, which save a checkpoint after the current step and stop (at once
    when training has not begun); a second Ctrl-C goes to the workers themselves, which then stop at once.
    `lock` (from `lock_run_dir`) passes to torchrun: the folder stays locked while training runs, even if this
    launcher is killed."""
    working = Path(working)
    env = {**os.environ, **plan.env}
    try:
        proc = subprocess.Popen(plan.command, env=env, start_new_session=True, pass_fds=() if lock is None else (lock,))
    finally:
        if lock is not None:
            os.close(lock)
    received: list[int] = []

    def forward(signum: int, frame) -> None:
        if not received:
            received.append(signum)
            news.info(
                f"{signal.Signals(signum).name}: the workers save a checkpoint after this step and stop"
                + (
                    " (at once if training has not begun; Ctrl-C again: stop now, without it)"
                    if signum == signal.SIGINT
                    else ""
                )
            )
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass
            return
        if signum == signal.SIGINT and len(received) == 1:
            # torchrun is already shutting its workers down (a second signal to it would orphan them): tell them
            received.append(signum)
            news.info("SIGINT again: the workers stop now")
            for pid in _children(proc.pid):
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            return
        news.info(f"still waiting for the workers to stop (at most {LOCAL_SHUTDOWN_TIMEOUT_S} s)")

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _report(working, code, received[0] if received else None)


def _report(working: Path, code: int, received: int | None) -> int:
    """Tell the user where the run stands; map the outcome to the launcher's exit code."""
    if (working / FINISHED_NAME).exists():
        news.info(f"finished: adapter in {working / ADAPTER_DIR}")
        return 0
    checkpoint, damaged = resume_plan(working, checksums=False)
    intact = describe_resume(checkpoint, damaged)
    resume = "run the same command again to " + ("resume" if checkpoint is not None else "start over")
    error = working / ERROR_NAME
    if received is None and error.is_file():  # bad input: a rerun would stop the same way
        print(f"error: {error.read_text().strip()}", file=sys.stderr, flush=True)
        notes.info(f"training stopped on this input error ({intact}); fix it and launch again")
        return EXIT_USAGE
    if received is not None:
        name = signal.Signals(received).name
        notes.info(f"interrupted ({name}): {intact}; {resume}")
        return 128 + received
    notes.info(f"training stopped with exit code {code} before finishing: {intact}; {resume}")
    return code if code > 0 else 1
