"""Create the demos' stand-ins: tiny checkpoints of each model family and a synthetic VLFeedback release.

Writes OUT/tiny-qwen-vl/ (config.json, model.safetensors, qwen.tiktoken), OUT/tiny-qwen2-vl/, OUT/tiny-qwen2.5-vl/,
OUT/tiny-qwen3-vl/, OUT/tiny-qwen3-vl-moe/, OUT/tiny-llava/, OUT/tiny-internvl/, OUT/tiny-gemma3/, OUT/tiny-gemma4/,
OUT/tiny-qwen3.5/, OUT/tiny-qwen3.5-moe/ (Hugging Face folders: config, weights, tokenizer, processor, chat
template), OUT/vlfeedback/ (vlfeedback_80k.jsonl, merged_images.zip) and OUT/two_pictures/ (a two-images-per-pair
preference set: two_pictures.jsonl, two_pictures.zip). Existing assets are kept (use --force to rebuild).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from silkie.dev.tiny_builders import TINY_FOLDERS, tiny_builder
from silkie.logs import ignore_known_warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/assets", help="assets folder (default: runs/assets)")
    parser.add_argument("--n", type=int, default=600, help="synthetic instructions (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the assets exist")
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(TINY_FOLDERS),
        choices=list(TINY_FOLDERS),
        help="tiny checkpoints to build",
    )
    args = parser.parse_args(argv)
    ignore_known_warnings()

    from silkie.dev.synthetic import write_synthetic_vlfeedback

    out = Path(args.out)
    data_dir = out / "vlfeedback"
    for family in args.families:
        model_dir = out / TINY_FOLDERS[family]
        if args.force or not (model_dir / "model.safetensors").is_file():
            tiny_builder(family)(model_dir, seed=args.seed)
            print(f"tiny {family} checkpoint: {model_dir}")
    if args.force or not (data_dir / "merged_images.zip").is_file():
        summary = write_synthetic_vlfeedback(data_dir, n=args.n, seed=args.seed)
        print(f"synthetic VLFeedback: {data_dir} ({summary.get('rows', args.n)} rows)")
    from silkie.dev.two_pictures import ZIP_NAME, write_two_picture_pairs

    if args.force or not (out / "two_pictures" / ZIP_NAME).is_file():
        summary = write_two_picture_pairs(out / "two_pictures", seed=args.seed)
        print(f"two-picture preference pairs: {out / 'two_pictures'} ({summary['rows']} rows)")
    print(f"demo assets ready in {out}")
    return 0
