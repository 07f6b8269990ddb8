"""Qwen-VL-Chat (tiny, or its published size with random weights): our plain step (TRL's work: full logits, the
image in every forward, the prompt per answer) against the optimized step, each through `build_trainer`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from silkie.dev.bench import (
    BenchResult,
    bench_recipe,
    pair_tokens,
    peak_tflops,
    record_failure,
    release,
    result_of,
    run_ours,
    save_report,
    synthetic_pairs,
)
from silkie.dev.bench_levers import lever_runs
from silkie.dev.tiny_qwen_vl import random_model, tiny_config, write_tokenizer
from silkie.models.varlen import constructible

PATHS = ("plain", "optimized", "optimized+cached_ref")  # our runs' names without the "silkie-" prefix


def model_config(tokenizer: Any, tiny: bool) -> Any:
    """The tiny stand-in's architecture for this vocabulary, or Qwen-VL-Chat's published config."""
    from silkie.models.qwen_vl.configuration import official_config

    config = tiny_config(len(tokenizer.mergeable_ranks)) if tiny else official_config()
    if config.image_start_id != tokenizer.img_start_id:
        raise AssertionError("benchmark: the config's image_start_id disagrees with the tokenizer")
    return config


def run(args: Any) -> list[BenchResult]:
    """Every requested path at every batch size; prints a line per run and returns the results."""
    from silkie.models.qwen_vl import QWenVLImageProcessor
    from silkie.models.qwen_vl.family import QwenVLCodec

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "tokenizer"
        tokenizer = write_tokenizer(folder, official_size=not args.tiny)
        config = model_config(tokenizer, args.tiny)
        config._attn_implementation = constructible(args.attn)
        codec = QwenVLCodec(tokenizer)
        processor = QWenVLImageProcessor(config.visual["image_size"])
        device_peak = peak_tflops(args.device, args.peak_tflops)
        for size in args.batch_sizes:
            steps = args.warmup + args.steps + 1
            pairs = synthetic_pairs(
                lambda text: len(codec.answer_ids(text)),
                size * steps,
                args.question_tokens,
                args.answer_tokens,
                config.visual["image_size"],
            )
            tokens = pair_tokens(codec, processor, pairs)
            for name, path, levers in lever_runs(args.paths, getattr(args, "levers", None) or [], size):
                recipe = bench_recipe(f"silkie-{path}", "qwen_vl", folder, size, steps, args, levers)
                config._attn_implementation = constructible(recipe.model.attn_implementation)
                out, model = root / f"{len(results)}-{size}", None
                try:
                    torch.manual_seed(0)
                    model = random_model(config, args.device, dtype)
                    model.config._attn_implementation = recipe.model.attn_implementation
                    run = run_ours(model, recipe, codec, pairs, out, args)
                except Exception as err:  # one failed lever must not cost the card's other runs
                    record_failure(args, name, size, err)
                    save_report(args, results)
                    release(model)
                    continue
                result = result_of(name, size, run, tokens, device_peak)
                results.append(result)
                save_report(args, results)
                print(
                    f"{name:20s} batch {size:3d}: {result.pairs_per_second:.3f} pairs/s, "
                    f"peak {result.peak_memory_gib:.2f} GiB",
                    flush=True,
                )
                release(model)
    return results
