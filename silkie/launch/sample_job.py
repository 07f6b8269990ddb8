"""`silkie annotate sample --gpus N`: the pool answers on Slurm, one shard per GPU across `N / slurm.gpus_per_node`
nodes. The batch script runs `srun` with one task per GPU (each task sees only its own GPU and answers the
instructions at index = task mod N into its own shard file), then merges the shards into answers.jsonl. Every
shard resumes where it stopped, so submitting the job again after a failure, a time limit or a preemption (or a
requeue) redoes only what is missing. The instructions are imported before the job is submitted (by `silkie
annotate sample` itself), so bad input is refused before anything waits in the queue.

Torch-free: it writes and submits a script; the tasks run `python -m silkie annotate sample --shard I/N`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from silkie.config.annotate import load_pool
from silkie.errors import RecipeError
from silkie.logs import LAUNCH, get_logger
from silkie.run_dir import SLURM_DIR

from .slurm import active_jobs, sbatch_options, slurm_layout, stream_job, submit
from .workdir import LaunchError

notes = get_logger(LAUNCH)
SHARD_FILES = "answers.shard-*.jsonl"


def sample_arguments(args: argparse.Namespace) -> list[str]:
    """The `silkie annotate sample` options every task and the merge step repeat (absolute paths)."""
    paths = ("--pool", args.pool), ("--instructions", args.instructions), ("--images", args.images)
    argv = [item for flag, value in paths for item in (flag, str(Path(value).resolve()))]
    argv += ["--out", str(Path(args.out).resolve())]
    return argv + (["--limit", str(args.limit)] if args.limit is not None else [])


def render_sample_script(args: argparse.Namespace, python: str | None = None) -> str:
    """The sbatch script of `silkie annotate sample --gpus N`."""
    pool = load_pool(args.pool)
    layout = slurm_layout(args.gpus, pool.slurm.gpus_per_node)
    out = Path(args.out).resolve()
    command = shlex.join([python or sys.executable, "-m", "silkie", "annotate", "sample", *sample_arguments(args)])
    options = sbatch_options(pool.slurm, layout.nodes, layout.gpus_per_node, layout.gpus_per_node, Path.cwd(),
                             out / SLURM_DIR)  # fmt: skip
    task = (  # Slurm gives every task the node's GPUs: keep the task's own one (by its local rank)
        'if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"; '
        "export CUDA_VISIBLE_DEVICES=${gpus[$SLURM_LOCALID]}; fi; "
        f'exec {command} --shard "$SLURM_PROCID/$SLURM_NTASKS" --no-progress'
    )
    return "\n".join(
        [
            "#!/bin/bash",
            "# silkie annotate sample: the pool answers, one shard per GPU. Submitting it again resumes every shard.",
            *options,
            "",
            "set -o pipefail",
            *(["# environment setup (slurm.setup)", *pool.slurm.setup] if pool.slurm.setup else []),
            'echo "[silkie] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $(date)"',
            f"srun --nodes=$SLURM_NNODES --ntasks-per-node={layout.gpus_per_node} bash -c {shlex.quote(task)}",
            "status=$?",
            'if [ "$status" -ne 0 ]; then',
            '    echo "[silkie] a shard failed (status $status): what was answered is kept; submit again to resume"',
            "    exit $status",
            "fi",
            "# all shards done: merge them into answers.jsonl (prints the summary)",
            f"{command} --no-progress",
            "",
        ]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The `silkie annotate sample` options this job needs (the rest are refused by that command's parser)."""
    parser = argparse.ArgumentParser(prog="silkie annotate sample --gpus N")
    for flag in ("--pool", "--instructions", "--images", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--wait", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write, submit (and with --wait follow) the sampling job; 0 when submitted (or, waiting, when it completed
    with every answer merged). stdout: the script (--dry-run) or the job as JSON."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _submit(args)
    except (LaunchError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _submit(args: argparse.Namespace) -> int:
    script = render_sample_script(args)
    if args.dry_run:
        print(script, end="")
        return 0
    out = Path(args.out)
    running = active_jobs(out)
    if running:
        raise LaunchError(f"Slurm job {', '.join(running)} is still sampling into {out}; wait for it or scancel it")
    job_id, script_path, log_path = submit(script, out)
    notes.info(f"submitted job {job_id}; script: {script_path}; log: {log_path}")
    result = {"job": job_id, "script": str(script_path), "log": str(log_path)}
    if args.wait:
        try:
            state, exit_code = stream_job(job_id, log_path)
        except KeyboardInterrupt:
            notes.info(f"stopped following job {job_id}; it keeps running (scancel {job_id} stops it)")
            return 130
        merged = (out / "answers.jsonl").is_file() and not any(out.glob(SHARD_FILES))
        result.update(state=state, exit_code=exit_code, merged=merged)
        if state != "COMPLETED" or not merged:
            print(json.dumps(result, indent=2))
            notes.info(f"job {job_id} ended {state} (exit code {exit_code or '?'}): submit again to resume")
            return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
