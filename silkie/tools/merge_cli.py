"""Merge a trained LoRA adapter into its base weights and save a standalone checkpoint (every family: Qwen-VL-Chat,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA).

The output folder holds safetensors shards (+ model.safetensors.index.json when sharded), config.json,
generation_config.json and the base's tokenizer files (qwen.tiktoken for Qwen-VL-Chat; the tokenizer and processor
files for the transformers families); it loads like the base (`QWenLMHeadModel.from_pretrained(OUT)`, or the Auto
classes). Use it as a recipe's `model.path` or with `silkie chat --model OUT`. The merge runs in fp32; the weights
are saved in --dtype (bf16 by default, whatever the base's dtype: pass --dtype fp32 to keep an fp32 base's).

Example: silkie merge --base runs/assets/tiny-qwen-vl --adapter runs/demo/adapter --out runs/merged
"""

from __future__ import annotations

import argparse

from silkie.logs import get_logger
from silkie.tools.cli import run_cli

UPDATE_KEPT_WARNING = 0.9  # below this share of the update, the merged weights are not the trained model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base checkpoint folder (the recipe's model.path)")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (RUN/adapter)")
    parser.add_argument("--out", required=True, help="folder to write the merged checkpoint into")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="dtype of the saved weights (bf16); the merge itself runs in fp32 (about 4 bytes of RAM per parameter)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB (5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Merge and report the written files."""
    from silkie.tools.common import DTYPES
    from silkie.tools.merge import merge_adapter

    result = merge_adapter(
        args.base, args.adapter, args.out, DTYPES[args.dtype], args.max_shard_size, overwrite=args.overwrite
    )
    kept = "" if result.update_kept is None else f"; {result.update_kept:.0%} of the adapter's update kept"
    print(f"merged checkpoint: {result.out_dir} ({len(result.shards)} shard(s), {args.dtype}{kept})")
    if result.update_kept is not None and result.update_kept < UPDATE_KEPT_WARNING:
        get_logger(__name__).warning(
            f"{args.dtype} rounded away {1 - result.update_kept:.0%} of the adapter's update (it is small beside the "
            "weights it changes), so the merged model differs from base + adapter; merge with --dtype fp32, or load "
            "the adapter on the base"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0, or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))
