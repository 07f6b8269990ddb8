"""Data files and recipes as LLaMA-Factory and ms-swift users bring them: `silkie prepare` reads what training reads,
a split is the one asked for, and each mistake is named with where the setting lives here."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from silkie.config import DataSection, RecipeError, load_recipe
from silkie.data.build import build_pairs
from silkie.data.sources import RowError, normalize_preference_row
from silkie.errors import InputError

from .train_fixtures import DEMO_RECIPE


def pictures(folder):
    folder.mkdir()
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        Image.new("RGB", (8, 8), colour).save(folder / name)
    return folder


def swift_row(index: int, images=("a.png",), prompt="<image>Which colour?") -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Red {index}."}],
            "rejected_response": "Blue.", "images": list(images)}  # fmt: skip


def test_prepare_checks_ms_swift_rows_and_renamed_columns_as_training_reads_them(tmp_path, capsys):
    from silkie.tools.prepare_cli import main

    images = pictures(tmp_path / "imgs")
    (tmp_path / "swift.jsonl").write_text("".join(json.dumps(swift_row(i)) + "\n" for i in range(3)))
    assert main([str(tmp_path / "swift.jsonl"), str(images), "--strict"]) == 0
    assert "pairs kept                     3" in capsys.readouterr().out
    renamed = [{"q": "<image>Which?", "good": "Red.", "bad": "Blue.", "pic": "b.png"}]
    (tmp_path / "renamed.jsonl").write_text(json.dumps(renamed[0]) + "\n")
    columns = "prompt=q,chosen=good,rejected=bad,image=pic"
    assert main([str(tmp_path / "renamed.jsonl"), str(images), "--columns", columns, "--strict"]) == 0


def test_a_marker_count_that_does_not_match_the_pictures_is_dropped_where_prepare_sees_it(tmp_path, capsys):
    from silkie.tools.prepare_cli import main

    images = pictures(tmp_path / "imgs")
    rows = [swift_row(0, ("a.png", "b.png")), swift_row(1, ("a.png", "b.png"), "<image> and <image>: which?")]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main([str(tmp_path / "two.jsonl"), str(images)]) == 0
    out = capsys.readouterr().out
    assert "image_marker_mismatch" in out and "the prompt has 1 <image> marker(s) for 2 image(s)" in out
    assert "pairs kept                     1" in out


def test_data_split_picks_the_split_of_a_saved_dataset(tmp_path):
    splits = {name: datasets.Dataset.from_list([{"id": f"{name}{i}", "prompt": "Q?", "chosen": "a", "rejected": "b"}
                                                for i in range(3)]) for name in ("train", "test")}  # fmt: skip
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    section = DataSection(source="preference", path=str(tmp_path / "saved"), split="test")
    assert [pair.prompt_id for pair in build_pairs(section)[0]] == ["test0", "test1", "test2"]
    with pytest.raises(InputError, match=r"has none of the splits \('tran',\) \(has \['train', 'test'\]\)"):
        build_pairs(DataSection(source="preference", path=str(tmp_path / "saved"), split="tran"))


def test_a_renamed_conversation_column_maps_and_a_missing_prompt_names_the_columns(tmp_path):
    row = {"dialog": [{"from": "human", "value": "<image>Which?"}], "chosen": {"from": "gpt", "value": "Red."},
           "rejected": {"from": "gpt", "value": "Blue."}, "pics": ["a.png"]}  # fmt: skip
    mapped = normalize_preference_row(row, columns={"conversations": "dialog", "images": "pics"})
    assert (mapped.prompt, mapped.chosen, mapped.images) == ("<image>Which?", "Red.", ("a.png",))
    with pytest.raises(RowError, match=r"prompt \(the row has chosen, image, question, rejected; data.columns maps"):
        normalize_preference_row({"question": "Q", "chosen": "a", "rejected": "b", "image": "a.png"})
    with pytest.raises(RecipeError, match=r"the keys are the fields, the values the file's columns; write "
                                          r"\{prompt: question\}"):  # fmt: skip
        DataSection(source="preference", path="x", columns={"question": "prompt"}).check()


def test_a_pairs_dataset_read_as_vlfeedback_says_which_source_reads_it(tmp_path):
    datasets.Dataset.from_list([{"prompt": "Q", "chosen": "a", "rejected": "b"}]).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(InputError, match=r"has no completions column \(its columns: prompt, chosen, rejected\); "
                                         r"data.source hf reads VLFeedback's schema"):  # fmt: skip
        build_pairs(DataSection(source="hf", path=str(tmp_path / "d")))


def test_a_llama_factory_recipe_is_named_and_each_key_says_where_it_lives(tmp_path):
    recipe = tmp_path / "lf.yaml"
    recipe.write_text("model_name_or_path: x\nstage: dpo\nfinetuning_type: lora\nlora_rank: 8\ntemplate: qwen2_vl\n"
                      "pref_beta: 0.1\nmedia_dir: imgs\n")  # fmt: skip
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert "this looks like a LLaMA-Factory or ms-swift recipe; Silkie's recipes have sections" in message
    for hint in ("'lora_rank' (did you mean 'lora.r'?)", "'pref_beta' (did you mean 'dpo.beta'?)",
                 "'media_dir' (did you mean 'data.images'?)", "'template' (not needed: the chat template is the"):
        assert hint in message  # fmt: skip
    with pytest.raises(RecipeError, match=r"unknown keys 'dpo.pref_beta' \(did you mean 'beta'\?\), "
                                          r"'dpo.simpo_gama' \(did you mean 'simpo_gamma'\?\)"):  # fmt: skip
        load_recipe(DEMO_RECIPE, ["dpo.pref_beta=0.1", "dpo.simpo_gama=1"])
