"""`silkie annotate`: a pool of tiny models answers, a judge with a known rule rates, the folder becomes a VLFeedback
release that the data pipeline reads; resumable stages, strict judge parsing, one-line config errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from silkie.config.annotate import load_judge, load_pool
from silkie.dev.judge_standin import standin_ratings
from silkie.errors import RecipeError
from silkie.tools.annotate.cli import main
from silkie.tools.annotate.rubric import JudgeParseError, judge_prompt, parse_ratings

from .data_fixtures import synthetic_instructions, write_jsonl


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from silkie.dev.tiny_hf_vlm import build_tiny_qwen2_vl
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("annotate")
    instructions = synthetic_instructions(root, n=8, seed=0)
    instructions[3]["prompt"] = "Please refuse: what is this?"
    write_jsonl(root / "instructions.jsonl", instructions)
    pool = root / "pool.yaml"
    pool.write_text(
        f"models:\n  - {{path: {build_tiny_checkpoint(root / 'qwen-vl')}, max_new_tokens: 8}}\n"
        f"  - {{path: {build_tiny_qwen2_vl(root / 'qwen2-vl')}, max_new_tokens: 8, temperature: 0}}\n"
        "answers_per_instruction: 2\n"
    )
    return root


def write_judge(path: Path, function: str) -> Path:
    text = f"kind: python\nfunction: silkie.dev.judge_standin:{function}\nbackoff_seconds: 0\nmax_retries: 1\n"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def annotated(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "mine"
    argv = ["sample", "--pool", str(assets / "pool.yaml"), "--instructions", str(assets / "instructions.jsonl")]
    assert main([*argv, "--images", str(assets / "vlf" / "merged_images.zip"), "--out", str(out), "--no-progress"]) == 0
    judge = write_judge(assets / "judge.yaml", "refuses_some")
    assert main(["judge", "--judge", str(judge), "--in", str(out), "--no-progress"]) == 0
    return out


def unjudged_copy(annotated: Path, tmp_path: Path) -> Path:
    """A copy of the annotated folder with its answers but no judging done."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(annotated, out)
    for name in ("ratings.jsonl", "judge_failures.jsonl", "judge_usage.json"):
        (out / name).unlink()
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_instruction_is_answered_by_both_models_once(annotated):
    answers = records(annotated / "answers.jsonl")
    assert len(answers) == 16 and len({(a["id"], a["model"]) for a in answers}) == 16
    assert {a["model"] for a in answers} == {"qwen-vl", "qwen2-vl"}
    assert all(isinstance(a["response"], str) and a["response"] for a in answers)


def test_the_release_carries_the_judge_s_ratings_and_the_pipeline_reads_it(annotated):
    rows = records(annotated / "release" / "vlfeedback_80k.jsonl")
    assert len(rows) == 7  # the instruction the judge refused is kept out, not guessed
    answers = {(a["id"], a["model"]): a["response"] for a in records(annotated / "answers.jsonl")}
    for row in rows:
        assert row["models"] == [c["model"] for c in row["completions"]]
        for completion in row["completions"]:
            assert completion["response"] == answers[row["id"], completion["model"]]
            expected = standin_ratings(completion["response"])
            assert {a: int(v["Rating"]) for a, v in completion["annotations"].items()} == expected
    with zipfile.ZipFile(annotated / "release" / "merged_images.zip") as archive:
        assert sorted(archive.namelist()) == sorted(f"merged_images/{row['id']}.jpg" for row in rows)
    failures = records(annotated / "judge_failures.jsonl")
    assert [f["id"] for f in failures] == ["synthetic-000003"] and failures[0]["attempts"] == 2
    assert failures[0]["reason"].startswith("unparseable reply: no JSON object")
    summary = json.loads((annotated / "summary.json").read_text())
    assert summary["rated_answers"] == 14 and summary["judge_failures"] == {"unparseable reply": 1}
    assert sum(summary["ratings"]["Ethical Considerations"].values()) == 14
    assert summary["ratings"]["Ethical Considerations"]["5"] == 14


def test_the_release_gives_the_pairs_the_rule_implies_and_trains(annotated, assets, tmp_path):
    from silkie.config import load_recipe
    from silkie.data.images import open_image_store
    from silkie.data.pairs import build_vlfeedback_pairs
    from silkie.data.sources import load_vlfeedback_jsonl
    from silkie.train import run_training

    from .conftest import REPO_ROOT

    release = annotated / "release"
    rows = load_vlfeedback_jsonl(release / "vlfeedback_80k.jsonl")
    pairs, report = build_vlfeedback_pairs(rows, image_store=open_image_store(release / "merged_images.zip"))
    expected = {}
    for row in records(release / "vlfeedback_80k.jsonl"):
        a, b = (c["response"] for c in row["completions"])
        score_a, score_b = (sum(standin_ratings(x).values()) / 3 for x in (a, b))
        if score_a != score_b:
            expected[row["id"]] = (a, b) if score_a > score_b else (b, a)
    assert {p.prompt_id: (p.chosen, p.rejected) for p in pairs} == expected
    assert report.pairs_dropped.get("tie", 0) == 7 - len(expected)
    overrides = [f"data.path={release / 'vlfeedback_80k.jsonl'}", f"data.images={release / 'merged_images.zip'}",
                 f"model.path={assets / 'qwen-vl'}", "training.max_steps=2", "data.eval_fraction=0.0",
                 "training.eval_strategy=no", "training.report_to=none", "training.logging_steps=1"]  # fmt: skip
    final = run_training(load_recipe(REPO_ROOT / "dpo_config" / "demo.yaml", overrides), tmp_path / "run")
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file() and final


def test_stages_resume_without_redoing_work(annotated, assets):
    before = (annotated / "answers.jsonl").read_text()
    argv = ["sample", "--pool", str(assets / "pool.yaml"), "--instructions", str(assets / "instructions.jsonl")]
    assert main([*argv, "--images", str(assets / "vlf"), "--out", str(annotated), "--no-progress"]) == 0
    assert (annotated / "answers.jsonl").read_text() == before  # nothing answered twice
    ratings = (annotated / "ratings.jsonl").read_text()
    judge = write_judge(assets / "judge-ok.yaml", "rate")
    assert main(["judge", "--judge", str(judge), "--in", str(annotated), "--no-progress"]) == 0
    assert (annotated / "ratings.jsonl").read_text() == ratings  # the failure stays out without --retry-failed
    assert main(["judge", "--judge", str(judge), "--in", str(annotated), "--retry-failed", "--no-progress"]) == 0
    assert len(records(annotated / "ratings.jsonl")) == 8
    assert len(records(annotated / "release" / "vlfeedback_80k.jsonl")) == 8


def test_a_torn_last_line_is_dropped_and_redone(assets, tmp_path):
    from silkie.tools.annotate.files import AppendLog, read_jsonl

    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "a", "model": "m", "response": "x"}\n{"id": "b", "mod')
    assert [r["id"] for r in read_jsonl(path)] == ["a"]
    AppendLog(path).write([{"id": "b", "model": "m", "response": "y"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]


def test_a_retried_parse_failure_is_rated_on_the_next_reply(annotated, assets, tmp_path):
    out = unjudged_copy(annotated, tmp_path)
    assert main(["judge", "--judge", str(write_judge(tmp_path / "j.yaml", "flaky")), "--in", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert len(records(out / "ratings.jsonl")) == 8 and not (out / "judge_failures.jsonl").exists()
    assert json.loads((out / "judge_usage.json").read_text())["requests"] == 16  # one bad reply, one good, each


def test_the_rubric_reply_is_read_strictly():
    prompt = judge_prompt("What is this?", ["A cat.", "A dog."])
    assert "[Answer 2]\nA dog." in prompt and "Visual Faithfulness" in prompt and "2 in all" in prompt
    good = {"ratings": [{"answer": n, **{a: {"rating": n + 2, "rationale": "r"} for a in standin_ratings("")}}
                        for n in (2, 1)]}  # fmt: skip
    parsed = parse_ratings(json.dumps(good), 2)
    assert [p["Helpfulness"]["Rating"] for p in parsed] == ["3", "4"]  # by answer number, not list order
    for broken, message in (
        ("no json here", "no JSON object"),
        ('{"ratings": [', "invalid JSON"),
        (json.dumps({"ratings": good["ratings"][:1]}), "rated 1 of 2"),
        (json.dumps(good).replace('"rating": 3', '"rating": 7'), "not an integer 1-5"),
        (json.dumps(good).replace('"rating": 3', '"rating": 2.5'), "not an integer 1-5"),
        (json.dumps(good).replace('"answer": 1', '"answer": 2'), "distinct answer number"),
    ):
        with pytest.raises(JudgeParseError, match=message):
            parse_ratings(broken, 2)


def test_config_errors_name_the_file_and_key(tmp_path):
    pool = tmp_path / "pool.yaml"
    for text, message in (
        ("{path: a, temprature: 1}", r"pool.yaml: unknown key 'pool.models\[0\].temprature' \(did you mean"),
        ("{path: a/m}\n  - {path: b/m}", "pool.models = 'm' is not allowed; expected distinct model names"),
        ("{path: a, batch_size: 0}\n  - {path: b}", r"pool\.models\[0\]\.batch_size"),
        ("{path: a, backend: vlm}\n  - {path: b}", r"pool\.models\[0\]\.backend.*did you mean 'vllm'"),
    ):
        pool.write_text(f"models:\n  - {text}\n")
        with pytest.raises(RecipeError, match=message):
            load_pool(pool)
    judge = tmp_path / "judge.yaml"
    judge.write_text("kind: gpt\nmodel: x\n")
    with pytest.raises(RecipeError, match="judge.kind = 'gpt' is not allowed"):
        load_judge(judge)
    assert main(["judge", "--judge", str(judge), "--in", str(tmp_path)]) == 2


def test_another_limit_on_an_imported_folder_is_said_to_be_ignored(assets, tmp_path, monkeypatch):
    from silkie.tools.annotate import files

    said = []
    monkeypatch.setattr(files.log, "warning", said.append)
    source, images, out = assets / "instructions.jsonl", assets / "vlf" / "merged_images.zip", tmp_path / "out"
    out.mkdir()
    assert len(files.import_instructions(source, images, out, limit=3)) == 3
    assert len(files.import_instructions(source, images, out, limit=3)) == 3 and said == []
    assert len(files.import_instructions(source, images, out, limit=5)) == 3  # fixed at the first run
    assert said == [f"{out} already holds its 3 instructions (fixed at its first run): --limit 5 is ignored; use a new "
                    "--out folder for another set"]  # fmt: skip


def test_a_pool_model_folder_that_cannot_load_is_named_before_any_model_answers(assets, tmp_path):
    """Checked up front: a typo in the pool's last model used to fail after the first models had answered."""
    from silkie.tools.annotate.sample import check_pool_folders
    from silkie.tools.cli import ToolError

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = (
        (f"path: {tmp_path / 'nope'}", r"models\[2\]\.path: model folder not found: .*/nope$"),
        (f"path: {empty}", r"models\[2\]\.path: model folder .*/empty has no config.json$"),
        (
            f"path: {assets / 'qwen-vl'}, adapter: {empty}",
            r"models\[2\]\.adapter: adapter folder .*/empty has no adapter_",
        ),
    )
    pool, out = tmp_path / "pool.yaml", tmp_path / "out"
    argv = ["sample", "--pool", str(pool), "--instructions", str(assets / "instructions.jsonl"), "--images",
            str(assets / "vlf" / "merged_images.zip"), "--out", str(out), "--no-progress"]  # fmt: skip
    for entry, message in cases:
        text = (assets / "pool.yaml").read_text()
        pool.write_text(
            text.replace("answers_per_instruction", f"  - {{{entry}, name: third}}\nanswers_per_instruction")
        )
        with pytest.raises(ToolError, match=rf"^{pool}: {message}"):
            check_pool_folders(load_pool(pool), str(pool))
        assert main(argv) == 2 and not out.exists()  # nothing made, nothing answered


@pytest.fixture(scope="module")
def served(assets):
    """`silkie annotate serve` on the tiny Qwen2-VL, in its own process, on a free port."""
    import subprocess
    import sys

    from .train_fixtures import subprocess_env

    process = subprocess.Popen(
        [sys.executable, "-m", "silkie", "annotate", "serve", "--model", str(assets / "qwen2-vl"), "--port", "0",
         "--device", "cpu", "--max-new-tokens", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert line.startswith("serving http://"), line
        yield line.split()[1]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_openai_client_path_against_a_served_model(served, annotated, tmp_path):
    """The real client and HTTP: the image goes as a data: URL, usage is counted from the server's tokens; the tiny
    model's reply is no rubric JSON, so every instruction is retried and then counted out, none guessed."""
    import openai

    client = openai.OpenAI(base_url=served, api_key="none")
    assert [m.id for m in client.models.list()] == ["qwen2-vl"]
    out = unjudged_copy(annotated, tmp_path)
    judge = tmp_path / "judge.yaml"
    prices = "price_per_million_input: 2.5\nprice_per_million_output: 10\n"
    judge.write_text(f"kind: openai\nmodel: qwen2-vl\nbase_url: {served}\nmax_retries: 1\nbackoff_seconds: 0\n"
                     f"concurrency: 2\nmax_tokens: 8\n{prices}")  # fmt: skip
    assert main(["judge", "--judge", str(judge), "--in", str(out), "--no-progress"]) == 2  # none rated: an error
    failures = records(out / "judge_failures.jsonl")
    # cut at max_tokens (finish_reason "length"): the same request would be cut again, so it is not retried
    cut = "unparseable reply: cut at judge.max_tokens = 8; raise it"
    assert len(failures) == 8 and all(f["reason"].startswith(cut) for f in failures)
    assert all(f["attempts"] == 1 for f in failures)
    usage = json.loads((out / "judge_usage.json").read_text())
    assert usage["requests"] == 8 and usage["input_tokens"] > 8 * 50 and 0 < usage["output_tokens"] <= 8 * 8
    expected = (usage["input_tokens"] * 2.5 + usage["output_tokens"] * 10) / 1e6
    assert usage["cost"] == pytest.approx(expected)
    assert records(out / "release" / "vlfeedback_80k.jsonl") == []  # nothing rated, nothing released


def test_an_unreachable_endpoint_is_retried_then_counted_out_and_stops_the_run(annotated, tmp_path, capsys):
    out = unjudged_copy(annotated, tmp_path)
    judge = tmp_path / "judge.yaml"
    judge.write_text("kind: openai\nmodel: m\nbase_url: http://127.0.0.1:9/v1\nmax_retries: 1\nbackoff_seconds: 0\n"
                     "timeout_seconds: 5\n")  # fmt: skip
    assert main(["judge", "--judge", str(judge), "--in", str(out), "--no-progress"]) == 2
    failures = records(out / "judge_failures.jsonl")
    assert len(failures) == 8 and all(f["reason"].startswith("request failed: APIConnectionError") for f in failures)
    # all 8 were tried (nothing was left to spare), none rated: an error naming the first failure
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: judge: none of the 8 instructions judged now was rated (the first: synthetic-"
    )
    assert json.loads((out / "judge_usage.json").read_text())["requests"] == 16  # 8 instructions x 2 attempts


def test_the_readme_annotate_demo_builds_a_release_and_trains_on_it(tmp_path):
    """The README's command, as written, in a fresh folder (`silkie` run as `python -m silkie`)."""
    import re
    import subprocess
    import sys

    from .conftest import REPO_ROOT
    from .test_user_path import bash_blocks
    from .train_fixtures import subprocess_env

    readme = (REPO_ROOT / "README.md").read_text()
    command = next(b for b in bash_blocks(readme) if "silkie annotate sample" in b).strip()
    stdout = ""
    for step in command.split(" && "):
        words = step.split()
        words = [sys.executable, "-m", "silkie", *words[1:]] if words[0] == "silkie" else [sys.executable, *words[1:]]
        words = [str(REPO_ROOT / w) if w.startswith(("scripts/", "launch_dpo.py", "dpo_config/")) else w for w in words]
        done = subprocess.run(words, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, step + done.stdout[-2000:] + done.stderr[-2000:]
        stdout = done.stdout
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    assert summary["instructions"] == 200 and summary["answers"] == 400
    # an empty answer (the tiny pool's model stops at once) is not sent to the judge: its instruction has one left
    answers = records(tmp_path / "runs" / "mine" / "answers.jsonl")
    with_an_empty = {answer["id"] for answer in answers if not answer["response"].strip()}
    assert summary["empty_answers"] == sum(not answer["response"].strip() for answer in answers) > 0
    assert summary["rated_instructions"] == 200 - len(with_an_empty)
    assert f"runs/mine/release/vlfeedback_80k.jsonl: rows seen={200 - len(with_an_empty)}" in stdout + done.stderr
    assert re.search(r"held-out reward accuracy: [0-9.]+", stdout)
    assert (tmp_path / "runs" / "demo_mine" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_local_checkpoint_judge_that_writes_no_rubric_is_counted_out(annotated, assets, tmp_path, capsys):
    """kind: local on the tiny Qwen-VL-Chat: it answers the rubric with its image, but not in JSON."""
    out = unjudged_copy(annotated, tmp_path)
    judge = tmp_path / "judge.yaml"
    judge.write_text(f"kind: local\nmodel: {assets / 'qwen-vl'}\nmax_tokens: 6\nmax_retries: 0\n")
    assert main(["judge", "--judge", str(judge), "--in", str(out), "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: judge: none of the 8 instructions judged now was rated (the first: synthetic-"
    )
    failures = records(out / "judge_failures.jsonl")
    assert len(failures) == 8 and all(f["reason"].startswith("unparseable reply") for f in failures)
    usage = json.loads((out / "judge_usage.json").read_text())
    assert usage["requests"] == 8 and usage["input_tokens"] > 8 * 256  # the prompt holds 256 image slots


def test_two_processes_give_the_answers_one_gives(annotated, assets, tmp_path):
    """--processes 2: a shard each, merged into answers.jsonl; the same seeds, so the same answers."""
    out = tmp_path / "sharded"
    argv = ["sample", "--pool", str(assets / "pool.yaml"), "--instructions", str(assets / "instructions.jsonl")]
    argv += ["--images", str(assets / "vlf" / "merged_images.zip"), "--out", str(out), "--processes", "2"]
    assert main([*argv, "--no-progress"]) == 0
    assert not list(out.glob("answers.shard-*"))  # merged, then removed
    sharded = {(a["id"], a["model"]): a["response"] for a in records(out / "answers.jsonl")}
    single = {(a["id"], a["model"]): a["response"] for a in records(annotated / "answers.jsonl")}
    assert len(records(out / "answers.jsonl")) == 16 and sharded == single


def test_an_instruction_a_model_cannot_take_is_recorded_and_skipped(assets, tmp_path):
    rows = [
        {"id": "synthetic-000000", "prompt": "What is this?"},
        {"id": "synthetic-000001", "prompt": "<image> or <image>?"},
    ]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["sample", "--pool", str(assets / "pool.yaml"), "--instructions", str(tmp_path / "two.jsonl")]
    argv += ["--images", str(assets / "vlf" / "merged_images.zip"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    assert {a["id"] for a in records(tmp_path / "out" / "answers.jsonl")} == {"synthetic-000000"}
    failures = records(tmp_path / "out" / "answer_failures.jsonl")
    assert {(f["id"], f["model"]) for f in failures} == {
        ("synthetic-000001", "qwen-vl"),
        ("synthetic-000001", "qwen2-vl"),
    }
    assert all("2 <image> marker(s) for 1 image" in f["reason"] for f in failures)
    assert main(argv) == 0 and len(records(tmp_path / "out" / "answer_failures.jsonl")) == 2  # not retried


def test_a_refusing_endpoint_stops_the_run(served, annotated, tmp_path):
    """A 404 (an unknown route here, as an unknown model on a real server) is not retried for every instruction."""
    out = unjudged_copy(annotated, tmp_path)
    judge = tmp_path / "judge.yaml"
    judge.write_text(f"kind: openai\nmodel: m\nbase_url: {served}/nowhere\nmax_retries: 3\nbackoff_seconds: 5\n")
    assert main(["judge", "--judge", str(judge), "--in", str(out), "--no-progress"]) == 2
    assert not (out / "ratings.jsonl").exists()  # nothing rated, and no retries waited for (backoff 5 s x 3)


def test_odd_digits_are_no_rating():
    reply = {"ratings": [{"answer": 1, **{a: {"rating": "²", "rationale": ""} for a in standin_ratings("")}}]}
    with pytest.raises(JudgeParseError, match="not an integer 1-5"):
        parse_ratings(json.dumps(reply), 1)
