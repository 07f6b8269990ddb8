"""`launch_dpo.py`: recipe + overrides -> resolved DIR/config.yaml -> local torchrun or a Slurm job.

Errors (bad recipe, bad --gpus, a refused --working) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from silkie.config import RecipeError, load_recipe
from silkie.config.recipe import read_recipe_file
from silkie.config.training import pairs_per_step
from silkie.errors import os_error_exit
from silkie.logs import LAUNCH, LAUNCH_STDOUT, LEVELS, configure, get_logger
from silkie.run_dir import world_size_problem

from .local import (
    check_not_running,
    format_command,
    lock_run_dir,
    plan_local,
    run_local,
    signal_forwarding_warning,
)
from .preflight import missing_inputs
from .slurm import active_jobs, follow, render_script, slurm_layout, submit
from .workdir import EXIT_USAGE, LaunchError, inspect_workdir, prepare_workdir, undo_prepare

notes, news = get_logger(LAUNCH), get_logger(LAUNCH_STDOUT)  # notes on stderr, so a dry run's stdout is its output
USAGE_EXAMPLES = """
examples:
  python launch_dpo.py --config dpo_config/demo.yaml --working runs/demo
  python launch_dpo.py --config dpo_config/demo.yaml --working runs/demo training.learning_rate=5e-4
  python launch_dpo.py --config dpo_config/X.yaml --working runs/x --gpus 16 --wait   # Slurm, 2 nodes of 8
  python launch_dpo.py --config dpo_config/X.yaml --working runs/x --gpus 16 --dry-run  # print the sbatch script
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The launcher's command line."""
    parser = _Parser(
        description="Launch DPO training from a recipe: locally with torchrun, or on Slurm with --gpus N.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML recipe (dpo_config/*.yaml)")
    parser.add_argument(
        "--working",
        required=True,
        help="run directory (created if missing); a run of the same recipe there resumes from its last checkpoint",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="submit a Slurm job with N GPUs (nodes = N / slurm.gpus_per_node); without it, run on this machine",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command or sbatch script; write nothing")
    parser.add_argument("--wait", action="store_true", help="Slurm: follow the job's log until it ends")
    parser.add_argument(
        "--force",
        action="store_true",
        help="run in a --working that holds another recipe or other files (nothing deleted; old outputs: backup-*/)",
    )
    parser.add_argument(
        "--log-level", choices=LEVELS, default=None, help="silkie's console messages (default: info; also the workers')"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.learning_rate=5e-6")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the launcher; returns the process exit code."""
    args = build_parser().parse_intermixed_args(argv)  # flags may follow overrides
    configure(args.log_level)
    try:
        return _launch(args)
    except (RecipeError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\n[launch] interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        return os_error_exit(err, EXIT_USAGE)


def _launch(args: argparse.Namespace) -> int:
    if args.gpus is not None and args.gpus < 1:
        raise LaunchError(f"--gpus must be a positive integer, got {args.gpus}")
    recipe = load_recipe(args.config, args.overrides)
    working = Path(args.working)
    _, translation = read_recipe_file(args.config)
    resolved = working / "config.yaml"
    if translation:  # a flat recipe from the Silkie repository: say where each of its keys went
        where = f"a launch writes them to {resolved}" if args.dry_run else f"written to {resolved}"
        _note(f"{args.config} is a flat recipe (the Silkie repository's format); as sections ({where}):")
        for line in translation:
            _note(f"  {line}")
    layout = slurm_layout(args.gpus, recipe.slurm.gpus_per_node) if args.gpus is not None else None
    plan = inspect_workdir(working, recipe, force=args.force)
    if plan.state == "finished":
        news.info(plan.message)
        return 0
    check_not_running(working)  # a local launch training there now
    running = [] if args.dry_run else active_jobs(working)
    if running:
        raise LaunchError(
            f"Slurm job {', '.join(running)} for {working} is still queued or running; wait for it or scancel it"
        )
    local = plan_local(recipe, working, dry_run=args.dry_run) if layout is None else None
    world_size = local.nproc if local is not None else args.gpus
    if plan.resume_from is not None and world_size:  # refused here, before a job waits in the queue only to stop
        problem = world_size_problem(plan.resume_from, world_size)
        if problem:
            raise LaunchError(problem)
    # a global batch that does not divide: refused here too
    batch = pairs_per_step(recipe.training, world_size) if world_size else "the GPU count sets the global batch"
    missing = missing_inputs(recipe)  # refused for a local launch; a dry run and a Slurm job (whose nodes may see
    if local is not None:  # paths this machine does not) warn
        if missing and not args.dry_run:
            raise LaunchError("; ".join(missing))
        _warn(missing)
        if local.warning:
            notes.warning(local.warning)
        if args.dry_run:
            kind = "CPU (gloo)" if local.cpu else "GPU"
            processes = f"{local.nproc} {kind} process(es)" if local.nproc else "one process per GPU"
            _note(f"dry run: {plan.message}; {processes}, {batch}")
            _note(_DRY_RUN_WRITES.format(resolved=resolved, what="command"))
            print(format_command(local))
            return 0
        _note(plan.message)
        created = not working.exists()
        working.mkdir(parents=True, exist_ok=True)
        try:  # held from before the --force renames until training ends
            lock = lock_run_dir(working)
        except LaunchError:
            if created:
                working.rmdir()
            raise
        prepare_workdir(plan, recipe)
        _note(f"{local.nproc} {'CPU (gloo)' if local.cpu else 'GPU'} process(es), {batch}: {format_command(local)}")
        return run_local(local, working, lock)
    script = render_script(recipe, working, layout)
    if recipe.launch.cpu:  # e.g. the demo recipe sent to a cluster
        notes.warning(f"launch.cpu is true: the job books {args.gpus} GPU(s) and hides them from training "
                      "(CUDA_VISIBLE_DEVICES=); set launch.cpu=false to train on them")  # fmt: skip
    _warn(missing)
    warning = signal_forwarding_warning()
    if warning:
        notes.warning(warning)
    if args.dry_run:
        _note(f"dry run: {plan.message}; {layout.nodes} node(s) x {layout.gpus_per_node} GPU(s), {batch}")
        _note(_DRY_RUN_WRITES.format(resolved=resolved, what="script"))
        print(script, end="")
        return 0
    _note(plan.message)
    created = not working.exists()
    prepare_workdir(plan, recipe)
    try:
        job_id, script_path, log_path = submit(script, working)
    except LaunchError:
        undo_prepare(plan, created)
        raise
    news.info(f"submitted job {job_id}: {layout.nodes} node(s) x {layout.gpus_per_node} GPU(s), {batch}")
    news.info(f"script: {script_path}")
    news.info(f"log: {log_path}")
    if args.wait:
        return follow(job_id, log_path, working)
    return 0


_DRY_RUN_WRITES = (
    "nothing was written: a launch first writes the resolved recipe (file + overrides) to {resolved}, which the "
    "{what} below reads; launch without --dry-run to run it"
)


def _warn(problems: list[str]) -> None:
    for problem in problems:
        notes.warning(problem)


def _note(text: str) -> None:
    """Progress for the user on stderr, so stdout is exactly the command or script in a dry run."""
    notes.info(text)
