"""Pictures held in the rows (a `datasets` Image column, parquet `{bytes, path}` structs, as TRL's hub datasets ship
them) are written once, content-addressed, into the data cache and read back byte for byte."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from silkie.config import DataSection
from silkie.data.build import build_pairs
from silkie.data.embedded import EmbeddedMedia
from silkie.data.sources import load_preference_file, normalize_preference_row
from silkie.errors import InputError

from .data_fixtures import jpeg_bytes

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is it?"}]}


def png_bytes(colour: tuple[int, int, int], size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_trl_parquet(path: Path, pictures: list[bytes]) -> Path:
    """rlaif-v_formatted's layout: conversational prompt / chosen / rejected and an `images` list of structs."""
    rows = [
        {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"Colour {index}."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "No colour."}]}],
            "images": [{"bytes": picture, "path": None}],
        }
        for index, picture in enumerate(pictures)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_a_parquet_of_pictures_in_rows_is_written_out_once_per_picture(tmp_path):
    red, blue = jpeg_bytes((200, 30, 30)), png_bytes((30, 30, 200))
    parquet = write_trl_parquet(tmp_path / "pairs.parquet", [red, blue, red])
    media = EmbeddedMedia(tmp_path / "media")
    loaded = load_preference_file(parquet, media=media)
    assert not loaded.skipped and [row.prompt for row in loaded.rows] == ["<image>Which colour is it?"] * 3
    keys = [row.images[0] for row in loaded.rows]
    assert keys[0] == keys[2] != keys[1] and keys[0].endswith(".jpg") and keys[1].endswith(".png")
    assert keys[0].startswith("embedded/") and media.keys_given == 3
    assert [(tmp_path / "media" / key).read_bytes() for key in keys] == [red, blue, red]
    assert len(list((tmp_path / "media").rglob("*.*"))) == 2  # the shared picture once, no staging file left
    assert load_preference_file(parquet, media=EmbeddedMedia(tmp_path / "media")).rows == loaded.rows  # a rerun


def test_a_saved_image_column_is_read_as_stored_not_decoded(tmp_path):
    import datasets

    pictures = [Image.new("RGB", (5, 4), (10 * i, 100, 50)) for i in range(3)]
    dataset = datasets.Dataset.from_dict({"prompt": [f"<image>Q{i}?" for i in range(3)], "chosen": ["a"] * 3,
                                          "rejected": ["b"] * 3, "image": pictures})  # fmt: skip
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    stored = [row["image"]["bytes"] for row in dataset.cast_column("image", datasets.Image(decode=False))]
    loaded = load_preference_file(tmp_path / "saved", media=EmbeddedMedia(tmp_path / "media"))
    assert [(tmp_path / "media" / row.images[0]).read_bytes() for row in loaded.rows] == stored
    assert [Image.open(tmp_path / "media" / row.images[0]).getpixel((0, 0)) for row in loaded.rows] == [
        (0, 100, 50), (10, 100, 50), (20, 100, 50)]  # fmt: skip


def test_path_only_and_pil_pictures_become_keys(tmp_path):
    media = EmbeddedMedia(tmp_path / "media")
    row = normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": "b",
                                    "images": [{"bytes": None, "path": "pictures/1.jpg"}]}, media)  # fmt: skip
    assert row.images == ("pictures/1.jpg",)  # a file under data.images
    red = jpeg_bytes((200, 30, 30))
    (tmp_path / "red.jpg").write_bytes(red)  # an absolute path (Dataset.to_parquet of a cast Image column)
    row = normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": "b",
                                    "images": [{"bytes": None, "path": str(tmp_path / "red.jpg")}]}, media)  # fmt: skip
    media.commit()
    assert (tmp_path / "media" / row.images[0]).read_bytes() == red
    row = normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": "b",
                                    "image": Image.new("CMYK", (3, 3), (1, 2, 3, 0))}, media)  # fmt: skip
    media.commit()
    assert Image.open(tmp_path / "media" / row.images[0]).mode == "RGB"  # PNG holds no CMYK
    with pytest.raises(ValueError, match=r"images\[0\]: cannot read /no/such.jpg"):
        normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": "b",
                                  "images": [{"bytes": None, "path": "/no/such.jpg"}]}, media)  # fmt: skip
    with pytest.raises(ValueError, match=r"images\[0\] holds neither bytes nor a path"):
        normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": "b",
                                  "images": [{"bytes": None, "path": None}]}, media)  # fmt: skip


def test_a_run_reads_pictures_in_rows_and_files_of_data_images_side_by_side(tmp_path):
    red = jpeg_bytes((200, 30, 30))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "blue.png").write_bytes(png_bytes((30, 30, 200)))
    rows = [{"id": "in-row", "prompt": "<image>Q?", "chosen": "a", "rejected": "b",
             "images": [{"bytes": red, "path": "red.jpg"}]},
            {"id": "file", "prompt": "<image>Q?", "chosen": "a", "rejected": "b",
             "images": [{"bytes": None, "path": "blue.png"}]}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    section = DataSection(source="preference", path=str(tmp_path / "pairs.parquet"), images=str(tmp_path / "files"),
                          eval_fraction=0.0)  # fmt: skip
    pairs, _, store, _ = build_pairs(section, tmp_path / "cache" / "media")
    by_id = {pair.prompt_id: pair for pair in pairs}
    assert store.read_bytes(by_id["in-row"].images[0]) == red and by_id["in-row"].images[0].endswith(".jpg")
    assert store.open(by_id["file"].images[0]).getpixel((0, 0)) == (30, 30, 200)
    alone = DataSection(source="preference", path=str(tmp_path / "pairs.parquet"), eval_fraction=0.0)
    with pytest.raises(InputError, match=r"data.images is not set, but .* \(row file: blue.png\)"):
        build_pairs(alone, tmp_path / "cache" / "media")  # the row held no picture: its file needs data.images
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "pairs.parquet")
    pairs, _, store, _ = build_pairs(alone, tmp_path / "cache" / "media")  # pictures held in rows need none
    assert store.read_bytes(pairs[0].images[0]) == red


def test_prepare_writes_the_pictures_in_rows_into_its_images_folder(tmp_path, capsys):
    from silkie.tools.prepare_cli import main

    red, blue = jpeg_bytes((200, 30, 30)), png_bytes((30, 30, 200))
    parquet = write_trl_parquet(tmp_path / "pairs.parquet", [red, blue, red])
    assert main([str(parquet), str(tmp_path / "pictures"), "--verify-images", "--strict"]) == 0
    out = capsys.readouterr().out
    assert f"3 held in the rows, written to {tmp_path / 'pictures' / 'embedded'}/" in out
    assert "rows with media 3, missing 0" in out and "decoded 3 of 3 present, unreadable 0" in out
    assert sorted(path.read_bytes() for path in (tmp_path / "pictures").rglob("*.*")) == sorted([red, blue])


def rlaif_v_rows(pictures: list[bytes]) -> list[dict]:
    """openbmb/RLAIF-V-Dataset's layout: `question` (no `<image>` marker), an embedded `image`, `idx`."""
    return [{"ds_name": "vqa", "image": {"bytes": picture, "path": None}, "question": f"What colour is {index}?",
             "chosen": "Red.", "rejected": "Blue.", "idx": str(100 + index), "image_path": f"{index}.jpg"}
            for index, picture in enumerate(pictures)]  # fmt: skip


def test_data_columns_reads_a_file_with_its_own_column_names(tmp_path):
    red = jpeg_bytes((200, 30, 30))
    rows = rlaif_v_rows([red, png_bytes((30, 30, 200))])
    rows.append({**rows[0], "question": None, "idx": "bad"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rlaif.parquet")
    section = DataSection(source="preference", path=str(tmp_path / "rlaif.parquet"), eval_fraction=0.0,
                          columns={"prompt": "question", "id": "idx"})  # fmt: skip
    section.check()
    pairs, _, store, report = build_pairs(section, tmp_path / "media")
    assert [(p.prompt_id, p.prompt) for p in pairs] == [("100", "What colour is 0?"), ("101", "What colour is 1?")]
    assert store.read_bytes(pairs[0].images[0]) == red
    assert report.rows_dropped == {"missing_field": 1} and "question (data.columns.prompt)" in report.summary()
    by_path = DataSection(source="preference", path=str(tmp_path / "rlaif.parquet"), images=str(tmp_path),
                          eval_fraction=0.0, columns={"prompt": "question", "image": "image_path"})  # fmt: skip
    (tmp_path / "0.jpg").write_bytes(red)
    (tmp_path / "1.jpg").write_bytes(red)
    assert [p.images for p in build_pairs(by_path, tmp_path / "media")[0]] == [("0.jpg",), ("1.jpg",)]


@pytest.mark.parametrize(
    ("columns", "source", "message"),
    [({"promt": "question"}, "preference", "data.columns = 'promt' is not allowed; .* \\(did you mean 'prompt'\\?\\)"),
     ({"prompt": "q", "chosen": "q"}, "preference", "expected one field per column"),
     ({"prompt": "question"}, "vlfeedback", "data.source is 'vlfeedback', whose schema is fixed")],
)  # fmt: skip
def test_data_columns_names_fields_a_row_has(columns, source, message):
    from silkie.config import RecipeError

    with pytest.raises(RecipeError, match=message):
        DataSection(source=source, path="x", columns=columns).check()


def test_prepare_checks_a_file_with_its_own_column_names(tmp_path, capsys):
    from silkie.tools.prepare_cli import main

    pq.write_table(pa.Table.from_pylist(rlaif_v_rows([jpeg_bytes()] * 2)), tmp_path / "rlaif.parquet")
    args = [str(tmp_path / "rlaif.parquet"), str(tmp_path / "pictures"), "--strict"]
    assert main([*args, "--columns", "prompt=question,id=idx"]) == 0
    assert "pairs kept                     2" in capsys.readouterr().out
    assert main(args) == 2  # without the mapping no row has a prompt: no pairs, said in one line
    assert "dropped={missing_field: 2 (first: row 0: prompt (the row has chosen, ds_name, idx, image, image_path, " \
        "question, rejected; data.columns maps other names))}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--columns", "question"])


def test_a_short_file_left_at_a_key_is_written_again(tmp_path):
    red = jpeg_bytes((200, 30, 30))
    parquet = write_trl_parquet(tmp_path / "pairs.parquet", [red])
    key = load_preference_file(parquet, media=EmbeddedMedia(tmp_path / "media")).rows[0].images[0]
    (tmp_path / "media" / key).write_bytes(red[:10])  # a crash, or a partial copy of the cache
    load_preference_file(parquet, media=EmbeddedMedia(tmp_path / "media"))
    assert (tmp_path / "media" / key).read_bytes() == red
    assert [p.name for p in (tmp_path / "media").rglob(".*")] == []  # no staging file left


def test_max_prompts_writes_only_the_pictures_of_the_prompts_it_keeps(tmp_path):
    pictures = [png_bytes((10 * index, 0, 0)) for index in range(6)]
    parquet = write_trl_parquet(tmp_path / "pairs.parquet", pictures)  # one prompt per picture
    section = DataSection(source="preference", path=str(parquet), eval_fraction=0.0, max_prompts=2)
    pairs, _, _, _ = build_pairs(section, tmp_path / "media")
    written = sorted(path.read_bytes() for path in (tmp_path / "media").rglob("*.*"))
    assert len(pairs) == 2 and written == sorted(pictures[:2])


def test_pictures_prepare_wrote_into_data_images_are_not_written_again(tmp_path):
    from silkie.tools.prepare_cli import main

    red = jpeg_bytes((200, 30, 30))
    parquet = write_trl_parquet(tmp_path / "pairs.parquet", [red, red])
    assert main([str(parquet), str(tmp_path / "pictures")]) == 0
    section = DataSection(source="preference", path=str(parquet), images=str(tmp_path / "pictures"),
                          eval_fraction=0.0)  # fmt: skip
    pairs, _, store, _ = build_pairs(section, tmp_path / "cache" / "media")
    assert store.read_bytes(pairs[0].images[0]) == red and not list((tmp_path / "cache").rglob("*.*"))


def test_a_file_named_embedded_under_data_images_is_read_from_there(tmp_path):
    (tmp_path / "files" / "embedded").mkdir(parents=True)
    (tmp_path / "files" / "embedded" / "a.png").write_bytes(png_bytes((1, 2, 3)))
    rows = [{"id": "file", "prompt": "Q", "chosen": "a", "rejected": "b", "images": [{"bytes": None,
                                                                                       "path": "embedded/a.png"}]},
            {"id": "held", "prompt": "Q2", "chosen": "a", "rejected": "b",
             "images": [{"bytes": png_bytes((4, 5, 6)), "path": None}]}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    section = DataSection(source="preference", path=str(tmp_path / "pairs.parquet"), images=str(tmp_path / "files"),
                          eval_fraction=0.0)  # fmt: skip
    pairs, _, store, report = build_pairs(section, tmp_path / "media")
    assert report.pairs_kept == 2 and store.open("embedded/a.png").getpixel((0, 0)) == (1, 2, 3)


def test_a_folder_of_hub_parquet_shards_reads_its_train_and_test_splits(tmp_path):
    shards = tmp_path / "rlaif-v_formatted" / "data"
    shards.mkdir(parents=True)
    for split, count in (("train", 3), ("test", 1)):
        for shard in range(2):
            write_trl_parquet(shards / f"{split}-0000{shard}-of-00002.parquet", [png_bytes((shard, count, 0))] * count)
    section = DataSection(source="preference", path=str(tmp_path / "rlaif-v_formatted"),
                          eval_path=str(tmp_path / "rlaif-v_formatted"))  # fmt: skip
    pairs, held_out, _, report = build_pairs(section, tmp_path / "media")
    assert report.rows_seen == 6 and len(held_out) == 2  # train's 2 x 3 rows; test's 2 x 1 held out
    with pytest.raises(InputError, match=r"are of the splits \['test', 'train'\], none of \['validation'\]"):
        load_preference_file(tmp_path / "rlaif-v_formatted", splits=("validation",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is a folder with neither a saved dataset nor parquet files"):
        load_preference_file(tmp_path / "empty")


def test_data_columns_naming_no_column_of_the_file_is_refused_and_a_field_named_column_moves(tmp_path):
    rows = rlaif_v_rows([jpeg_bytes()])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rlaif.parquet")
    with pytest.raises(InputError, match=r"data.columns.image = 'imgg' names no column of .*rlaif.parquet \(its "
                                         r"columns: chosen, ds_name, idx, image, image_path, question"):  # fmt: skip
        load_preference_file(tmp_path / "rlaif.parquet", media=EmbeddedMedia(tmp_path / "media"),
                             columns={"prompt": "question", "image": "imgg"})  # fmt: skip
    listed = [{**row, "image": [row["image"]] * 2} for row in rows]  # a list of pictures in a column `image`
    pq.write_table(pa.Table.from_pylist(listed), tmp_path / "listed.parquet")
    loaded = load_preference_file(tmp_path / "listed.parquet", media=EmbeddedMedia(tmp_path / "media"),
                                  columns={"prompt": "question", "images": "image"})  # fmt: skip
    assert not loaded.skipped and len(loaded.rows[0].images) == 2  # not "both image and images are set"
