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
    from silkie.tools.prepare_cli import main

    assert main([str(tmp_path / "saved"), str(tmp_path), "--split", "test", "--strict"]) == 0  # as trained
    assert main([str(tmp_path / "saved"), str(tmp_path), "--split", "tran"]) == 2  # the typo, said


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


def test_a_release_with_a_broken_first_row_stays_a_release(tmp_path):
    from silkie.tools.prepare import is_preference_file

    (tmp_path / "release.jsonl").write_text(json.dumps({"id": "1", "prompt": "Q", "models": ["a", "b"]}) + "\n")
    (tmp_path / "swift.jsonl").write_text(json.dumps(swift_row(0)) + "\n")
    assert not is_preference_file(tmp_path / "release.jsonl") and is_preference_file(tmp_path / "swift.jsonl")


def test_flat_files_with_a_key_named_like_a_section(tmp_path):
    (tmp_path / "silkie.yaml").write_text("model_name_or_path: m\nuse_lora: true\ndeepspeed: ds.json\n")
    assert load_recipe(tmp_path / "silkie.yaml").deepspeed.config == "ds.json"  # the original's flat key
    swift = "model: Qwen/Qwen2-VL-2B\nrlhf_type: dpo\ntrain_type: lora\nlearning_rate: 1e-5\n"
    (tmp_path / "swift.yaml").write_text(swift)
    with pytest.raises(RecipeError, match=r"this looks like a LLaMA-Factory or ms-swift recipe.*'model' \(did you "
                                          r"mean 'model.path'\?\), 'rlhf_type' \(dpo.loss_type"):  # fmt: skip
        load_recipe(tmp_path / "swift.yaml")


def test_hub_shards_of_other_split_names_and_one_unnamed_group(tmp_path):
    from .test_embedded_media import png_bytes, write_trl_parquet

    shards = tmp_path / "ultra"
    shards.mkdir()
    for split, count in (("train_prefs", 2), ("train_sft", 1)):
        write_trl_parquet(shards / f"{split}-00000-of-00001.parquet", [png_bytes((count, 0, 0))] * count)
    section = DataSection(source="preference", path=str(shards), split="train_prefs", eval_fraction=0.0)
    assert build_pairs(section, tmp_path / "media")[3].rows_seen == 2
    with pytest.raises(InputError, match=r"are of the splits \['train_prefs', 'train_sft'\], none of \['train'\]"):
        build_pairs(DataSection(source="preference", path=str(shards)), tmp_path / "media")
    one = tmp_path / "one"
    one.mkdir()
    for shard in range(2):  # `data-0000N-of-00002`: one group that names no split, read whole
        write_trl_parquet(one / f"data-0000{shard}-of-00002.parquet", [png_bytes((shard, 9, 0))])
    assert build_pairs(DataSection(source="preference", path=str(one)), tmp_path / "media")[3].rows_seen == 2


def test_what_a_row_lacks_is_said_as_it_is(tmp_path):
    with pytest.raises(RowError, match="rejected is null"):
        normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": None})
    with pytest.raises(RowError, match=r"chosen / rejected messages beside the conversation"):
        normalize_preference_row({"conversations": [{"from": "human", "value": "Q"}]})
    wide = {name: "x" for name in ("question", "good", "bad", "a", "b", "c", "d", "e", "f")}
    with pytest.raises(RowError, match=r"the row has a, b, bad, c, d, e, f, good \(\+1 more\)"):
        normalize_preference_row(wide)
    with pytest.raises(RecipeError, match=r"data.columns = 'imagess' is not allowed; .*did you mean 'images'"):
        DataSection(source="preference", path="x", columns={"imagess": "image"}).check()


def test_an_error_in_the_file_and_one_in_an_override_name_both(tmp_path):
    recipe = DEMO_RECIPE.read_text().replace("  seed: 0\nlora:", "  seed: 0\n  colums: {}\nlora:")
    (tmp_path / "r.yaml").write_text(recipe)
    with pytest.raises(RecipeError, match=r"r.yaml and override 'data.splt=x': recipe: unknown keys 'data.colums'"):
        load_recipe(tmp_path / "r.yaml", ["data.splt=x"])
