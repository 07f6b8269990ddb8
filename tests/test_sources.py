"""Loaders (release jsonl, `datasets` folders, generic preference files) and image stores."""

from __future__ import annotations

import multiprocessing
import pickle
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from silkie.data.images import (
    FolderImageStore,
    ImageLoadError,
    ZipImageStore,
    image_key,
    open_image_store,
)
from silkie.data.pairs import build_vlfeedback_pairs
from silkie.data.sources import load_preference_file, load_vlfeedback_hf, load_vlfeedback_jsonl
from silkie.errors import InputError
from tests.data_fixtures import clean_row, feedback_row, jpeg_bytes, to_columnar, write_jsonl, write_zip


def test_jsonl_loader_skips_and_counts_bad_rows(tmp_path):
    rows = [
        clean_row("good1"),
        "{not json",
        {"id": "noprompt", "models": [], "completions": clean_row("x")["completions"]},
        {"id": "badtype", "prompt": 7, "completions": []},
        feedback_row("single", [(5, 5, 5)]),
        {"id": "badcomp", "prompt": "p", "completions": "oops"},
        clean_row("good2"),
    ]
    loaded = load_vlfeedback_jsonl(write_jsonl(tmp_path / "vlfeedback_80k.jsonl", rows))
    assert [row.id for row in loaded] == ["good1", "good2"]
    assert loaded.rows_seen == 7
    assert loaded.skipped == {"bad_json": 1, "missing_field": 1, "wrong_type": 2, "too_few_completions": 1}
    assert loaded.skipped_ids["bad_json"] == ["line 2"]
    assert loaded.first_details["bad_json"] == "Expecting property name enclosed in double quotes at character 2"
    assert loaded.skipped_ids["wrong_type"] == ["badtype", "badcomp"]
    row = loaded.rows[0]
    assert row.images == ("merged_images/good1.jpg",) and len(row.completions) == 4
    assert row.completions[0].ratings == {"Helpfulness": "5", "Ethical Considerations": "5", "Visual Faithfulness": "5"}
    pairs, report = build_vlfeedback_pairs(loaded)
    assert len(pairs) == 12
    assert report.rows_seen == 7 and report.rows_kept == 2 and sum(report.rows_dropped.values()) == 5
    assert str(tmp_path) in report.summary()
    with pytest.raises(FileNotFoundError):
        load_vlfeedback_jsonl(tmp_path / "missing.jsonl")


def test_a_line_with_invalid_utf8_is_skipped_and_max_prompts_keeps_the_counts(tmp_path):
    from silkie.config import DataSection
    from silkie.data.build import build_pairs

    path = write_jsonl(tmp_path / "vlfeedback_80k.jsonl", [clean_row("a"), "{not json", clean_row("b"), clean_row("c")])
    with path.open("ab") as handle:
        handle.write(b'{"id": "\xff\xfe"}\n')
    loaded = load_vlfeedback_jsonl(path)
    assert [row.id for row in loaded] == ["a", "b", "c"]
    assert loaded.skipped == {"bad_json": 1, "bad_encoding": 1} and loaded.skipped_ids["bad_encoding"] == ["line 5"]
    images = write_zip(tmp_path / "images.zip", {f"merged_images/{i}.jpg": jpeg_bytes() for i in "abc"})
    train, _, _, report = build_pairs(DataSection(path=str(path), images=str(images), max_prompts=2))
    assert {pair.prompt_id for pair in train} == {"a", "b"}
    assert report.rows_kept == 2 and report.rows_dropped == {"bad_json": 1, "bad_encoding": 1}


def _columnar_dataset(rows):
    annotation = {"Rating": datasets.Value("string"), "Rationale": datasets.Value("string")}
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "models": datasets.List(datasets.Value("string")),
            "completions": {
                "model": datasets.List(datasets.Value("string")),
                "response": datasets.List(datasets.Value("string")),
                "annotations": datasets.List(
                    {aspect: annotation for aspect in ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")}
                ),
            },
            "img_path": datasets.Value("string"),
        }
    )
    columnar = [to_columnar(row) | {"img_path": f"merged_images/{row['id']}.jpg"} for row in rows]
    return datasets.Dataset.from_list(columnar, features=features)


def test_hf_saved_folder_columnar_matches_jsonl(tmp_path):
    rows = [clean_row("a"), feedback_row("b", [(1, 2, 3), (3, 2, 1), (5, 4, 5), ("N/A", 1, 1)])]
    dataset = _columnar_dataset(rows)
    assert isinstance(dataset[0]["completions"], dict)  # really the hub's columnar layout
    dataset.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dict"))
    from_jsonl = build_vlfeedback_pairs(load_vlfeedback_jsonl(write_jsonl(tmp_path / "v.jsonl", rows)))[0]
    assert build_vlfeedback_pairs(load_vlfeedback_hf(tmp_path / "flat"))[0] == from_jsonl
    assert build_vlfeedback_pairs(load_vlfeedback_hf(tmp_path / "dict", split="train"))[0] == from_jsonl
    with pytest.raises(InputError, match="data.split: .test. is not in saved dataset"):
        load_vlfeedback_hf(tmp_path / "dict", split="test")


def test_hf_offline_failure_names_the_dataset(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="MMInstruction/VLFeedback"):
        load_vlfeedback_hf("MMInstruction/VLFeedback")


def test_preference_file_jsonl_and_parquet(tmp_path):
    rows = [
        {"id": "1", "prompt": "Q", "chosen": "a", "rejected": "b", "image": "img/1.png"},
        {"id": "2", "prompt": "Q", "chosen": "a", "rejected": "b", "images": ["img/2.png"]},
        {"id": "3", "prompt": "Q", "chosen": "a", "rejected": "b", "images": ["y.png", "x.png"], "video": "v.mp4"},
        {"id": "4", "prompt": "Q", "chosen": "a"},
        {"prompt": "Q5", "chosen": "a", "rejected": "b"},
        {"id": "6", "prompt": "Q", "chosen": "a", "rejected": "b", "image": "a.png", "images": ["b.png"]},
        {"id": "7", "prompt": "Q", "chosen": "a", "rejected": "b", "videos": ["v.mp4", ""]},
    ]
    loaded = load_preference_file(write_jsonl(tmp_path / "prefs.jsonl", rows))
    assert [r.images for r in loaded] == [("img/1.png",), ("img/2.png",), ("y.png", "x.png"), ()]  # order kept
    assert [r.videos for r in loaded] == [(), (), ("v.mp4",), ()]
    assert loaded.skipped == {"missing_field": 1, "wrong_type": 2}
    assert loaded.first_details["wrong_type"] == "both image and images are set; give one of them"
    assert loaded.rows[3].id.startswith("pref-")
    pq.write_table(pa.Table.from_pylist([rows[0], rows[4]]), tmp_path / "prefs.parquet")
    from_parquet = load_preference_file(tmp_path / "prefs.parquet")
    assert [r.id for r in from_parquet] == ["1", loaded.rows[3].id]
    with pytest.raises(ValueError):
        load_preference_file(write_jsonl(tmp_path / "prefs.csv", rows))


def test_an_id_reused_for_another_prompt_is_dropped_and_reported():
    """Rows of one id are several pairs of one prompt (split and capped together); a row that reuses the id for
    another prompt or image would be merged with them, so it is left out and named."""
    from silkie.data.pairs import pairs_from_preference_rows

    rows = [
        {"id": "r0", "prompt": "Q", "chosen": "a", "rejected": "b", "image": "x.png"},
        {"id": "r0", "prompt": "Q", "chosen": "a", "rejected": "c", "image": "x.png"},  # a second pair of r0
        {"id": "r0", "prompt": "Other", "chosen": "a", "rejected": "b", "image": "x.png"},
        {"id": "r0", "prompt": "Q", "chosen": "a", "rejected": "b", "image": "y.png"},
        {"id": "r1", "prompt": "Other", "chosen": "a", "rejected": "b"},
    ]
    pairs, report = pairs_from_preference_rows(rows)
    assert [(p.prompt_id, p.prompt, p.rejected) for p in pairs] == [
        ("r0", "Q", "b"),
        ("r0", "Q", "c"),
        ("r1", "Other", "b"),
    ]
    assert report.rows_dropped == {"reused_id": 2} and report.pairs_kept == 3
    reused = "reused_id: 2 (first: r0: the id of an earlier row with another prompt (question, or first turn) or media)"
    assert reused in report.summary()


def test_image_key_resolution():
    assert image_key(row_id="abc") == "merged_images/abc.jpg"
    assert image_key(img_path="abc.jpg") == "merged_images/abc.jpg"
    assert image_key(img_path="/data/vlf/merged_images/abc.jpg") == "merged_images/abc.jpg"
    assert image_key(row_id="ignored", img_path="other/dir/x.png") == "other/dir/x.png"


def test_zip_store_reads_members_without_extracting(tmp_path):
    zip_path = write_zip(
        tmp_path / "merged_images.zip",
        {
            "merged_images/red.jpg": jpeg_bytes((220, 20, 20)),
            "merged_images/broken.jpg": b"not a jpeg",
        },
    )
    store = open_image_store(zip_path)
    assert isinstance(store, ZipImageStore)
    image = store.open("merged_images/red.jpg")
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert image.getpixel((4, 4))[0] > 180
    assert store.exists("red.jpg") and store.open("red.jpg").size == (8, 8)  # prefix-less key
    assert not store.exists("merged_images/blue.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged_images.zip"]  # nothing extracted
    with pytest.raises(ImageLoadError) as missing:
        store.open("merged_images/blue.jpg")
    assert missing.value.key == "merged_images/blue.jpg" and "not in" in missing.value.reason
    with pytest.raises(ImageLoadError, match="corrupt"):
        store.open("merged_images/broken.jpg")
    clone = pickle.loads(pickle.dumps(store))  # picklable for spawned workers, reopens lazily
    assert clone.open("red.jpg").size == (8, 8)


def _read_in_child(store, queue):
    queue.put(store.open("merged_images/red.jpg").size)


def test_zip_store_is_safe_after_fork(tmp_path):
    store = ZipImageStore(write_zip(tmp_path / "m.zip", {"merged_images/red.jpg": jpeg_bytes()}))
    store.open("red.jpg")  # handle opened in the parent
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(store, queue))
    child.start()
    child.join(timeout=20)
    assert child.exitcode == 0 and queue.get(timeout=5) == (8, 8)


def test_folder_store(tmp_path):
    (tmp_path / "merged_images").mkdir()
    (tmp_path / "merged_images" / "a.jpg").write_bytes(jpeg_bytes())
    store = open_image_store(tmp_path)
    assert isinstance(store, FolderImageStore)
    assert store.exists("merged_images/a.jpg") and store.exists("a.jpg")
    assert store.open("a.jpg").mode == "RGB"
    assert not store.exists("../escape.jpg")
    with pytest.raises(ImageLoadError):
        store.open("merged_images/b.jpg")
    inner = FolderImageStore(tmp_path / "merged_images")  # root = the image folder itself
    assert inner.exists("merged_images/a.jpg")
    with pytest.raises(FileNotFoundError):
        open_image_store(tmp_path / "nope.zip")


def test_missing_image_rows_dropped_with_store(tmp_path):
    store = ZipImageStore(write_zip(tmp_path / "m.zip", {"merged_images/a.jpg": jpeg_bytes()}))
    pairs, report = build_vlfeedback_pairs([clean_row("a"), clean_row("b")], image_store=store)
    assert {p.prompt_id for p in pairs} == {"a"}
    assert report.rows_dropped == {"missing_image": 1} and report.offending_ids["missing_image"] == ["b"]
    assert re.search(r"missing_image: 1 \(first: b: merged_images/b.jpg not in \S*/m.zip, which holds e.g. "
                     r"merged_images/a.jpg\)", report.summary())  # fmt: skip


def test_a_re_zipped_release_is_read_through_its_top_folder_and_another_layout_is_named(tmp_path):
    # zipping the unpacked release folder again puts a folder above merged_images/
    nested = ZipImageStore(write_zip(tmp_path / "n.zip", {"VLFeedback/merged_images/a.jpg": jpeg_bytes()}))
    assert nested.exists("merged_images/a.jpg") and nested.open("a.jpg").size == (8, 8)
    assert not nested.exists("merged_images/b.jpg")
    mac = {"VLFeedback/merged_images/a.jpg": jpeg_bytes(), "__MACOSX/VLFeedback/merged_images/._a.jpg": b"\0"}
    assert ZipImageStore(write_zip(tmp_path / "mac.zip", mac)).open("a.jpg").size == (8, 8)  # Finder's twins ignored
    other = ZipImageStore(write_zip(tmp_path / "o.zip", {"images/": b"", "images/a.jpg": jpeg_bytes()}))
    with pytest.raises(ValueError, match=r"no usable .* not in \S*/o.zip, which holds e.g. images/a.jpg"):
        build_vlfeedback_pairs([clean_row("a")], image_store=other)
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "z.jpg").write_bytes(jpeg_bytes())
    assert FolderImageStore(folder).example() == "sub/z.jpg"


def test_images_of_every_mode_decode_to_the_right_rgb():
    """CMYK, palette, grey, 16-bit and float pictures: 16-bit and float would clip to white/black without scaling."""
    import io

    import numpy as np
    from PIL import Image

    from silkie.data.images import decode_image

    def encoded(image: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return buffer.getvalue()

    grey16 = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 50% of 65535
    floats = Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32), mode="F")
    cases = {
        "cmyk": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0), 8),
        "palette": (Image.new("RGB", (4, 4), (0, 0, 255)).convert("P"), "PNG", (0, 0, 255), 0),
        "grey": (Image.new("L", (4, 4), 100), "PNG", (100, 100, 100), 0),
        "grey16": (grey16, "PNG", (128, 128, 128), 0),
        "float": (floats, "TIFF", (64, 64, 64), 0),
    }
    for name, (image, fmt, expected, tolerance) in cases.items():
        pixel = decode_image(name, encoded(image, fmt)).getpixel((1, 1))
        assert max(abs(a - b) for a, b in zip(pixel, expected)) <= tolerance, (name, pixel)


def test_images_are_decoded_upright_by_their_exif_orientation(tmp_path):
    """A camera JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) comes out upright,
    in training's decoding and in the tools' `read_image` alike."""
    import io

    from PIL import Image

    from silkie.data.images import decode_image
    from silkie.tools.cli import read_image

    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # the stored image's left band is red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates 90 degrees clockwise
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    (tmp_path / "photo.jpg").write_bytes(buffer.getvalue())
    for upright in (decode_image("photo.jpg", buffer.getvalue()), read_image(tmp_path / "photo.jpg")):
        assert upright.size == (20, 40)
        red, blue = upright.getpixel((10, 3)), upright.getpixel((10, 30))  # after the turn the red band is on top
        assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60, (red, blue)


def test_rating_rules_set_for_a_preference_file_are_named_as_ignored(tmp_path, monkeypatch):
    """`data.min_margin` & co. build pairs from rated completions; a preference file's pairs are taken as given, so
    a recipe that sets them (demo.yaml's min_margin 1.0 with `data.source=preference`) is told they do nothing."""
    from silkie.config import DataSection
    from silkie.data import build

    path = write_jsonl(tmp_path / "prefs.jsonl", [{"id": "1", "prompt": "Q", "chosen": "a", "rejected": "b"}] * 1)
    said = []
    monkeypatch.setattr(build.logger, "warning", said.append)
    train, _, _, _ = build.build_pairs(
        DataSection(source="preference", path=str(path), min_margin=1.0, cap_strategy="random")
    )
    assert len(train) == 1  # the pair is kept: the margin rule does not apply to it
    assert said == [
        "data.source preference reads its pairs as given: data.min_margin = 1.0, data.cap_strategy = 'random' (rules "
        "that build pairs from ratings, for vlfeedback and hf) are ignored"
    ]
    said.clear()
    build.build_pairs(DataSection(source="preference", path=str(path)))
    assert said == []


def test_a_byte_order_mark_and_an_empty_id_are_read_as_rows_not_lost(tmp_path):
    """A BOM cost line 1 (bad_json) of a jsonl and the whole of a JSON array; an id of "" stopped the whole load
    with a ValueError naming no row."""
    import json

    rows = [clean_row("a"), {**clean_row("x"), "id": " "}, clean_row("b")]
    path = write_jsonl(tmp_path / "vlfeedback_80k.jsonl", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    loaded = load_vlfeedback_jsonl(path)
    assert [row.id for row in loaded] == ["a", "b"]
    assert loaded.skipped == {"missing_field": 1} and loaded.skipped_ids["missing_field"] == ["row 1"]
    rows = [{"id": f"p{i}", "prompt": "Q", "chosen": "good", "rejected": "bad", "images": []} for i in range(2)]
    for suffix, text in ((".json", json.dumps(rows)), (".jsonl", "\n".join(json.dumps(r) for r in rows))):
        pairs_file = tmp_path / f"pairs{suffix}"
        pairs_file.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [row.id for row in load_preference_file(pairs_file)] == ["p0", "p1"], suffix


def test_a_media_column_no_field_reads_is_refused_not_trained_as_text(tmp_path):
    """Rows with `image_path` trained as text only: no warning, held-out accuracy 1.0 on the answers alone."""
    import json

    rows = [{"idx": i, "question": "Q", "chosen": "a", "rejected": "b", "image_path": f"{i}.jpg", "has_image": True,
             "image_caption": "a red circle"} for i in range(3)]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InputError) as refused:
        load_preference_file(path, columns={"prompt": "question", "id": "idx"})
    assert str(refused.value) == (
        f"no row of {path} has a picture or video, yet its column 'image_path' holds their paths (Silkie reads "
        "image/images/video/videos): map it with data.columns: {images: image_path}"
    )
    read = load_preference_file(path, columns={"prompt": "question", "id": "idx", "image": "image_path"})
    assert [row.images for row in read] == [("0.jpg",), ("1.jpg",), ("2.jpg",)]
    text_only = [{**row, "image_path": None} for row in rows]  # a caption, a flag, an empty path: text only
    path.write_text("\n".join(json.dumps(r) for r in text_only))
    assert [row.images for row in load_preference_file(path, columns={"prompt": "question"})] == [(), (), ()]


def test_a_file_of_the_other_kind_names_the_data_source_that_reads_it(tmp_path):
    import json

    from silkie.data.pairs import pairs_from_preference_rows

    release = write_jsonl(tmp_path / "vlfeedback_80k.jsonl", [clean_row("a"), clean_row("b")])
    with pytest.raises(InputError, match=r"; its rows look like a VLFeedback release: data.source: vlfeedback$"):
        pairs_from_preference_rows(load_preference_file(release))
    ready = tmp_path / "pairs.jsonl"
    ready.write_text(json.dumps({"id": "p", "prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(InputError, match=r"; its rows look like a file of ready pairs: data.source: preference$"):
        build_vlfeedback_pairs(load_vlfeedback_jsonl(ready))


def test_a_media_path_that_is_a_folder_is_said_so(tmp_path):
    from silkie.data.pairs import pairs_from_preference_rows

    (tmp_path / "img" / "adir").mkdir(parents=True)
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg_bytes())
    rows = [{"id": "p0", "prompt": "Q", "chosen": "a", "rejected": "b", "image": "adir"},
            {"id": "p1", "prompt": "Q", "chosen": "a", "rejected": "b", "image": "a.jpg"}]  # fmt: skip
    _, report = pairs_from_preference_rows(rows, FolderImageStore(tmp_path / "img"))
    assert report.first_details["missing_image"] == f"p0: adir is a folder in .../{tmp_path.name}/img, not a file"


def test_a_picture_over_pil_s_pixel_limit_is_said_too_large_not_corrupt(monkeypatch):
    import io

    from silkie.data.images import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit, PIL's bomb error
    with pytest.raises(ImageLoadError, match=r"'big.png': too large to decode \(Image size \(4096 pixels\) exceeds"):
        decode_image("big.png", buffer.getvalue())
