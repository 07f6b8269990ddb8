"""Data-pipeline benchmark: pairs/s of building + tokenizing N synthetic VLFeedback instructions, cold and cached.

Example (the figures in docs/benchmarks.md): python scripts/benchmark_data.py --n 20000 --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="synthetic instructions")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=None, help="where data, tokenizer and cache go (default: tmp)")
    args = parser.parse_args(argv)

    from silkie.config import DataSection
    from silkie.data.build import prepare_data
    from silkie.dev.synthetic import write_synthetic_vlfeedback
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint
    from silkie.models.qwen_vl import QWenTokenizer

    root = args.workdir or Path(tempfile.mkdtemp(prefix="silkie-databench-"))
    data_dir, model_dir = root / "vlfeedback", root / "tiny-qwen-vl"
    write_synthetic_vlfeedback(data_dir, n=args.n, seed=0)
    build_tiny_checkpoint(model_dir)
    tokenizer = QWenTokenizer.from_pretrained(model_dir)
    section = DataSection(
        path=str(data_dir / "vlfeedback_80k.jsonl"), images=str(data_dir / "merged_images.zip"), num_proc=args.num_proc
    )
    timings = {}
    for label in ("cold", "cached"):
        start = time.perf_counter()
        prepared = prepare_data(section, tokenizer, args.max_length, root / "cache")
        timings[label] = time.perf_counter() - start
    pairs = len(prepared.train)
    report = {
        "instructions": args.n,
        "pairs": pairs,
        "num_proc": args.num_proc,
        "cold_seconds": round(timings["cold"], 2),
        "cached_seconds": round(timings["cached"], 2),
        "cold_pairs_per_second": round(pairs / timings["cold"]),
        "cached_pairs_per_second": round(pairs / timings["cached"]),
    }
    print(json.dumps(report))
    return report
