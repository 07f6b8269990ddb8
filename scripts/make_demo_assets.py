#!/usr/bin/env python
"""Create the demo's stand-ins: a tiny Qwen-VL-Chat checkpoint and a synthetic VLFeedback release.

Writes OUT/tiny-qwen-vl/ (config.json, model.safetensors, qwen.tiktoken) and OUT/vlfeedback/
(vlfeedback_80k.jsonl, merged_images.zip). Existing assets are kept (use --force to rebuild).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/assets", help="assets folder (default: runs/assets)")
    parser.add_argument("--n", type=int, default=600, help="synthetic instructions (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the assets exist")
    args = parser.parse_args(argv)

    from silkie.data.synthetic import write_synthetic_vlfeedback
    from silkie.models.qwen_vl.tiny import build_tiny_checkpoint

    out = Path(args.out)
    model_dir, data_dir = out / "tiny-qwen-vl", out / "vlfeedback"
    if args.force or not (model_dir / "model.safetensors").is_file():
        build_tiny_checkpoint(model_dir, seed=args.seed)
        print(f"tiny checkpoint: {model_dir}")
    if args.force or not (data_dir / "merged_images.zip").is_file():
        summary = write_synthetic_vlfeedback(data_dir, n=args.n, seed=args.seed)
        print(f"synthetic VLFeedback: {data_dir} ({summary.get('rows', args.n)} rows)")
    print(f"demo assets ready in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
