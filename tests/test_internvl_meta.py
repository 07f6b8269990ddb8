"""`silkie internvl-meta`: InternVL's data meta file (MMPR) as one preference file the trainer reads."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from silkie.tools.cli import ToolError


def write_mmpr(root):
    """MMPR's layout: images/<subset>/, annotations/<subset>.jsonl, meta.json with paths from the folder above."""
    rows = {
        "A": [
            {"image": "a0.png", "question": "<image>\nWhat colour?", "chosen": "Red.", "rejected": "Blue."},
            {"image": ["a1.png", "a2.png"], "question": "Compare <image> and <image>.", "chosen": "Same.",
             "rejected": "Different."},
            {"image": "a3.png", "question": "Shape?", "chosen": "A circle.", "rejected": "A square."},
            {"image": "a4.png", "question": "Broken row?", "rejected": "No chosen answer."},
        ],
        "B": [
            {"image": "b0.png", "question": "Count?", "chosen": "Two.", "rejected": "Five."},
            {"question": "Text only?", "chosen": "Yes.", "rejected": "No."},
        ],
    }  # fmt: skip
    meta = {}
    for subset, subset_rows in rows.items():
        (root / "MMPR" / "images" / subset).mkdir(parents=True)
        for row in subset_rows:
            for name in [row["image"]] if isinstance(row.get("image"), str) else row.get("image", []):
                Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "MMPR" / "images" / subset / name)
        annotation = root / "MMPR" / "annotations" / f"{subset}.jsonl"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        annotation.write_text("".join(json.dumps(row) + "\n" for row in subset_rows) + "not json\n")
        repeat = 0.5 if subset == "A" else 2
        meta[subset] = {"root": f"MMPR/images/{subset}", "annotation": f"MMPR/annotations/{subset}.jsonl",
                        "repeat_time": repeat, "length": len(subset_rows)}  # fmt: skip
    (root / "MMPR" / "meta.json").write_text(json.dumps(meta))
    return root / "MMPR" / "meta.json"


def test_a_meta_file_becomes_one_preference_file_with_its_repeats_and_images(tmp_path, monkeypatch, capsys):
    from silkie.cli import main
    from silkie.tools.prepare import PairRules, check_release

    meta = write_mmpr(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # elsewhere: the paths are found from the meta file's parent folder
    out = tmp_path / "pairs.jsonl"
    assert main(["internvl-meta", str(meta), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    images_root = (tmp_path / "data" / "MMPR" / "images").resolve()
    assert f"paths read from {tmp_path / 'data'}" in printed
    assert f"data.path={out} data.images={images_root}" in printed
    assert "skipped 1 as no_chosen (first: " in printed and "A.jsonl:4)" in printed
    assert "skipped 2 as not_json" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # A: 3 usable rows, repeat_time 0.5 -> 1 drawn; B: 2 rows x 2 copies
    assert [row["id"].split("/")[0] for row in rows] == ["A", "B", "B", "B", "B"]
    assert len({row["id"] for row in rows}) == 5 and {"B/1", "B/1#1", "B/2", "B/2#1"} == {r["id"] for r in rows[1:]}
    assert rows[1]["images"] == ["B/b0.png"] and rows[2]["images"] == [] and rows[2]["prompt"] == "Text only?"
    assert all((images_root / path).is_file() for row in rows for path in row["images"])
    report, pairs = check_release(out, images_root, PairRules())
    assert report.kind == "preference" and report.image_check.missing == 0 and len(pairs) == 5


def test_the_multi_image_row_keeps_its_order_and_the_draw_follows_the_seed(tmp_path):
    from silkie.tools.internvl_meta import convert_meta

    meta = write_mmpr(tmp_path)
    drawn = set()
    for seed in range(12):
        convert_meta(meta, tmp_path / f"{seed}.jsonl", base=tmp_path, seed=seed)
        first = json.loads((tmp_path / f"{seed}.jsonl").read_text().splitlines()[0])
        drawn.add(first["id"])
        if first["id"] == "A/2":
            assert first["images"] == ["A/a1.png", "A/a2.png"]
    assert drawn == {"A/1", "A/2", "A/3"}  # every usable row of A can be the drawn half
    again = convert_meta(meta, tmp_path / "again.jsonl", base=tmp_path, seed=3)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "3.jsonl").read_text() and again.rows_written == 5


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"A": {"root": "x"}}, "dataset 'A' has no annotation"),
        ({"A": {"root": "x", "annotation": "nowhere.jsonl"}}, "annotation 'nowhere.jsonl' is in none of"),
        ([], "expected a JSON object of datasets"),
    ],
)
def test_a_bad_meta_file_is_one_line_naming_what_is_wrong(meta, message, tmp_path):
    from silkie.tools.internvl_meta import convert_meta

    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ToolError, match=message):
        convert_meta(path, tmp_path / "out.jsonl", base=tmp_path)
    assert not (tmp_path / "out.jsonl").exists()


def test_repeats_are_taken_as_internvl_s_loader_takes_them_and_a_video_row_keeps_its_clip(tmp_path):
    """`LazySupervisedDataset`: repeat_time above 1 is `int(repeat_time)` copies; a `video` row's clip goes with it;
    per-dataset tile bounds are said, not applied."""
    from silkie.tools.internvl_meta import convert_meta, format_meta_report, read_meta

    meta = write_mmpr(tmp_path)
    entries = json.loads(meta.read_text())
    entries["B"] |= {"repeat_time": 1.5, "max_dynamic_patch": 6}
    meta.write_text(json.dumps(entries))
    with (tmp_path / "MMPR" / "annotations" / "B.jsonl").open("a") as file:
        file.write(json.dumps({"video": "clip.mp4", "question": "What moves?", "chosen": "A ball.",
                               "rejected": "Nothing."}) + "\n")  # fmt: skip
    report = convert_meta(meta, tmp_path / "out.jsonl", base=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report.per_dataset["B"] == {"rows": 3, "written": 3}  # 1.5 -> one copy
    assert rows[-1]["videos"] == ["B/clip.mp4"] and rows[-1]["images"] == []
    assert "max_dynamic_patch [6] is not applied: set model.max_tiles" in format_meta_report(report, "out.jsonl")
    entries["B"]["repeat_time"] = 0
    meta.write_text(json.dumps(entries))
    with pytest.raises(ToolError, match="dataset 'B' repeat_time 0.0 .expected a number above 0"):
        read_meta(meta, tmp_path)
