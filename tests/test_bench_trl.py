"""`scripts/benchmark.py --family ...`: TRL's DPOTrainer and ours run on the same model and data in one call."""

from __future__ import annotations

import json

import pytest

from .script_fixtures import load_script


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "gemma3"])
def test_benchmark_runs_trl_and_ours_and_writes_ratios(family, tmp_path, capsys):
    benchmark = load_script("benchmark")
    out = tmp_path / "bench.json"
    argv = ["--family", family, "--tiny", "--image-px", "56", "--batch-sizes", "2", "--steps", "2", "--warmup", "1",
            "--lora-r", "4", "--question-tokens", "10", "--answer-tokens", "12",
            "--runs", "trl", "silkie-optimized", "silkie-optimized+cached_ref", "--count-flops",
            "--out", str(out)]  # fmt: skip
    results = benchmark.main(argv)
    assert [r.path for r in results] == ["trl", "silkie-optimized", "silkie-optimized+cached_ref"]
    assert all(r.batch_size == 2 and r.pairs_per_second > 0 and r.peak_memory_gib >= 0 for r in results)
    assert (
        results[2].reference_precompute_seconds_per_pair > 0
        and results[0].reference_precompute_seconds_per_pair is None
    )
    assert results[0].tflop_per_pair is None and results[1].tflop_per_pair > 0  # ours counted, TRL's not
    printed = capsys.readouterr().out
    assert "| 2 | silkie-optimized | " in printed and "pairs/s ratio (vs trl)" in printed
    assert "TRL's best: trl (batch 2)" in printed and "ours with the cached reference (" in printed
    report = json.loads(out.read_text())
    assert report["meta"]["family"] == family and len(report["results"]) == 3


def test_the_large_shapes_are_the_released_models(tmp_path):
    """`--family qwen2_vl|qwen3_vl|qwen3_vl_moe|internvl|gemma3` without --tiny: Qwen2-VL-7B's, Qwen3-VL-8B's,
    Qwen3-VL-30B-A3B's, InternVL3-8B's and gemma-3-4b-it's shapes (built on the meta device here: parameter counts
    only; 31.07B, 7.94B and 4.30B are the releases'); LLaVA has only the stand-in."""
    import torch
    from transformers import AutoModelForImageTextToText

    from silkie.dev.bench_cli import compare_with_trl, parse_args
    from silkie.dev.bench_trl import model_config, stand_in_folder

    shapes = (("qwen2_vl", "7b", 8.29), ("qwen3_vl", "8b", 8.77), ("qwen3_vl_moe", "30b-a3b", 31.07),
              ("internvl", "8b-internvl3", 7.94), ("gemma3", "4b-gemma3", 4.30))  # fmt: skip
    for family, size, billions in shapes:
        config = model_config(stand_in_folder(family, tmp_path / family, size), size)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    # InternVL3-8B's stand-in processor cuts 448 px tiles of 256 tokens, as the release's, so TRL's ids fit the model
    processor = json.loads((tmp_path / "internvl" / "tiny-internvl" / "processor_config.json").read_text())
    assert processor["image_seq_length"] == 256 and processor["image_processor"]["size"]["height"] == 448
    processor = json.loads((tmp_path / "gemma3" / "tiny-gemma3" / "processor_config.json").read_text())
    assert processor["image_seq_length"] == 256 and processor["image_processor"]["size"]["height"] == 896
    with pytest.raises(SystemExit, match="--family llava: only the --tiny stand-in is built in"):
        compare_with_trl(parse_args(["--family", "llava"]))


def test_trl_switches_and_batch_suffixes_pick_the_runs_of_each_batch_size(tmp_path, monkeypatch):
    import trl

    benchmark = load_script("benchmark")
    configs = []
    real = trl.DPOConfig
    monkeypatch.setattr(trl, "DPOConfig", lambda **kw: configs.append(kw) or real(**kw))
    argv = ["--family", "qwen2_vl", "--tiny", "--image-px", "56", "--batch-sizes", "2", "3", "--steps", "1",
            "--warmup", "1", "--lora-r", "4", "--question-tokens", "10", "--answer-tokens", "12",
            "--runs", "trl", "trl+no_ckpt@2", "silkie-optimized+cached_ref@3",
            "--levers", "no_ckpt@2", "ckpt2"]  # fmt: skip
    results = benchmark.main(argv)
    assert [(r.path, r.batch_size) for r in results] == [
        ("trl", 2), ("trl+no_ckpt", 2), ("silkie-optimized+cached_ref+no_ckpt", 2),
        ("silkie-optimized+cached_ref+ckpt2", 2), ("trl", 3), ("silkie-optimized+cached_ref", 3),
        ("silkie-optimized+cached_ref+ckpt2", 3),
    ]  # fmt: skip
    assert [c["gradient_checkpointing"] for c in configs] == [True, False, True]
    with pytest.raises(SystemExit, match=r"--runs: 'trl\+no_ckpt@4' runs at batch 4, which is not one of"):
        benchmark.main([*argv[: argv.index("--runs")], "--runs", "trl+no_ckpt@4"])
    with pytest.raises(SystemExit, match="unknown TRL lever 'compile' in 'trl\\+compile'; expected one of no_ckpt"):
        benchmark.main(["--family", "qwen2_vl", "--runs", "trl+compile", "silkie-optimized"])
    with pytest.raises(SystemExit, match="--levers: they apply to the last of --runs, which must be one of ours"):
        benchmark.main(["--family", "qwen2_vl", "--runs", "silkie-optimized", "trl", "--levers", "varlen"])


def test_dataloader_workers_load_every_runs_batches_alike(tmp_path, monkeypatch):
    """`--dataloader-workers N`: TRL's trainer and ours both fetch batches from N worker processes (the paper recipe
    runs 4), so image processing overlaps the step on both sides of the comparison."""
    from silkie.dev import bench, bench_trl

    benchmark = load_script("benchmark")
    workers = []
    for module in (bench, bench_trl):
        real = module.timed_train

        def spy(trainer, *args, real=real, **kwargs):
            loader = trainer.get_train_dataloader()
            workers.append((trainer.args.dataloader_num_workers, loader.num_workers))
            return real(trainer, *args, **kwargs)

        monkeypatch.setattr(module, "timed_train", spy)
    argv = ["--family", "qwen2_vl", "--tiny", "--image-px", "56", "--batch-sizes", "2", "--steps", "1", "--warmup",
            "1", "--lora-r", "4", "--question-tokens", "10", "--answer-tokens", "12", "--dataloader-workers", "2",
            "--runs", "trl", "silkie-optimized+cached_ref", "--out", str(tmp_path / "bench.json")]  # fmt: skip
    results = benchmark.main(argv)
    assert [r.path for r in results] == ["trl", "silkie-optimized+cached_ref"]
    assert all(r.pairs_per_second > 0 for r in results)
    assert workers == [(2, 2), (2, 2)]
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["dataloader_workers"] == 2


def test_trls_best_meets_our_best_within_its_memory_with_and_without_the_cache():
    """Issue 21's comparison: TRL's fastest run of any switch and batch size against our fastest that fits in its
    peak memory (a faster run of ours that needs more memory does not count)."""
    from silkie.dev.bench import BenchResult
    from silkie.dev.bench_trl import best_against_trl

    def run(path: str, batch: int, pairs_per_second: float, peak: float) -> BenchResult:
        return BenchResult(path, batch, batch / pairs_per_second, 0.0, pairs_per_second, 0.0, peak, None, None)

    results = [
        run("trl+no_ckpt", 8, 4.0, 60.0), run("trl", 32, 3.0, 40.0),
        run("silkie-optimized+cached_ref+varlen+no_ckpt", 8, 20.0, 70.0),  # faster, but over TRL's memory
        run("silkie-optimized+cached_ref+varlen+compile", 32, 12.4, 45.0),
        run("silkie-optimized+varlen+no_ckpt", 8, 9.0, 58.0), run("silkie-optimized", 32, 7.0, 30.0),
    ]  # fmt: skip
    assert best_against_trl(results).splitlines() == [
        "TRL's best: trl+no_ckpt (batch 8): 4.00 pairs/s, peak 60.00 GiB",
        "ours with the cached reference (within its memory): silkie-optimized+cached_ref+varlen+compile (batch 32): "
        "12.40 pairs/s = 3.10x TRL's best at 0.75x its peak memory",
        "ours without the cache (within its memory): silkie-optimized+varlen+no_ckpt (batch 8): 9.00 pairs/s "
        "= 2.25x TRL's best at 0.97x its peak memory",
    ]
    over = [results[0], results[2]]
    assert (
        best_against_trl(over)
        .splitlines()[1]
        .startswith(
            "ours with the cached reference (none within its memory; the fastest): "
            "silkie-optimized+cached_ref+varlen+no_ckpt (batch 8): 20.00 pairs/s = 5.00x"
        )
    )
    assert best_against_trl(results[2:]) == ""  # no TRL run: nothing to compare with
