"""Check a downloaded VLFeedback release and optionally convert it to a preference parquet for training; or check a
preference file (ready `chosen`/`rejected` pairs, jsonl/json/parquet, several images or videos per row) as
`data.source: preference` reads it.

Reports rows seen / loaded / skipped per reason (with the first ids), images referenced by the rows that are
missing from the zip or folder, images that fail to decode (a seeded sample, or all with --verify-images),
and preference pairs kept / dropped per reason under the given pair rules (as a recipe with the same
data.aspect_weights / data.min_margin / data.max_pairs_per_prompt / data.rating_rules would build them).

--convert OUT_DIR writes OUT_DIR/vlfeedback_pairs.parquet (columns id, prompt, image, chosen, rejected,
chosen_score, rejected_score; `id` is the prompt id, so the train/eval split stays by prompt). Recipes read it
with:  data.source: preference,  data.path: OUT_DIR/vlfeedback_pairs.parquet,  data.images: the same zip/folder
(the pair rules are already applied; data.aspect_weights / data.min_margin / data.max_pairs_per_prompt are
not used with source: preference). Rows whose image is missing or unreadable are left out.

Exit code: 0, or 1 with --strict when anything was skipped, missing or unreadable; 2 on a usage error.

Example: python scripts/prepare_vlfeedback.py vlfeedback_80k.jsonl merged_images.zip --min-margin 1 \\
    --convert data/vlfeedback --json data/vlfeedback/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from silkie.tools.cli import ToolError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "jsonl",
        help="the release's vlfeedback_80k.jsonl, or a preference file (jsonl/json/parquet, a folder of parquet "
        "shards or a saved dataset)",
    )
    parser.add_argument(
        "images",
        help="merged_images.zip, or a folder of the extracted images (a preference file whose rows hold their "
        "pictures, a datasets Image column: the folder they are written to, as embedded/<hash>, for data.images)",
    )
    parser.add_argument("--convert", metavar="OUT_DIR", help="write OUT_DIR/vlfeedback_pairs.parquet")
    parser.add_argument(
        "--aspect-weights",
        help='e.g. "Helpfulness=1,Visual Faithfulness=2" or JSON; names match by prefix (default: equal)',
    )
    parser.add_argument("--min-margin", type=float, default=0.0, help="drop pairs with a smaller score gap (0)")
    parser.add_argument("--max-pairs-per-prompt", type=int, help="keep at most N pairs per prompt (highest margin)")
    parser.add_argument(
        "--rating-rules",
        choices=("checked", "original"),
        default="checked",
        help="how ratings become pairs, as data.rating_rules: checked (default) or original (the Silkie repository's)",
    )
    parser.add_argument("--verify-images", action="store_true", help="decode every image (default: a sample)")
    parser.add_argument("--sample-images", type=int, default=100, help="images decoded without --verify-images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample (0)")
    parser.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help="a preference file's own column names, as data.columns: e.g. prompt=question,id=idx (history=: not read)",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="the split of a saved dataset or a folder of hub parquet shards, as data.split (train)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when rows or images have problems")
    args = parser.parse_args(argv)
    if args.rating_rules == "original" and args.aspect_weights:
        parser.error("--aspect-weights needs --rating-rules checked (the original rules weigh every aspect equally)")
    if args.min_margin < 0:
        parser.error("--min-margin must be >= 0")
    if args.max_pairs_per_prompt is not None and args.max_pairs_per_prompt < 1:
        parser.error("--max-pairs-per-prompt must be >= 1")
    if args.columns:
        from silkie.config import DataSection
        from silkie.errors import RecipeError

        pairs = [part.partition("=") for part in args.columns.split(",")]
        if any(not sep for _, sep, _ in pairs):
            parser.error(f"--columns {args.columns}: expected FIELD=COLUMN pairs separated by commas")
        args.columns = {field.strip(): column.strip() or None for field, _, column in pairs}  # `history=`: not read
        try:
            DataSection(source="preference", path=args.jsonl, columns=args.columns).check()
        except RecipeError as err:
            parser.error(f"--columns: {str(err).removeprefix('recipe: ')}")
    if args.sample_images < 0:
        parser.error("--sample-images must be >= 0")
    if args.convert and Path(args.convert).exists() and not Path(args.convert).is_dir():
        parser.error(f"--convert {args.convert} is a file; give the folder to write the parquet into")
    return args


def run(args: argparse.Namespace) -> int:
    """Check, print the report, convert and write JSON as asked."""
    from silkie.tools.prepare import (
        PARQUET_NAME,
        PairRules,
        check_release,
        format_report,
        is_preference_file,
        parse_aspect_weights,
        strict_failure,
        write_preference_parquet,
    )

    rules = PairRules(
        aspect_weights=parse_aspect_weights(args.aspect_weights),
        min_margin=args.min_margin,
        max_pairs_per_prompt=args.max_pairs_per_prompt,
        seed=args.seed,
        rating_rules=args.rating_rules,
    )
    if args.convert and is_preference_file(args.jsonl):  # before its media are checked: a mistake, said at once
        raise ToolError(f"--convert: {args.jsonl} already holds pairs; train on it with data.source=preference")
    report, pairs = check_release(
        args.jsonl,
        args.images,
        rules,
        verify_images=args.verify_images,
        sample_images=args.sample_images,
        columns=args.columns,
        split=args.split,
    )
    if args.convert:
        report.converted = str(write_preference_parquet(pairs, Path(args.convert) / PARQUET_NAME))
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    failure = strict_failure(report) if args.strict else None
    if failure:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failure else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0 (1 with --strict and problems), or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))
