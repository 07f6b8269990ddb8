"""Convert InternVL's data meta file (MMPR's `meta.json`: datasets of `{image, question, chosen, rejected}` jsonl
rows, each with its image root and `repeat_time`) into one preference jsonl, and print the recipe keys that read
it (`data.source: preference`, `data.path`, `data.images`: the roots' common folder). For
`dpo_config/mpo_internvl3.yaml`.

Example: silkie internvl-meta MMPR/meta.json --out data/mmpr_pairs.jsonl
"""

from __future__ import annotations

import argparse

from silkie.tools.cli import require_writable, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("meta", help="the meta JSON file (MMPR's meta.json)")
    parser.add_argument("--out", required=True, help="the preference jsonl to write")
    parser.add_argument(
        "--base",
        help="folder the meta file's relative paths start from (default: the first of the current folder, the "
        "meta file's folder and its parent that holds the annotation files)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the share drawn for repeat_time < 1 (0)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Convert and print the report."""
    from silkie.tools.internvl_meta import convert_meta, format_meta_report

    require_writable(args.out, "--out")
    report = convert_meta(args.meta, args.out, args.base, args.seed)
    print(format_meta_report(report, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0, or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))
