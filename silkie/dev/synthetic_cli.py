"""Write a tiny synthetic VLFeedback release (`vlfeedback_80k.jsonl` + `merged_images.zip`) to OUT.

Usage: python scripts/make_synthetic_vlfeedback.py OUT --n 2000 [--seed 0] [--image-size 56] [--bad-rows 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of clean instructions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=56, help="square image side in pixels")
    parser.add_argument("--bad-rows", type=int, default=0, help="extra broken rows (missing image, N/A, ...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Generate the files and print a one-line JSON summary."""
    from silkie.dev.synthetic import write_synthetic_vlfeedback

    args = parse_args(argv)
    start = time.perf_counter()
    summary = write_synthetic_vlfeedback(
        args.out, n=args.n, seed=args.seed, image_size=args.image_size, bad_rows=args.bad_rows
    )
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary))
    return summary
