"""`silkie evaluate --tasks` and the `silkie` model of lmms-eval, run through the real lmms-eval (0.7.3) on an offline
MME-style task built from the synthetic shapes: base and DPO model answer as `silkie chat` answers, the table is
lmms-eval's MME score of those answers, and `lmms-eval --model silkie` finds the model by its entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from silkie.dev.lmms_task import TASK, shapes_rows, write_shapes_task
from silkie.tools.benchmarks import PAPER_ROWS, format_markdown, table_rows, task_metrics
from silkie.tools.evaluate_cli import main

PICTURES = 6  # 12 questions


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_task(tmp_path_factory.mktemp("lmms-tasks"), pictures=PICTURES)


def mme_score(samples: list[dict]) -> float:
    """MME's score of the samples, computed here: per category mean over pictures of acc + acc+ (x100), summed."""
    by_picture: dict[tuple[str, str], list[float]] = {}
    for sample in samples:
        answer = sample["response"].lower().strip().replace(".", "")
        label = (
            answer
            if answer in ("yes", "no")
            else "yes"
            if "yes" in answer[:4]
            else "no"
            if "no" in answer[:4]
            else "other"
        )
        if len(answer) == 1:
            label = {"y": "yes", "n": "no"}.get(answer, "other")
        score = sample["mme_perception_score"]
        by_picture.setdefault((score["category"], score["question_id"]), []).append(float(label == sample["target"]))
    per_category: dict[str, list[float]] = {}
    for (category, _), scores in by_picture.items():
        assert len(scores) == 2
        per_category.setdefault(category, []).append(100 * sum(scores) / 2 + 100 * (sum(scores) == 2))
    return sum(sum(values) / len(values) for values in per_category.values())


def test_task_rows_pair_a_true_and_a_false_claim_per_picture():
    rows = shapes_rows(PICTURES)
    assert len(rows) == 2 * PICTURES
    assert [r["answer"] for r in rows] == ["yes", "no"] * PICTURES
    assert [r["category"] for r in rows[::2]] == ["existence", "color", "count"] * (PICTURES // 3)
    assert rows[0]["question_id"] == rows[1]["question_id"] != rows[2]["question_id"]
    assert rows[0]["question"].startswith("Is there a ") and rows[0]["question"].endswith(" Please answer yes or no.")


def test_table_keeps_numeric_metrics_and_adds_the_paper_rows(tmp_path):
    results = {"mme": {"alias": "mme", "mme_perception_score,none": 1500.0, "mme_perception_score_stderr,none": "N/A",
                       "mme_cognition_score,none": 380.0},
               "pope": {"pope_accuracy,none": 0.85, "pope_f1_score,strict": 0.8}}  # fmt: skip
    metrics = task_metrics(results)
    assert metrics == {
        "mme": {"mme_perception_score": 1500.0, "mme_cognition_score": 380.0},
        "pope": {"pope_accuracy": 0.85, "pope_f1_score (strict)": 0.8},
    }
    rows = table_rows({"base": metrics, "dpo": {"mme": {"mme_perception_score": 1550.0}}})
    perception = next(r for r in rows if r["metric"] == "mme_perception_score")
    assert perception["delta"] == 50.0
    assert (perception["paper_qwen_vl_chat"], perception["paper_silkie"]) == PAPER_ROWS[("mme", "mme_perception_score")]
    assert next(r for r in rows if r["metric"] == "pope_accuracy")["dpo"] is None
    table = format_markdown(rows, "t")
    assert "| mme | mme_perception_score | 1500.0 | 1550.0 | 50.0 | 1440.5 | 1539.6 |" in table
    assert "| pope | pope_accuracy | 0.85 | — | — | — | — |" in table


def test_evaluate_tasks_runs_base_and_dpo_through_lmms_eval(trained, shapes, tmp_path, one_torch_thread):
    from silkie.tools.chat import GenerationOptions, chat_once
    from silkie.tools.lmms_model import cut_at

    out = tmp_path / "bench"
    argv = ["--run", str(trained.run_dir), "--tasks", TASK, "--include-path", str(shapes), "--device", "cpu"]
    assert main([*argv, "--batch-size", "4", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    answers = {}
    for model in ("base", "dpo"):
        samples = [json.loads(line) for line in (out / f"samples_{model}_{TASK}.jsonl").read_text().splitlines()]
        assert len(samples) == 2 * PICTURES
        assert result["metrics"][model][TASK]["mme_perception_score"] == pytest.approx(mme_score(samples))
        answers[model] = {s["doc_id"]: s["response"] for s in samples}
    assert answers["base"] != answers["dpo"]  # the adapter is on for one and off for the other
    # the answers are the ones `silkie chat --compare` gives (greedy, the task's 8 tokens, cut at its stop string)
    rows, picture = shapes_rows(PICTURES), tmp_path / "picture.png"
    for doc_id in (0, 5):
        rows[doc_id]["image"].save(picture)
        question = rows[doc_id]["question"].replace(" Please answer yes or no.", "")
        question += "\nAnswer the question using a single word or phrase."
        options = GenerationOptions(max_new_tokens=8)
        expected = chat_once(trained.model_dir, picture, question, trained.run_dir / "adapter", options,
                             compare=True, device="cpu", write=lambda _: None)  # fmt: skip
        for model in ("base", "dpo"):
            assert answers[model][doc_id] == cut_at(expected[model].strip(), ["\n\n"])
    table = (out / "table.md").read_text()
    row = next(r for r in result["rows"] if r["task"] == TASK)
    assert f"| {TASK} | mme_perception_score |" in table and row["paper_silkie"] is None
    assert (out / "chart.png").stat().st_size > 5000


def test_unknown_task_is_one_line(trained, shapes, capsys):
    argv = ["--run", str(trained.run_dir), "--tasks", "silkie_shape", "--include-path", str(shapes), "--device", "cpu"]
    assert main(argv) == 2
    assert "--tasks: 'silkie_shape' is not an lmms-eval task; did you mean silkie_shapes" in capsys.readouterr().err


def test_a_limit_look_never_replaces_the_full_benchmark(trained, shapes, capsys, one_torch_thread):
    argv = ["--run", str(trained.run_dir), "--tasks", TASK, "--include-path", str(shapes), "--device", "cpu"]
    assert main([*argv, "--limit", "5"]) == 2  # refused before any model answers
    assert capsys.readouterr().err.strip() == (
        f"error: --limit 5: {TASK} score each picture's two questions together (MME's accuracy+); give an even "
        "whole number of documents, e.g. --limit 6"
    )
    full = trained.run_dir / "benchmarks"
    full.mkdir(exist_ok=True)
    (full / "results.json").write_text('{"full": true}')
    assert main([*argv, "--limit", "4", "--batch-size", "4"]) == 0
    look = trained.run_dir / "benchmarks-limit4"
    result = json.loads((look / "results.json").read_text())
    assert result["limit"] == 4 and json.loads((full / "results.json").read_text()) == {"full": True}
    assert len((look / f"samples_dpo_{TASK}.jsonl").read_text().splitlines()) == 4
    title = "(--limit 4: the first documents of each task, a quick look)"
    assert title in (look / "table.md").read_text().splitlines()[0] and title in capsys.readouterr().out


def test_loglikelihood_is_the_answer_loss(trained):
    from lmms_eval.api.instance import Instance

    from silkie.tools.chat_inputs import PromptBuilder
    from silkie.tools.lmms_model import SilkieLMM, continuation_ids

    model = SilkieLMM(path=str(trained.model_dir), adapter=str(trained.run_dir / "adapter"), device="cpu")
    doc = shapes_rows(1)[0]
    model.task_dict = {TASK: {"test": [doc]}}
    metadata = {"task": TASK, "doc_id": 0, "repeats": 1}
    requests = [
        Instance("loglikelihood", (doc["question"], f" {word}", lambda d: [d["image"]], 0, TASK, "test"), i, metadata)
        for i, word in enumerate(("yes", "no"))
    ]
    scores = model.loglikelihood(requests)
    model.use_adapter = False
    base_scores = model.loglikelihood(requests)
    picture = model._pictures.name + f"/{TASK}-0-0.png"
    tokenizer, ids, tensors = PromptBuilder(model.chat)(picture, doc["question"])
    for (loss, greedy), (base_loss, _), word in zip(scores, base_scores, ("yes", "no")):
        answer = torch.tensor([continuation_ids(tokenizer, word)])
        full = torch.cat([ids, answer], dim=1)
        labels = full.clone()
        labels[:, : ids.shape[1]] = -100
        with torch.no_grad():
            reference = model.chat.model(input_ids=full, labels=labels, **tensors).loss
        assert loss == pytest.approx(float(reference), rel=1e-5) and isinstance(greedy, bool)
        assert base_loss != pytest.approx(loss, rel=1e-4)


def test_lmms_eval_command_finds_the_silkie_model(trained, shapes, tmp_path):
    args = f"path={trained.model_dir},adapter={trained.run_dir / 'adapter'},device=cpu"
    command = [sys.executable, "-m", "lmms_eval", "--model", "silkie", "--model_args", args, "--tasks", TASK]
    command += ["--include_path", str(shapes), "--batch_size", "4", "--limit", "4", "--output_path", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (results,) = tmp_path.rglob("*_results.json")
    payload = json.loads(results.read_text())
    assert payload["config"]["model"] == "silkie" and "mme_perception_score,none" in payload["results"][TASK]
    assert payload["n-samples"][TASK]["effective"] == 4


def test_a_benchmark_whose_dataset_is_not_cached_offline_is_one_line_before_any_model_loads(
    trained, monkeypatch, capsys, tmp_path
):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    loaded = []
    monkeypatch.setattr("silkie.tools.lmms_model.SilkieLMM.__init__", lambda *a, **k: loaded.append(1))
    assert main(["--run", str(trained.run_dir), "--tasks", "mme,pope", "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    fetch = "mme needs lmms-lab-encoder/MME: huggingface-cli download --repo-type dataset lmms-lab-encoder/MME"
    assert error.startswith(f"error: --tasks offline, and not in the local caches: {fetch} (with HF_TOKEN set")
    assert "pope needs lmms-lab-encoder/POPE" in error and loaded == []


def test_a_prepared_copy_in_the_datasets_cache_counts_as_cached(monkeypatch, tmp_path):
    """`datasets` names its folder in snake case (MMVet -> mm_vet)."""
    import datasets.config

    from silkie.tools.benchmarks import _dataset_cached

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    (tmp_path / "datasets" / "lmms-lab-encoder___mm_vet").mkdir(parents=True)
    assert _dataset_cached("lmms-lab-encoder/MMVet") and not _dataset_cached("lmms-lab-encoder/MME")
