"""TRL's conversational preference format (and a `datasets` save_to_disk folder of it) read as plain pairs; what
a preference row cannot hold is refused by row, with its reason."""

from __future__ import annotations

import pytest

from silkie.data.sources import RowError, load_preference_file, normalize_preference_row

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is the circle?"}]}
CHOSEN = [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
REJECTED = [{"role": "assistant", "content": "Blue."}]


def test_a_conversational_pair_becomes_text_with_a_marker_where_the_image_was():
    row = normalize_preference_row({"id": "c1", "prompt": [USER], "chosen": CHOSEN, "rejected": REJECTED,
                                    "images": ["a.jpg"]})  # fmt: skip
    assert (row.prompt, row.chosen, row.rejected, row.images) == (
        "<image>Which colour is the circle?", "Red.", "Blue.", ("a.jpg",))  # fmt: skip
    two = {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                       {"type": "text", "text": " and "}, {"type": "video"}]}  # fmt: skip
    row = normalize_preference_row({"prompt": [two], "chosen": "x", "rejected": "y", "images": ["a.jpg"],
                                    "videos": ["v.mkv"]})  # fmt: skip
    assert row.prompt == "Compare <image> and <video>"


def test_the_implicit_prompt_is_the_turns_both_conversations_share():
    row = normalize_preference_row({"chosen": [USER, *CHOSEN], "rejected": [USER, *REJECTED], "image": "a.jpg"})
    assert (row.prompt, row.chosen, row.rejected) == ("<image>Which colour is the circle?", "Red.", "Blue.")


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [({"prompt": [USER, USER], "chosen": CHOSEN, "rejected": REJECTED},
      "unsupported_conversation", "prompt has the roles ['user', 'user']; user and assistant messages alternate"),
     ({"prompt": [USER, *CHOSEN], "chosen": CHOSEN, "rejected": REJECTED},
      "unsupported_conversation", "prompt has the roles ['user', 'assistant']"),
     ({"prompt": [USER], "chosen": [*CHOSEN, *CHOSEN], "rejected": REJECTED}, "unsupported_conversation",
      "chosen has the roles ['assistant', 'assistant']"),
     ({"prompt": [{"role": "user", "content": [{"type": "audio"}]}], "chosen": "a", "rejected": "b"}, "wrong_type",
      "prompt[0]: a part {'type': 'audio'}"),
     ({"prompt": "Q", "chosen": ["a", "b"], "rejected": "b"}, "wrong_type",
      "chosen[0] is str (expected a {role, content} or {from, value} message)"),
     ({"prompt": "Q", "chosen": "a", "rejected": "b", "images": [{"bytes": b"\xff\xd8", "path": None}]},
      "embedded_media", "images[0] holds the picture itself (a datasets Image column): checking it needs a folder")],
)  # fmt: skip
def test_what_a_row_cannot_hold_is_refused_with_its_reason(raw, reason, detail):
    with pytest.raises(RowError) as caught:
        normalize_preference_row(raw)
    assert caught.value.reason == reason and caught.value.detail.startswith(detail)


def test_a_saved_dataset_of_conversational_pairs_loads_as_a_preference_source(tmp_path):
    import datasets

    rows = [{"id": f"p{i}", "prompt": [USER], "chosen": CHOSEN, "rejected": REJECTED, "images": ["a.jpg"]}
            for i in range(3)]  # fmt: skip
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "pairs"))
    loaded = load_preference_file(tmp_path / "pairs")
    assert [row.id for row in loaded.rows] == ["p0", "p1", "p2"] and not loaded.skipped
    assert loaded.rows[0].prompt == "<image>Which colour is the circle?" and loaded.rows[0].chosen == "Red."


def test_a_picture_held_in_the_row_is_refused_where_no_folder_takes_it():
    from PIL import Image

    with pytest.raises(RowError) as caught:
        normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": "b", "image": Image.new("RGB", (4, 4))})
    assert caught.value.reason == "embedded_media" and caught.value.detail.startswith("image holds the picture itself")


def test_prepare_tells_a_json_array_of_pairs_from_a_release(tmp_path):
    import json

    from silkie.tools.prepare import is_preference_file

    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "one_line.json").write_text(json.dumps(rows))
    (tmp_path / "release.jsonl").write_text(json.dumps({"id": "1", "prompt": "Q", "completions": []}) + "\n")
    assert is_preference_file(tmp_path / "pretty.json") and is_preference_file(tmp_path / "one_line.json")
    assert not is_preference_file(tmp_path / "release.jsonl")
    for name in ("pretty.json", "release.jsonl"):  # a byte-order mark (Windows editors) changes nothing
        marked = tmp_path / f"bom-{name}"
        marked.write_bytes(b"\xef\xbb\xbf" + (tmp_path / name).read_bytes())
        assert is_preference_file(marked) == is_preference_file(tmp_path / name)


def test_llama_factory_s_alpaca_rows_read_their_instruction_and_input_as_the_prompt():
    """`instruction` / `input` (its alpaca layout) were refused as missing the prompt, and `input` was lost."""
    row = normalize_preference_row({"instruction": "Describe <image>.", "input": "Be brief.", "chosen": "A cat.",
                                    "rejected": "A dog.", "images": ["a.jpg"], "system": "You see."})  # fmt: skip
    assert (row.prompt, row.images, row.system) == ("Describe <image>.\nBe brief.", ("a.jpg",), "You see.")
    assert normalize_preference_row({"instruction": "Q", "input": "", "chosen": "a", "rejected": "b"}).prompt == "Q"
    with pytest.raises(RowError, match="input is int"):
        normalize_preference_row({"instruction": "Q", "input": 3, "chosen": "a", "rejected": "b"})
    implicit = normalize_preference_row({"instruction": "a task label", "chosen": [USER, *CHOSEN],
                                         "rejected": [USER, *REJECTED], "image": "a.jpg"})  # fmt: skip
    assert implicit.prompt == "<image>Which colour is the circle?"  # a conversation keeps its own prompt
