"""The README's commands, the demo recipe end to end, and the scripts not covered elsewhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT
from .train_fixtures import subprocess_env

README = (REPO_ROOT / "README.md").read_text()
OTHER_SCRIPTS = (
    "make_demo_assets",
    "make_tiny_qwen_vl",
    "make_synthetic_vlfeedback",
    "benchmark",
    "benchmark_data",
    "gpu_check",
    "lever_check",
    "recipe_reference",
)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def run(command: list[str], cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_readme_test_command_is_what_ci_runs():
    test_command = next(b for b in bash_blocks(README) if "pytest" in b).strip()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    *installs, pytest_call = test_command.split(" && ")
    assert installs and all(i.replace("pip install", "pip install -q").replace("'", '"') in ci for i in installs)
    assert pytest_call.startswith("python -m pytest -q") and pytest_call in ci


DEMO_STDERR: list[str] = []  # the launch's stderr, for the console checks


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README demo command, as written, in a fresh folder (its setup part is what this env already has)."""
    demo_command = next(b for b in bash_blocks(README) if "launch_dpo.py" in b and "demo.yaml" in b).strip()
    steps = demo_command.split(" && ")
    assert steps[0] == "python -m pip install torch==2.13.0 -e ."
    cwd = tmp_path_factory.mktemp("fresh")
    outputs = []
    for step in steps[1:]:
        words = step.split()
        assert words[0] == "python"
        words[1] = str(REPO_ROOT / words[1])
        words = [str(REPO_ROOT / w) if w.startswith("dpo_config/") else w for w in words]
        done = run([sys.executable, *words[1:]], cwd=cwd, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs.append(done)
    DEMO_STDERR.append(outputs[-1].stderr)
    return cwd, outputs[-1].stdout


def test_demo_trains_and_reports_where_everything_is(demo_run):
    cwd, stdout = demo_run
    working = cwd / "runs" / "demo"
    assert f"[silkie] adapter: {working / 'adapter'}" in stdout or "[silkie] adapter: runs/demo/adapter" in stdout
    accuracy = float(re.search(r"held-out reward accuracy: ([0-9.]+)", stdout).group(1))
    assert accuracy > 0.65  # measured 0.746; chance is 0.5
    assert (working / "adapter" / "adapter_model.safetensors").is_file()
    assert (working / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (working / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracies" in r for r in records) and (working / "FINISHED").is_file()
    assert list((working / "tb").glob("events.out.tfevents.*"))  # tensorboard in <working>/tb/


def test_demo_console_is_one_compact_line_per_logging_step(demo_run):
    """Not a terminal: plain lines, no \\r bars, no raw log dicts, none of the known-harmless warnings."""
    _, stdout = demo_run
    stderr = DEMO_STDERR[0]
    number = r"-?\d\.\d+"
    train = re.findall(
        rf"^\[silkie\] step (\d+)/270 \| loss {number} \| acc {number} \| margin {number} \| lr \d\.\d\de-\d\d"
        rf"(?: \| [\d.]+ pairs/s)? \| ETA \d+:\d\d$",
        stdout,
        flags=re.M,
    )
    assert [int(step) for step in train] == list(range(5, 271, 5))  # logging_steps 5 of the demo recipe
    evals = re.findall(
        rf"^\[silkie\] eval at step (\d+) \| loss {number} \| acc {number} .* 240 pairs in", stdout, re.M
    )
    assert evals[:2] == ["50", "100"]
    assert re.search(
        r"^\[silkie\] trained 270 steps in \d+:\d\d \| train loss 0\.\d{4} \| [\d.]+ pairs/s training, [\d.]+ with "
        r"evaluations and saves$",
        stdout,
        re.M,
    )
    for noise in ("\r", "{'loss'", "Setting accelerator to CPU", "is_gradient_checkpointing", "it/s]"):
        assert noise not in stdout and noise not in stderr, noise


def test_demo_adapter_is_portable_and_has_a_model_card(demo_run):
    """adapter_config.json names the base by absolute path, the card's loading code runs from another folder, and
    final_metrics.json carries the train summary."""
    cwd, _ = demo_run
    adapter = cwd / "runs" / "demo" / "adapter"
    base = str((cwd / "runs" / "assets" / "tiny-qwen-vl").resolve())
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    card = (adapter / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {base}\n") and "| steps | 270 |" in card
    accuracy = json.loads((cwd / "runs" / "demo" / "final_metrics.json").read_text())["eval_rewards/accuracies"]
    assert f"| held-out reward accuracy | {accuracy:.3f} (chance is 0.5) |" in card
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    assert "from silkie.models.qwen_vl import QWenLMHeadModel, QWenTokenizer" in snippet
    elsewhere = cwd / "elsewhere"
    elsewhere.mkdir()
    check = snippet + "\nprint(type(model).__name__, model.active_adapter, len(tokenizer))"
    done = run([sys.executable, "-c", check], cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    kind, active = done.stdout.split()[:2]
    assert kind.startswith("PeftModel") and active == "default"
    final = json.loads((cwd / "runs" / "demo" / "final_metrics.json").read_text())
    assert final["step"] == 270 and 0.3 < final["train_loss"] < 0.7 and final["pairs_per_s"] > 0
    assert final["train_runtime_s"] > 0


def test_readme_model_snippet_generates(demo_run):
    """The native model's snippet, in docs/models.md (linked from the README)."""
    cwd, _ = demo_run
    block = next(b for b in bash_blocks((REPO_ROOT / "docs" / "models.md").read_text()) if "python -c" in b)
    code = re.search(r'python -c "\n(.*)"\s*$', block, flags=re.S).group(1)
    done = run([sys.executable, "-c", code], cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("8 new tokens:")


@pytest.mark.parametrize("name", OTHER_SCRIPTS)
def test_script_help(name):
    done = run([sys.executable, str(REPO_ROOT / "scripts" / f"{name}.py"), "--help"], cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


def test_benchmark_tiny_reports_both_paths(tmp_path):
    out = tmp_path / "bench.json"
    done = run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "benchmark.py"),
            "--tiny",
            "--batch-sizes",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--lora-r",
            "8",
            "--count-flops",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["path"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"plain", "optimized", "optimized+cached_ref"}
    assert all(r["pairs_per_second"] > 0 and r["batch_size"] == 2 for r in results.values())
    # the optimized step does strictly less work: one image encoding, the prompt once, no full logits
    assert results["optimized"]["tflop_per_pair"] < 0.8 * results["plain"]["tflop_per_pair"]
    assert results["optimized+cached_ref"]["tflop_per_pair"] < results["optimized"]["tflop_per_pair"]
    assert "pairs/s ratio" in done.stdout


def test_gpu_check_runs_every_stage_on_cpu_with_the_tiny_model(tmp_path):
    done = run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "gpu_check.py"),
            "--tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--batch-sizes",
            "2",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["correctness"]["ok"] is True
    assert report["correctness"]["step_loss_abs_diff"] < 1e-5
    assert report["full_size"]["generated_new_tokens"] == 8 and report["full_size"]["step_losses_finite"]
    assert len(report["benchmark"]["results"]) == 3 and report["profile"]["top_kernels"]


def test_data_benchmark_counts_pairs(tmp_path):
    done = run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "benchmark_data.py"),
            "--n",
            "200",
            "--num-proc",
            "1",
            "--workdir",
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["instructions"] == 200 and report["pairs"] > 500
    assert report["cached_seconds"] < report["cold_seconds"]


def test_bad_data_stops_with_one_error_and_the_fixed_recipe_replaces_it(demo_run, tmp_path):
    """An input error found inside training ends the launch with the error as one line (no traceback, no advice to
    rerun as is), and the corrected recipe takes over the folder, which holds nothing trained."""
    from silkie.launch import torchrun_entry, workdir

    assert torchrun_entry.ERROR_NAME == workdir.ERROR_NAME
    cwd, _ = demo_run
    rows = tmp_path / "own.jsonl"
    rows.write_text(json.dumps({"question": "What is shown?", "chosen": "A cat.", "rejected": "A dog."}) + "\n")
    working = tmp_path / "run"
    launch = [sys.executable, str(REPO_ROOT / "launch_dpo.py"), "--config", str(REPO_ROOT / "dpo_config" / "demo.yaml")]
    launch += ["--working", str(working), "data.source=preference", "data.images=null", "training.max_steps=1"]
    done = run([*launch, f"data.path={rows}"], cwd=cwd)
    message = (
        f"no usable preference pairs in {rows}: rows seen=1 kept=0 "
        "dropped={missing_field: 1 (first: row 0: prompt (the row has chosen, question, rejected; data.columns maps "
        "other names))}; pairs kept=0 dropped={}"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "exitcode" not in done.stderr  # torchrun's own failure line: the error below says it all
    assert done.stderr.strip().splitlines()[-2:] == [
        f"error: {message}",
        "[launch] training stopped on this input error (no checkpoint had been written yet); fix it and launch again",
    ]
    assert done.stderr.count(message) == 1 and (working / "ERROR").read_text() == message + "\n"
    again = run([*launch, f"data.path={rows}", "--dry-run", "data.max_prompts=1"], cwd=cwd)
    assert again.returncode == 0 and "held a recipe that wrote no checkpoint or metrics" in again.stderr
