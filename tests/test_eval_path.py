"""`data.eval_path`: held-out pairs from a file of their own (TRL's `eval_dataset`), not a split of `data.path`."""

from __future__ import annotations

from pathlib import Path

import pytest

from silkie.config import DataSection, RecipeError, load_recipe
from silkie.data.build import build_pairs
from silkie.errors import InputError

from .data_fixtures import write_jsonl
from .train_fixtures import DEMO_RECIPE, FAST, asset_overrides, read_metrics, run_in_process


def pair(row_id: str, prompt: str) -> dict:
    return {"id": row_id, "prompt": prompt, "chosen": "good", "rejected": "bad"}


def test_held_out_pairs_come_from_their_own_file_and_shared_prompts_are_said(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [pair(f"t{i}", f"Question {i}?") for i in range(6)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [pair("e0", "Another?"), pair("e1", "Question 2?")])
    section = DataSection(source="preference", path=str(train), eval_path=str(held_out))
    pairs, evaluation, _, report = build_pairs(section)
    assert [p.prompt_id for p in pairs] == [f"t{i}" for i in range(6)] and report.pairs_kept == 6
    assert [p.prompt_id for p in evaluation] == ["e0", "e1"]
    shared = "data.eval_path shares 1 prompts (question or first turn, and media) with data.path"
    assert shared in capsys.readouterr().out
    with pytest.raises(RecipeError, match="data.eval_path holds the held-out pairs; leave data.eval_fraction"):
        load_recipe(DEMO_RECIPE, [f"data.eval_path={held_out}"])  # the demo recipe holds out a fraction


def test_a_run_evaluates_on_the_eval_path(assets, tmp_path):
    data = Path([o.split("=", 1)[1] for o in asset_overrides(assets) if o.startswith("data.path=")][0])
    held_out = tmp_path / "held_out.jsonl"  # three rows of the release (VLFeedback's layout, as data.source says)
    held_out.write_text("".join(data.read_text().splitlines(keepends=True)[-3:]))
    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=12", "training.max_steps=2", "data.eval_fraction=0",
                                                   f"data.eval_path={held_out}", "training.eval_strategy=steps",
                                                   "training.eval_steps=2"]  # fmt: skip
    run_in_process(tmp_path / "run", overrides)
    evaluations = [r for r in read_metrics(tmp_path / "run") if "eval_rewards/accuracies" in r]
    assert evaluations and 0.0 <= evaluations[-1]["eval_rewards/accuracies"] <= 1.0


def test_a_held_out_file_with_media_needs_data_images_and_a_saved_dataset_gives_its_test_split(tmp_path):
    import datasets

    train = write_jsonl(tmp_path / "train.jsonl", [pair("t0", "Q?")])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{**pair("e0", "<image>What?"), "image": "a.jpg"}])
    with pytest.raises(InputError, match=r"data.images is not set, but .*eval.jsonl references images"):
        build_pairs(DataSection(source="preference", path=str(train), eval_path=str(held_out)))
    splits = {name: datasets.Dataset.from_list([pair(f"{name}0", f"{name}?")]) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    section = DataSection(source="preference", path=str(train), eval_path=str(tmp_path / "saved"))
    assert [p.prompt_id for p in build_pairs(section)[1]] == ["test0"]
