"""Plot a run's training curves (loss, reward accuracy, margins, chosen/rejected rewards; train and eval).

Reads RUN_DIR/metrics.jsonl and writes a PNG (default RUN_DIR/training_curves.png).

Example: python scripts/plot_metrics.py runs/demo --out curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from silkie.tools.cli import ToolError, require_dir, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default RUN_DIR/training_curves.png)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Write the figure and print its path."""
    from silkie.train.plots import plot_metrics

    run_dir = require_dir(args.run_dir, "run directory")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        out = plot_metrics(run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        raise ToolError(str(err)) from err
    print(f"plot: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0, or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))
