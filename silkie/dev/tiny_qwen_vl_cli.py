"""Write a tiny random Qwen-VL-Chat checkpoint folder (official format) for tests and the demo."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="folder to write (config.json, model.safetensors, qwen.tiktoken)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE ranks of the tiny vocabulary")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=56, help="ViT input size in pixels (multiple of 14)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--official-size", action="store_true", help="Qwen-VL-Chat's architecture (9.6B, bf16) with random weights"
    )
    parser.add_argument("--device", default="cpu", help="where to create the weights (cuda is much faster)")
    args = parser.parse_args(argv)

    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    try:
        out = build_tiny_checkpoint(
            args.out_dir,
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            layers=args.layers,
            image_size=args.image_size,
            seed=args.seed,
            official_size=args.official_size,
            device=args.device,
        )
    except ValueError as err:  # sizes the config refuses, said by the config check (nothing was written)
        parser.error(str(err))
    print(f"tiny Qwen-VL checkpoint written to {out}")
    return 0
