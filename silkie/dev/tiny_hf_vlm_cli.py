"""Write a tiny random Hugging Face-format VLM folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL MoE, LLaVA-1.5,
InternVL or Gemma 3) for tests and demos."""

from __future__ import annotations

import argparse

from silkie.config.names import FAMILIES as ALL_FAMILIES

FAMILIES = tuple(family for family in ALL_FAMILIES if family != "qwen_vl")  # qwen_vl: `silkie tiny-qwen-vl`


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer, processor)")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl", help="model family to imitate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)

    from silkie.dev.tiny_builders import tiny_builder

    build = tiny_builder(args.family)
    out = build(args.out_dir, seed=args.seed)
    print(f"tiny {args.family} checkpoint written to {out}")
    return 0
