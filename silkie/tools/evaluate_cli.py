"""Reward accuracy, mean margin and chosen/rejected rewards of a trained run on its held-out pairs.

Rebuilds the run's train/eval split from RUN/config.yaml (same data, pair rules and seed), scores each pair
with the policy (base + adapter) and the reference (adapter disabled; the base checkpoint for a full
fine-tuning run), rewards = beta * (policy - reference) answer log-probs with the recipe's beta (the reference-free
cpo, simpo and orpo: beta * the policy's log-probs, per-token averages for simpo and orpo, as in training).
Prints a table and writes JSON (default RUN/eval_pairs_<split>.json).

Example: python scripts/evaluate_pairs.py --run runs/demo --split eval

With --tasks (lmms-eval benchmarks, the `.[eval]` extra): the base model and the DPO model answer each task side by
side; RUN/benchmarks/ gets results.json, table.md (with the paper's rows where they match) and chart.png.

Example: silkie evaluate --run runs/silkie --tasks mme,pope --batch-size 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from silkie.config.names import IMAGE_CORRUPTIONS
from silkie.run_dir import EVAL_PAIRS_PREFIX
from silkie.tools.cli import require_writable, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (holds config.yaml and adapter/)")
    parser.add_argument("--adapter", help="adapter folder to score (default RUN/adapter)")
    parser.add_argument("--model", help="base checkpoint folder (default: the recipe's model.path)")
    parser.add_argument("--ref-model", help="the run's reference checkpoint folder (default: its model.ref_model)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval", help="which side of the split (eval)")
    parser.add_argument("--batch-size", type=int, help="pairs per batch (default: per_device_eval_batch_size)")
    parser.add_argument("--max-pairs", type=int, help="score only the first N pairs of the split")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: GPU when present)")
    parser.add_argument(
        "--out", help="JSON file to write (default RUN/eval_pairs_<split>.json); with --tasks a folder (RUN/benchmarks)"
    )
    parser.add_argument("--per-pair", action="store_true", help="include every pair's log-probs in the JSON")
    parser.add_argument(
        "--image-corruption",
        choices=IMAGE_CORRUPTIONS,
        help="the imageless diagnostics under this corruption instead of the recipe's data.image_corruption (a "
        "vision loss trained on one corruption is tested on another); written to eval_pairs_SPLIT_CORRUPTION.json",
    )
    bench = parser.add_argument_group("benchmarks (lmms-eval)")
    bench.add_argument("--tasks", help="comma-separated lmms-eval tasks (e.g. mme,pope,mmvet): benchmark instead")
    bench.add_argument("--include-path", action="append", default=[], help="a folder of your own task YAMLs")
    bench.add_argument("--limit", type=float, help="documents per task (a fraction when < 1), for a quick look")
    bench.add_argument("--judge-url", help="OpenAI-compatible base URL for GPT-judged tasks (MM-Vet)")
    bench.add_argument("--judge-model", default="gpt-4o-2024-11-20", help="the judge's model name")
    bench.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="variable holding the judge's API key")
    args = parser.parse_args(argv)
    if args.tasks is not None:
        pair_only = [flag for flag, value in (("--split", args.split != "eval"), ("--max-pairs", args.max_pairs),
                                              ("--per-pair", args.per_pair),
                                              ("--image-corruption", args.image_corruption)) if value]  # fmt: skip
        if pair_only or not [t for t in args.tasks.split(",") if t.strip()]:
            parser.error(f"--tasks takes a list of task names and no {', '.join(pair_only) or 'empty list'}")
    elif args.include_path or args.limit is not None or args.judge_url:
        parser.error("--include-path, --limit and --judge-url go with --tasks")
    for name in ("batch_size", "max_pairs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON."""
    from silkie.tools.evaluate import evaluate_run, format_table, write_json

    if args.tasks is not None:
        return run_tasks(args)
    name = f"{EVAL_PAIRS_PREFIX}{args.split}" + (f"_{args.image_corruption}" if args.image_corruption else "")
    out = require_writable(args.out or Path(args.run) / f"{name}.json", "--out")  # checked before the scoring
    result = evaluate_run(
        args.run,
        adapter_dir=args.adapter,
        split=args.split,
        batch_size=args.batch_size,
        model_dir=args.model,
        ref_model_dir=args.ref_model,
        device=args.device,
        max_pairs=args.max_pairs,
        image_corruption=args.image_corruption,
    )
    print(format_table(result))  # before the write: a failed write still shows the scores
    print(f"written: {write_json(result, out, per_pair=args.per_pair)}")
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """The lmms-eval benchmarks of base and DPO model; prints the markdown table."""
    from silkie.tools.benchmarks import JudgeEndpoint, bench_dir, format_markdown, limit_note, run_benchmarks

    require_writable(args.out or bench_dir(Path(args.run), args.limit), "--out", folder=True)  # before the answers
    judge = JudgeEndpoint(args.judge_url, args.judge_model, args.judge_key_env) if args.judge_url else None
    result = run_benchmarks(
        args.run, [t.strip() for t in args.tasks.split(",") if t.strip()], include_path=args.include_path,
        limit=args.limit, batch_size=args.batch_size or 8, device=args.device, adapter_dir=args.adapter,
        model_dir=args.model, judge=judge, out_dir=args.out,
    )  # fmt: skip
    print(format_markdown(result["rows"], f"{result['run']}: base vs DPO{limit_note(args.limit)}"))
    print(f"written: {', '.join(result['files'].values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0, or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))
