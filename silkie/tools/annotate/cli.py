"""Build your own VLFeedback: `silkie annotate sample` (a pool of models answers your instructions), `silkie annotate
judge` (a judge rates every answer on Helpfulness, Visual Faithfulness and Ethical Considerations, 1-5), then the
folder holds a release in VLFeedback's format (`release/vlfeedback_80k.jsonl` + `release/merged_images.zip`) that
`data.source: vlfeedback` and `silkie prepare` read as they read the published one.

Every stage resumes: rerun the same command after an interruption and it skips what is done (answers per
(instruction, model), ratings per instruction). Instructions: a jsonl of {"id", "prompt" (or "instruction"),
"image" (a path under --images; default merged_images/<id>.jpg)}.

`silkie annotate rounds --config rounds.yaml --working DIR` iterates on-policy: the current policy (+ the pool)
answers, the judge rates, DPO trains from the policy, the adapter is merged into the next round's policy.

`silkie annotate serve --model DIR [--adapter A] --port 8000` puts a local checkpoint behind an OpenAI-compatible
endpoint (judge.kind: openai, base_url: http://HOST:8000/v1) where vLLM is not installed.

Example:
  silkie annotate sample --pool pool.yaml --instructions my.jsonl --images my_images/ --out data/mine
  silkie annotate judge --judge judge.yaml --in data/mine
  python launch_dpo.py --config dpo_config/silkie.yaml --working runs/mine \\
      data.path=data/mine/release/vlfeedback_80k.jsonl data.images=data/mine/release/merged_images.zip
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from silkie.tools.cli import ToolError, read_config, run_cli

log = logging.getLogger("silkie.annotate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the three stages."""
    parser = argparse.ArgumentParser(
        prog="silkie annotate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stages = parser.add_subparsers(dest="stage", required=True)
    sample = stages.add_parser("sample", help="answer each instruction with k models of the pool")
    sample.add_argument("--pool", required=True, help="pool.yaml: models (path, name, adapter, decoding), k, seed")
    sample.add_argument("--instructions", required=True, help='jsonl of {"id", "prompt", "image"}')
    sample.add_argument("--images", required=True, help="folder or zip the image paths are relative to")
    sample.add_argument("--out", required=True, help="the annotation folder (created; reused on a rerun)")
    sample.add_argument("--limit", type=int, help="only the first N instructions (fixed at the first run)")
    sample.add_argument("--processes", type=int, default=1, help="answer in N processes, one shard each (1)")
    sample.add_argument("--devices", help="with --processes: one CUDA device per process, e.g. 0,1,2,3")
    sample.add_argument("--gpus", type=int, help="answer on Slurm: one shard per GPU on N / slurm.gpus_per_node nodes")
    sample.add_argument("--dry-run", action="store_true", help="with --gpus: print the batch script, submit nothing")
    sample.add_argument("--wait", action="store_true", help="with --gpus: follow the job's log until it ends")
    sample.add_argument("--shard", help=argparse.SUPPRESS)  # I/N: set by --processes for each child
    judge = stages.add_parser("judge", help="rate the answers with the judge, then write the release")
    judge.add_argument("--judge", required=True, help="judge.yaml: kind openai|local|python, model, endpoint, ...")
    judge.add_argument("--in", dest="folder", required=True, help="the annotation folder `sample` wrote")
    judge.add_argument("--retry-failed", action="store_true", help="judge again the instructions that failed")
    judge.add_argument("--device", default="auto", help="a local judge's device (auto: GPU when present)")
    rounds = stages.add_parser("rounds", help="on-policy rounds: policy samples, judge rates, DPO; N times")
    rounds.add_argument("--config", required=True, help="rounds.yaml: recipe, instructions, images, judge, pool, N")
    rounds.add_argument("--working", required=True, help="the rounds' folder (round-1/, round-2/, ..., rounds.json)")
    stages.add_parser("serve", help="a local checkpoint as an OpenAI-compatible endpoint (serve --help)")
    release = stages.add_parser("release", help="(re)write the release and summary from what is rated")
    release.add_argument("--in", dest="folder", required=True, help="the annotation folder")
    for stage in (sample, judge, release, rounds):
        stage.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _instructions(folder: Path) -> list:
    from silkie.tools.annotate.files import INSTRUCTIONS, Instruction, read_jsonl

    if not (folder / INSTRUCTIONS).is_file():
        raise ToolError(f"{folder} holds no {INSTRUCTIONS}: run `silkie annotate sample --out {folder}` first")
    return [Instruction(**row) for row in read_jsonl(folder / INSTRUCTIONS)]


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ToolError(f"--shard {text}: expected I/N with 0 <= I < N")
    return int(index), int(count)


def run(args: argparse.Namespace) -> int:
    """Run one stage and print its summary as JSON (the only thing on stdout: libraries' prints go to stderr)."""
    if args.stage == "sample" and args.gpus is not None:
        return submit_sampling(args)
    with contextlib.redirect_stdout(sys.stderr):
        result = _stage(args)
    print(json.dumps(result, indent=2))
    return 0


def submit_sampling(args: argparse.Namespace) -> int:
    """`sample --gpus N`: check the pool and import the instructions here, then let the launcher write and submit
    the Slurm job (`silkie.launch.sample_job`, in its own process: the launcher is a layer of its own)."""
    import subprocess

    from silkie.config.annotate import load_pool
    from silkie.tools.annotate.files import import_instructions

    if args.processes != 1 or args.devices:
        raise ToolError("--gpus runs one shard per GPU on Slurm: leave out --processes and --devices")
    read_config(load_pool, args.pool)
    if not args.dry_run:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(sys.stderr):
            import_instructions(Path(args.instructions), Path(args.images), out, args.limit)
    command = [sys.executable, "-m", "silkie.launch.sample_job", "--pool", args.pool, "--gpus", str(args.gpus)]
    command += ["--instructions", args.instructions, "--images", args.images, "--out", args.out]
    command += ["--limit", str(args.limit)] if args.limit is not None else []
    command += [flag for flag, on in (("--dry-run", args.dry_run), ("--wait", args.wait)) if on]
    return subprocess.run(command).returncode


def _stage(args: argparse.Namespace) -> Any:
    from silkie.config.annotate import load_judge, load_pool
    from silkie.tools.annotate.release import write_release

    progress = not args.no_progress
    if not progress:  # the libraries' own bars too (loading each pool model's weights)
        from silkie.logs import hide_progress_bars

        hide_progress_bars()
    if args.stage == "rounds":
        from silkie.config.annotate import load_rounds
        from silkie.tools.annotate.rounds import run_rounds

        return run_rounds(read_config(load_rounds, args.config), Path(args.working), progress)
    if args.stage == "sample":
        from silkie.tools.annotate.files import import_instructions
        from silkie.tools.annotate.sample import check_pool_folders, sample_answers

        pool = read_config(load_pool, args.pool)
        check_pool_folders(pool, str(args.pool))  # before a folder is made or a model answers
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        instructions = import_instructions(Path(args.instructions), Path(args.images), out, args.limit)
        if args.processes > 1:
            from silkie.tools.annotate.shards import sample_in_processes

            result = sample_in_processes(args, out)
        else:
            result = sample_answers(pool, instructions, out, progress, shard=_shard(args.shard))
        log.info("answers: %d (%d new) in %s", result["answers"], result["new"], out)
    else:
        out = Path(args.folder)
        instructions = _instructions(out)
        result = {}
        if args.stage == "judge":
            from silkie.tools.annotate.judge import judge_answers
            from silkie.tools.annotate.judges import make_judge

            config = read_config(load_judge, args.judge)
            try:
                result = judge_answers(config, make_judge(config, args.device), instructions, out, args.retry_failed,
                                       progress)  # fmt: skip
            except BaseException:  # a stopped run: the release still holds every rating written so far
                try:
                    write_release(instructions, out)
                except Exception as err:  # (a full disk, say): the reason the run stopped is the one to raise
                    log.warning("release not rewritten after the stop: %s", err)
                raise
        result["summary"] = write_release(instructions, out)
        log.info("release: %s", result["summary"]["release"]["jsonl"])
        if result.get("new") == 0 and result.get("new_failures"):
            raise ToolError(
                f"judge: none of the {result['new_failures']} instructions judged now was rated (the first: "
                f"{result['first_failure'][:300]}); see {out / 'judge_failures.jsonl'}"
            )
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0, or 2 with a one-line error (`serve` has its own options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from silkie.tools.annotate.serve import main as serve

        return serve(argv[1:])
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
