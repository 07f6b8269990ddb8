"""`silkie bench` / `scripts/benchmark.py`: DPO training benchmarks side by side (same model, data and device, one
run), every run through its trainer.

Qwen-VL-Chat (`--family qwen_vl`, default): the plain (TRL-equivalent) step vs the optimized step.
Qwen2-VL / Qwen3-VL / LLaVA / InternVL / Gemma 3 (`--family qwen2_vl|qwen3_vl|qwen3_vl_moe|llava|internvl|gemma3`;
with `--tiny` every transformers family, Qwen3.5 and Gemma 4 included): TRL's own `DPOTrainer` vs ours (plain,
optimized, cached reference), each through its trainer. Prints pairs/s, tokens/s, peak memory (with `--count-flops`,
TFLOP/pair and MFU of our runs) per run and batch size, then the ratios against the baseline (plain, or TRL; then
TRL's best against ours).
CPU with the tiny model:  python scripts/benchmark.py --tiny
GPU at Qwen-VL-Chat size: python scripts/benchmark.py --device cuda --dtype bf16 --batch-sizes 2 4 8
TRL vs ours, CPU tiny:     python scripts/benchmark.py --family qwen2_vl --tiny --image-px 112
TRL vs ours, Qwen2-VL-7B shape on a GPU: python scripts/benchmark.py --family qwen2_vl --device cuda --dtype bf16
(`--family qwen3_vl`: Qwen3-VL-8B's shape; `qwen3_vl_moe`: Qwen3-VL-30B-A3B's, an H200's memory; `internvl`:
InternVL3-8B's; `gemma3`: gemma-3-4b-it's; llava: the tiny stand-in only)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from silkie.config.names import FAMILIES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen_vl", choices=FAMILIES)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny stand-in model (default: Qwen-VL-Chat / Qwen2-VL-7B size)"
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["trl", "silkie-plain", "silkie-optimized", "silkie-optimized+cached_ref"],
        metavar="RUN[@BATCH]",
        help="the transformers families: trainers to compare, from trl (TRL's defaults; trl+no_ckpt, trl+liger, "
        "trl+no_ckpt+liger add TRL's own switches), silkie-plain, silkie-optimized, silkie-optimized+cached_ref "
        "(the first one present of trl/silkie-plain is the baseline); @BATCH: only at that batch size",
    )
    parser.add_argument("--image-px", type=int, default=448, help="the transformers families: square picture side")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["plain", "optimized", "optimized+cached_ref"],
        metavar="PATH[@BATCH]",
        help="qwen_vl: plain, optimized, optimized+cached_ref (@BATCH: only at that batch size)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--question-tokens", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=150)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument(
        "--levers",
        nargs="+",
        default=[],
        metavar="LEVER[+LEVER...]",
        help="extra runs on top of the last --paths (qwen_vl) or --runs entry, each with these recipe switches: "
        "flex (qwen_vl), varlen, liger, compile, native_norm (qwen_vl), pack2, pack4, pack8, cached_ref, no_ckpt (no "
        "activation checkpointing), ckpt2, ckpt4 (only every 2nd/4th layer checkpointed) (join with + for several "
        "at once; @BATCH: only at that batch size)",
    )
    parser.add_argument(
        "--attn", default="sdpa", choices=("sdpa", "eager", "flex_attention", "varlen"), help="attention kernel"
    )
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--dataloader-workers",
        type=int,
        default=0,
        metavar="N",
        help="DataLoader worker processes of every run, ours and TRL's alike (the paper recipe uses 4): image "
        "processing and collation then overlap the device's step; 0 (default) does them in the training process, "
        "between steps",
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="answer tokens per log-prob chunk")
    parser.add_argument("--count-flops", action="store_true", help="count FLOPs of one step (for TFLOP/pair, MFU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (auto for H100/H200)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return check_runs(parser.parse_args(argv))


def check_runs(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse, in one line, a run name that is not known or a `@B` outside `--batch-sizes`, before any model is
    built (a card's session is short)."""
    from silkie.dev.bench_levers import check_batch_suffixes, lever_keys, trl_keys

    ours = ("silkie-plain", "silkie-optimized", "silkie-optimized+cached_ref")
    known = ("plain", "optimized", "optimized+cached_ref") if args.family == "qwen_vl" else ours
    names = args.paths if args.family == "qwen_vl" else args.runs
    option = "--paths" if args.family == "qwen_vl" else "--runs"
    for spec in names:
        name = spec.partition("@")[0]
        if name.startswith("trl") and args.family != "qwen_vl":
            trl_keys(name)
        elif name not in known:
            raise SystemExit(f"{option}: unknown {name!r}; expected one of {', '.join(known)}")
    if args.levers and names[-1].partition("@")[0] not in known:
        raise SystemExit(f"--levers: they apply to the last of {option}, which must be one of ours ({names[-1]!r})")
    for spec in args.levers:
        lever_keys(spec.partition("@")[0])
    check_batch_suffixes(names, args.batch_sizes, option)
    check_batch_suffixes(args.levers, args.batch_sizes, "--levers")
    return args


def main(argv: list[str] | None = None) -> list:
    """Run the benchmark; returns the results (also printed as a table, and written with --out)."""
    args = parse_args(argv)
    if args.family != "qwen_vl":
        return compare_with_trl(args)
    import torch

    from silkie.dev.bench import format_table, save_report
    from silkie.dev.bench_qwen_vl import run

    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = args.device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    name = "tiny" if args.tiny else "Qwen-VL-Chat size"
    print(f"model: {name}, {args.dtype}, device {device_name}", flush=True)
    results = run(args)
    paths = [spec.partition("@")[0] for spec in args.paths]
    print(format_table(results, "plain" if "plain" in paths else paths[0]))
    print_failures(args)
    save_report(args, results)
    return results


def print_failures(args: argparse.Namespace) -> None:
    """The runs that failed, under the table (each also in the JSON's meta.failures)."""
    for line in getattr(args, "failures", []):
        print(f"\nFAILED {line}")


def compare_with_trl(args: argparse.Namespace) -> list:
    """TRL's DPOTrainer vs ours on a transformers-native family."""
    import torch

    from silkie.dev.bench import format_table, save_report
    from silkie.dev.bench_trl import LARGE_SHAPES, best_against_trl, run

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family not in LARGE_SHAPES and not args.tiny:
        raise SystemExit(f"--family {args.family}: only the --tiny stand-in is built in; the large shapes are "
                         "Qwen2-VL-7B, Qwen3-VL-8B, Qwen3-VL-30B-A3B and InternVL3-8B")  # fmt: skip
    args.size = "tiny" if args.tiny else LARGE_SHAPES[args.family][0]
    device_name = args.device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"model: {args.family} {args.size}, {args.dtype}, device {device_name}", flush=True)
    results = run(args)
    runs = [spec.partition("@")[0] for spec in args.runs]
    baseline = "trl" if "trl" in runs else runs[0]
    print(format_table(results, baseline))
    verdict = best_against_trl(results)
    if verdict:
        print(f"\n{verdict}")
    print_failures(args)
    save_report(args, results)
    return results
