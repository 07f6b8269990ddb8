"""`scripts/benchmark.py --levers` and `scripts/lever_check.py`: every lever is a recipe switch measured side by side
with the path it modifies, and checked against the fp32 reference."""

from __future__ import annotations

import json

import pytest

from silkie.dev.bench_levers import lever_keys, lever_runs
from silkie.dev.lever_check import main as lever_check

from .script_fixtures import load_script


def test_lever_specs_combine_and_liger_runs_last():
    assert lever_keys("liger+compile+pack4") == {
        "model": {"liger_kernels": True, "compile_blocks": True},
        "dpo": {"pairs_per_row": 4},
    }
    runs = lever_runs(["plain", "optimized"], ["liger", "pack2", "flex+liger", "compile"])
    assert [name for name, _, _ in runs] == [
        "plain", "optimized", "optimized+pack2", "optimized+compile", "optimized+liger", "optimized+flex+liger",
    ]  # fmt: skip
    at_eight = lever_runs(["plain@4", "optimized"], ["ckpt2@8", "no_ckpt@4", "liger+varlen"], size=8)
    assert [name for name, _, _ in at_eight] == ["optimized", "optimized+ckpt2", "optimized+liger+varlen"]
    assert at_eight[1][2] == {"training": {"gradient_checkpointing_kwargs": {"every_n_layers": 2}}}
    with pytest.raises(SystemExit, match="'ckpt2@x': expected NAME@BATCH with BATCH a whole number >= 1"):
        lever_runs(["optimized"], ["ckpt2@x"])
    expected = "unknown lever 'fused' in 'pack2\\+fused'; expected one of flex, varlen, liger"
    with pytest.raises(SystemExit, match=expected):
        lever_keys("pack2+fused")


def test_benchmark_runs_each_lever_beside_its_path(tmp_path, capsys):
    benchmark = load_script("benchmark")
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--batch-sizes", "4", "--steps", "1", "--warmup", "1", "--lora-r", "4", "--question-tokens",
            "10", "--answer-tokens", "12", "--paths", "optimized", "--levers", "pack4", "liger", "native_norm",
            "varlen", "no_ckpt", "ckpt2", "--count-flops", "--out", str(out)]  # fmt: skip
    results = benchmark.main(argv)
    # liger cannot run without CUDA: its run is reported in one line and the runs after it still go
    assert [r.path for r in results] == ["optimized", "optimized+pack4", "optimized+native_norm", "optimized+varlen",
                                         "optimized+no_ckpt", "optimized+ckpt2"]  # fmt: skip
    assert all(r.pairs_per_second > 0 and r.first_step_seconds > 0 for r in results)
    by_path = {r.path: r for r in results}
    # the same pairs: native precision does the same matmuls; the packed row has no padding to multiply
    assert by_path["optimized+native_norm"].tflop_per_pair == pytest.approx(by_path["optimized"].tflop_per_pair)
    # the tiny model's 2 decoder layers: recomputed in the backward (both), only the first (ckpt2), none
    flops = [by_path[f"optimized{lever}"].tflop_per_pair for lever in ("", "+ckpt2", "+no_ckpt")]
    assert flops[0] > flops[1] > flops[2]
    printed = capsys.readouterr().out
    assert "| 4 | optimized+pack4 | " in printed
    failure = "optimized+liger batch 4: InputError: model.liger_kernels: "
    assert f"FAILED {failure}" in printed
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["results"]] == [r.path for r in results]
    assert len(report["meta"]["failures"]) == 1 and report["meta"]["failures"][0].startswith(failure)


def test_lever_check_equals_the_reference_in_fp32_and_reports_what_cannot_run(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "liger_kernel" else real(name))
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--levers",
        "native_norm",
        "pack4",
        "flex",
        "varlen",
        "liger",
    ]
    assert lever_check([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "lever_check.json").read_text())
    levers = report["levers"]
    assert set(levers) == {"default", "native_norm", "pack4", "flex", "varlen", "liger"} and report["pairs"] == 4
    assert report["device_name"] == "cpu"
    for name in ("native_norm", "pack4", "flex", "varlen"):
        assert levers[name]["max_abs_logp_diff_vs_default"] < 1e-4, name
        assert levers[name]["max_abs_logit_diff_vs_fp32"] < 1e-4, name
    assert levers["liger"]["error"].startswith("InputError: model.liger_kernels: liger-kernel is not installed")


def test_a_benchmark_cut_short_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    from silkie.dev import bench_qwen_vl

    benchmark = load_script("benchmark")
    real, done = bench_qwen_vl.run_ours, []

    def cut_after_one(*args, **kwargs):  # a time limit ending the process during the second run
        if done:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_qwen_vl, "run_ours", cut_after_one)
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--lora-r", "4", "--question-tokens",
            "10", "--answer-tokens", "12", "--paths", "optimized", "--levers", "no_ckpt",
            "--out", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv)
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["results"]] == ["optimized"] and report["results"][0]["pairs_per_second"] > 0
    assert report["meta"]["levers"] == ["no_ckpt"] and report["meta"]["device_name"] == "cpu"


def test_the_card_sessions_commands_parse_before_the_card_is_spent(tmp_path):
    """Every benchmark and lever_check command of `scripts/gpu_session.sh` (a typo there costs a GPU session)."""
    import shlex

    from silkie.dev.bench_cli import parse_args
    from silkie.dev.lever_check import parse_args as lever_check_args

    from .conftest import REPO_ROOT

    script = (REPO_ROOT / "scripts" / "gpu_session.sh").read_text().replace("\\\n", " ")
    commands = {"benchmark": [], "lever_check": []}
    for line in script.splitlines():
        for name in commands:
            if f"python3 scripts/{name}.py" in line:
                words = shlex.split(line.split(f"scripts/{name}.py", 1)[1].split("2>&1")[0].replace("$OUT", "OUT"))
                commands[name].append(words)
    assert len(commands["benchmark"]) >= 4 and commands["lever_check"]
    perf = [parse_args(words) for words in commands["benchmark"] if "--levers" in words]
    assert len(perf) == 2 and all(args.levers for args in perf)
    assert all(args.dataloader_workers == 4 for args in perf)  # every run's batches, TRL's too, off the step
    trl = next(args for args in perf if args.family == "qwen2_vl")
    assert any(run.startswith("trl") for run in trl.runs) and "cached_ref" in " ".join(trl.levers)
    for words in commands["benchmark"]:  # the trl / trl3 stage names its family in $family
        for family in ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe") if "$family" in words else (None,):
            assert parse_args([family if word == "$family" else word for word in words]).family != "$family"
    for words in commands["lever_check"]:
        lever_check_args(words)


def test_each_compiling_run_compiles_its_own_graphs(tmp_path, capsys):
    """One benchmark process runs many models: a compiling run must not reuse an earlier run's graphs (its compile
    time would vanish) nor count its variants toward dynamo's recompile limit (past which blocks run eager)."""
    benchmark = load_script("benchmark")
    reports = []
    for attempt in range(2):  # the second run is the first again: with a shared cache it would compile nothing
        out = tmp_path / f"bench{attempt}.json"
        benchmark.main(["--tiny", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--lora-r", "4",
                        "--question-tokens", "10", "--answer-tokens", "12", "--paths", "optimized",
                        "--levers", "compile", "--count-flops", "--out", str(out)])  # fmt: skip
        reports.append({r["path"]: r for r in json.loads(out.read_text())["results"]})
    first, again = (report["optimized+compile"] for report in reports)
    assert first["compiled_graphs"] == again["compiled_graphs"] > 0
    assert first["eager_fallback"] is again["eager_fallback"] is False
    assert reports[0]["optimized"]["compiled_graphs"] is None  # an eager run has no graphs to report
    # the compiled run's FLOPs are counted with its blocks eager for one step: the same work as the eager run's
    assert first["tflop_per_pair"] == pytest.approx(reports[0]["optimized"]["tflop_per_pair"], rel=1e-6)
    assert first["tflop_per_pair"] > 0
    assert (
        f"~{again['first_step_seconds'] - again['step_seconds']:.1f} s compile, {again['compiled_graphs']} graphs"
        in (capsys.readouterr().out)
    )


def test_a_run_past_the_recompile_limit_says_so_under_the_table():
    from silkie.dev.bench import BenchResult, format_table

    def run(path: str, graphs: int | None, fallback: bool | None) -> BenchResult:
        return BenchResult(path, 8, 0.5, 0.0, 16.0, 0.0, 1.0, None, None, None, 10.5, graphs, fallback)

    table = format_table([run("plain", None, None), run("plain+compile", 9, True), run("plain+liger", 4, False)])
    assert "plain+compile (batch 8): first step 10.5 s, ~10.0 s compile, 9 graphs; RECOMPILE LIMIT HIT" in table
    assert "plain+liger (batch 8): first step 10.5 s, ~10.0 s compile, 4 graphs\n" in table + "\n"
    assert "plain (batch 8): first step" not in table  # an eager run: no compile line


def test_a_flop_count_out_of_memory_keeps_the_timed_run(tmp_path, monkeypatch, capsys):
    import torch.utils.flop_counter

    class OutOfMemory:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.utils.flop_counter, "FlopCounterMode", OutOfMemory)
    benchmark = load_script("benchmark")
    out = tmp_path / "bench.json"
    results = benchmark.main(["--tiny", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--lora-r", "4",
                              "--question-tokens", "10", "--answer-tokens", "12", "--paths", "optimized",
                              "--count-flops", "--out", str(out)])  # fmt: skip
    assert [r.path for r in results] == ["optimized"] and results[0].pairs_per_second > 0
    assert results[0].tflop_per_pair is None and not json.loads(out.read_text())["meta"].get("failures")
    assert "FLOP count: out of memory with the blocks eager" in capsys.readouterr().out
