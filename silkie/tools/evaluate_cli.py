"""Reward accuracy, mean margin and chosen/rejected rewards of a trained run on its held-out pairs.

Rebuilds the run's train/eval split from RUN/config.yaml (same data, pair rules and seed), scores each pair
with the policy (base + adapter) and the reference (adapter disabled; the base checkpoint for a full
fine-tuning run), rewards = beta * (policy - reference) answer log-probs with the recipe's beta.
Prints a table and writes JSON (default RUN/eval_pairs_<split>.json).

Example: python scripts/evaluate_pairs.py --run runs/demo --split eval
"""

from __future__ import annotations

import argparse
from pathlib import Path

from silkie.tools.cli import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (holds config.yaml and adapter/)")
    parser.add_argument("--adapter", help="adapter folder to score (default RUN/adapter)")
    parser.add_argument("--model", help="base checkpoint folder (default: the recipe's model.path)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval", help="which side of the split (eval)")
    parser.add_argument("--batch-size", type=int, help="pairs per batch (default: per_device_eval_batch_size)")
    parser.add_argument("--max-pairs", type=int, help="score only the first N pairs of the split")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: GPU when present)")
    parser.add_argument("--out", help="JSON file to write (default RUN/eval_pairs_<split>.json)")
    parser.add_argument("--per-pair", action="store_true", help="include every pair's log-probs in the JSON")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_pairs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON."""
    from silkie.tools.evaluate import evaluate_run, format_table, write_json

    result = evaluate_run(
        args.run,
        adapter_dir=args.adapter,
        split=args.split,
        batch_size=args.batch_size,
        model_dir=args.model,
        device=args.device,
        max_pairs=args.max_pairs,
    )
    out = write_json(result, args.out or Path(args.run) / f"eval_pairs_{args.split}.json", per_pair=args.per_pair)
    print(format_table(result))
    print(f"written: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0, or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))
