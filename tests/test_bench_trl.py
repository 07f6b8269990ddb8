"""`scripts/benchmark.py --family ...`: TRL's DPOTrainer and ours run on the same model and data in one call."""

from __future__ import annotations

import json

from .script_fixtures import load_script


def test_benchmark_runs_trl_and_ours_and_writes_ratios(tmp_path, capsys):
    benchmark = load_script("benchmark")
    out = tmp_path / "bench.json"
    argv = ["--family", "qwen2_vl", "--tiny", "--image-px", "56", "--batch-sizes", "2", "--steps", "2", "--warmup", "1",
            "--lora-r", "4", "--question-tokens", "10", "--answer-tokens", "12",
            "--runs", "trl", "silkie-optimized", "silkie-optimized+cached_ref", "--out", str(out)]  # fmt: skip
    results = benchmark.main(argv)
    assert [r.path for r in results] == ["trl", "silkie-optimized", "silkie-optimized+cached_ref"]
    assert all(r.batch_size == 2 and r.pairs_per_second > 0 and r.peak_memory_gib >= 0 for r in results)
    assert (
        results[2].reference_precompute_seconds_per_pair > 0
        and results[0].reference_precompute_seconds_per_pair is None
    )
    printed = capsys.readouterr().out
    assert "| 2 | silkie-optimized | " in printed and "pairs/s ratio (vs trl)" in printed
    report = json.loads(out.read_text())
    assert report["meta"]["family"] == "qwen2_vl" and len(report["results"]) == 3
