"""The synthetic VLFeedback generator: release format, image-grounded and text-balanced preferences."""

from __future__ import annotations

import importlib.util
import json
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from silkie.data.images import ZipImageStore
from silkie.data.pairs import build_vlfeedback_pairs
from silkie.data.sources import load_vlfeedback_jsonl
from silkie.dev.synthetic import COLOURS, NUMBER_WORDS, load_metadata, write_synthetic_vlfeedback

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_vlfeedback.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_synthetic_vlfeedback", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = _script().main([str(out), "--n", "72", "--seed", "5", "--bad-rows", "8"])
    return out, summary


def test_script_writes_release_format(synthetic):
    out, summary = synthetic
    lines = (out / "vlfeedback_80k.jsonl").read_text().splitlines()
    assert len(lines) == 80 and summary["rows"] == 80
    row = json.loads(lines[0])
    assert set(row) == {"id", "prompt", "models", "completions"}
    assert len(row["models"]) == 4 and [c["model"] for c in row["completions"]] == row["models"]
    for completion in row["completions"]:
        assert set(completion) == {"model", "response", "annotations"}
        assert set(completion["annotations"]) == {"Helpfulness", "Ethical Considerations", "Visual Faithfulness"}
        rating = completion["annotations"]["Helpfulness"]["Rating"]
        assert isinstance(rating, str) and rating in "12345"
    with zipfile.ZipFile(out / "merged_images.zip") as archive:
        names = set(archive.namelist())
    meta = load_metadata(out)
    for line in lines:
        row_id = json.loads(line)["id"]
        assert (f"merged_images/{row_id}.jpg" in names) == (meta[row_id]["bad"] != "missing_image")


def test_pairs_parse_back_and_chosen_matches_the_image(synthetic):
    out, _ = synthetic
    meta = load_metadata(out)
    store = ZipImageStore(out / "merged_images.zip")
    pairs, _ = build_vlfeedback_pairs(
        load_vlfeedback_jsonl(out / "vlfeedback_80k.jsonl"), image_store=store, min_margin=1.0
    )
    assert len(pairs) > 0
    for pair in pairs:
        info = meta[pair.prompt_id]
        assert pair.chosen in info["correct"] and pair.rejected in info["wrong"]
    for row_id in list(meta)[:12]:  # the dominant non-background colour is the described one
        info = meta[row_id]
        if info["bad"] == "missing_image":
            continue
        pixels = np.asarray(store.open(f"{row_id}.jpg"), dtype=np.float32).reshape(-1, 3)
        saturated = pixels[pixels.max(1) - pixels.min(1) > 80]
        mean = saturated.mean(0)
        nearest = min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - mean) ** 2).sum()))
        assert nearest == info["colour"]
        words = info["correct"][0].split()
        assert words[2] == NUMBER_WORDS[info["count"]] and words[3] == info["colour"]
        assert words[4].startswith(info["shape"])


def test_bad_rows_counted_with_reasons(synthetic):
    out, summary = synthetic
    assert summary["bad_rows"] == {"missing_image": 2, "non_numeric_rating": 2, "empty_answer": 2, "missing_field": 2}
    store = ZipImageStore(out / "merged_images.zip")
    _, report = build_vlfeedback_pairs(load_vlfeedback_jsonl(out / "vlfeedback_80k.jsonl"), image_store=store)
    assert report.rows_seen == 80
    assert report.rows_dropped == {"missing_field": 2, "missing_image": 2}
    assert report.pairs_dropped["non_numeric_rating"] == 6 and report.pairs_dropped["empty_answer"] == 6
    assert report.pairs_dropped["tie"] > 0  # the ratings make some ties
    meta = load_metadata(out)
    assert {meta[i]["bad"] for i in report.offending_ids["missing_image"]} == {"missing_image"}


def test_answers_are_balanced_so_text_alone_cannot_tell(tmp_path):
    write_synthetic_vlfeedback(tmp_path, n=720, seed=1)
    pairs, _ = build_vlfeedback_pairs(load_vlfeedback_jsonl(tmp_path / "vlfeedback_80k.jsonl"), min_margin=1.0)
    chosen = Counter(p.chosen for p in pairs)
    rejected = Counter(p.rejected for p in pairs)
    assert set(chosen) == set(rejected) and len(chosen) == 72  # 4 colours x 3 shapes x 3 counts x 2 phrasings
    for text in chosen:
        assert 0.8 <= chosen[text] / rejected[text] <= 1.25, text


def test_prompts_are_independent_of_the_image(tmp_path):
    write_synthetic_vlfeedback(tmp_path, n=400, seed=2)
    meta = load_metadata(tmp_path)
    rows = {row.id: row for row in load_vlfeedback_jsonl(tmp_path / "vlfeedback_80k.jsonl")}
    by_colour: dict[str, Counter] = {}
    for row_id, info in meta.items():
        by_colour.setdefault(info["colour"], Counter())[rows[row_id].prompt] += 1
    prompt_sets = {frozenset(counter) for counter in by_colour.values()}
    assert len(prompt_sets) == 1 and len(next(iter(prompt_sets))) >= 2


def test_deterministic_and_fast(tmp_path):
    start = time.perf_counter()
    write_synthetic_vlfeedback(tmp_path / "a", n=2000, seed=3, bad_rows=4)
    assert time.perf_counter() - start < 10.0
    write_synthetic_vlfeedback(tmp_path / "b", n=2000, seed=3, bad_rows=4)
    for name in ("vlfeedback_80k.jsonl", "merged_images.zip"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_synthetic_vlfeedback(tmp_path / "c", n=50, seed=4, image_size=32)
    assert ZipImageStore(tmp_path / "c" / "merged_images.zip").open("synthetic-000000.jpg").size == (32, 32)


def test_a_tiny_checkpoint_of_sizes_the_config_refuses_writes_nothing(tmp_path, capsys):
    """--hidden-size 64 left a folder holding only qwen.tiktoken, and a traceback."""
    from silkie.dev.tiny_qwen_vl_cli import main

    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "tiny"), "--hidden-size", "64"])
    assert stopped.value.code == 2 and not (tmp_path / "tiny").exists()
    assert capsys.readouterr().err.strip().endswith("error: config: visual.output_dim must be a multiple of 128 "
                                                    "(resampler heads), got 64")  # fmt: skip
