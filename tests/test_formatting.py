"""Pair tokenization (Silkie chat format, truncation, on-disk cache) and the batch collator."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from silkie.data import formatting
from silkie.data.collator import DroppedPairWarning, PairCollator
from silkie.data.formatting import encode_pair, format_query, tokenize_pairs
from silkie.data.images import ZipImageStore
from silkie.data.pairs import PairReport, PreferencePair, build_vlfeedback_pairs
from silkie.data.sources import load_vlfeedback_jsonl
from silkie.dev.synthetic import write_synthetic_vlfeedback
from silkie.models.qwen_vl.family import QwenVLCodec
from silkie.models.qwen_vl.image_processing import QWenVLImageProcessor
from silkie.models.qwen_vl.tokenization import IMAGE_SLOTS, QWenTokenizer
from tests.data_fixtures import jpeg_bytes, write_tiny_vocab, write_zip

LONG = "There are two red circles in the picture and one blue square next to them. " * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return QWenTokenizer.from_pretrained(write_tiny_vocab(tmp_path_factory.mktemp("vocab")))


def _pair(
    prompt_id="p1",
    image="merged_images/p1.jpg",
    chosen="The image shows one blue square.",
    rejected="There are two red circles.",
):
    return PreferencePair(prompt_id, "Describe the image.", image, chosen, rejected, 5.0, 2.0)


def test_prompt_holds_exactly_one_image_span(tok):
    ids, reason = encode_pair("Describe the image.", "merged_images/p1.jpg", "yes", "no", tok)
    assert reason is None
    prompt = ids["prompt_input_ids"]
    assert prompt == tok.build_chat_context("Picture 1: <img>merged_images/p1.jpg</img>\nDescribe the image.")
    assert prompt.count(tok.img_start_id) == 1 and prompt.count(tok.img_end_id) == 1
    start, end = prompt.index(tok.img_start_id), prompt.index(tok.img_end_id)
    assert end - start + 1 == IMAGE_SLOTS + 2 == 258
    assert "Picture 1: <img>merged_images/p1.jpg</img>\nDescribe the image." in tok.decode(prompt)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    plain, _ = encode_pair("Describe the image.", None, "yes", "no", tok)
    assert tok.img_start_id not in plain["prompt_input_ids"]
    assert format_query("Q", None) == "Q" and "Picture" not in tok.decode(plain["prompt_input_ids"])
    # the Silkie repository's qwen_vl_prompt_format strips the prompt: a release prompt's trailing newline is dropped
    assert format_query("  Describe the image.\n", "p.jpg") == "Picture 1: <img>p.jpg</img>\nDescribe the image."


def test_answer_ids_are_exactly_the_answer_tokens(tok):
    ids, _ = encode_pair("Q", None, "The image shows one blue square.", "There are two red circles.", tok)
    assert ids["chosen_input_ids"] == tok.encode_answer("The image shows one blue square.")
    assert tok.decode(ids["chosen_input_ids"]) == "The image shows one blue square.<|im_end|>\n<|endoftext|>"
    assert tok.decode(ids["rejected_input_ids"]).startswith("There are two red circles.<|im_end|>")
    dataset = tokenize_pairs([_pair()], tok)
    row = dataset[0]
    assert row["prompt_id"] == "p1" and row["images"] == ["merged_images/p1.jpg"] and row["videos"] == []
    assert row["chosen_length"] == len(row["chosen_input_ids"]) == len(tok.encode_answer(_pair().chosen))
    assert row["length"] == row["prompt_length"] + max(row["chosen_length"], row["rejected_length"])


def test_truncation_answer_keeps_image_span_and_respects_max_length(tok):
    full, _ = encode_pair("Describe the image.", "merged_images/p1.jpg", LONG, "No.", tok)
    prompt_len = len(full["prompt_input_ids"])
    max_length = prompt_len + 6
    ids, reason = encode_pair("Describe the image.", "merged_images/p1.jpg", LONG, "No.", tok, max_length, "answer")
    assert reason is None and ids["prompt_input_ids"] == full["prompt_input_ids"]
    assert ids["chosen_input_ids"] == full["chosen_input_ids"][:6]
    assert ids["rejected_input_ids"] == full["rejected_input_ids"]  # short answer untouched
    longest = max(len(ids["chosen_input_ids"]), len(ids["rejected_input_ids"]))
    assert len(ids["prompt_input_ids"]) + longest <= max_length
    assert encode_pair("Q", "merged_images/p1.jpg", LONG, "No.", tok, 200, "answer") == (None, "prompt_too_long")
    room = len(tok.build_chat_context("Q")) + 10
    same_start = encode_pair("Q", None, LONG + "a", LONG + "b", tok, room, "answer")
    assert same_start == (None, "identical_after_truncation")


def test_drop_counts_too_long_in_report(tok):
    pairs = [_pair("short"), _pair("long", chosen=LONG)]
    prompt_len = len(tok.build_chat_context(format_query("Describe the image.", "merged_images/p1.jpg")))
    report = PairReport(pairs_kept=2)
    dataset = tokenize_pairs(pairs, tok, max_length=prompt_len + 40, truncation="drop", report=report)
    assert dataset["prompt_id"] == ["short"]
    assert report.pairs_dropped == {"too_long": 1} and report.pairs_kept == 1
    assert report.offending_ids["too_long"] == ["long"]
    with pytest.raises(ValueError) as empty:
        tokenize_pairs([_pair("p1", chosen=LONG)], tok, max_length=prompt_len + 5, split="held-out split")
    answer = len(tok.encode_answer(LONG))  # the longer answer, with its <|im_end|>
    assert str(empty.value) == (
        "held-out split: no pair left after tokenization, all 1 dropped (too_long: 1 (first: p1); "
        f"max_length = {prompt_len + 5}, truncation = drop; the first pair needs {prompt_len + answer} tokens: "
        f"prompt {prompt_len} (media included) + longer answer {answer})"
    )


def test_image_tags_in_text_are_rejected(tok):
    assert encode_pair("Q", None, "see <img>x.jpg</img>", "no", tok)[1] == "image_tag_in_text"
    templated = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
    assert encode_pair(templated, None, "yes", "no", tok) == (None, "chat_template_in_text")
    assert encode_pair("Q <img>y.jpg</img>", "merged_images/a.jpg", "a", "b", tok)[1] == "image_tag_in_text"
    assert encode_pair("Q", "k" * 300, "a", "b", tok)[1] == "bad_image_key"
    # the tokenizer refuses an unclosed <img> in the text: still the text's fault, not the image key's
    assert encode_pair("what does <img> mean?", "merged_images/a.jpg", "a", "b", tok)[1] == "image_tag_in_text"
    assert encode_pair("what does </img> mean?", None, "a", "b", tok)[1] == "image_tag_in_text"
    assert encode_pair("Q", "merged_images/a.jpg", "an <img> tag shows a picture", "b", tok)[1] == "image_tag_in_text"
    assert encode_pair("Q", None, "use <img src=x> in HTML", "b", tok)[1] is None  # no tag: plain text

    class BrokenTemplate(QwenVLCodec):
        def answer_ids(self, text):
            raise ValueError("the chat template renders prompt + answer without the prompt as a prefix")

    with pytest.raises(ValueError, match="chat template"):  # not a pair's fault: the run stops and says why
        encode_pair("Q", None, "a", "b", BrokenTemplate(tok))


def test_cache_is_reused(tok, tmp_path, monkeypatch):
    calls = []
    original = formatting._tokenize_batch

    def counting(batch, **kwargs):
        calls.append(len(batch["prompt_id"]))
        return original(batch, **kwargs)

    monkeypatch.setattr(formatting, "_tokenize_batch", counting)
    pairs = [_pair(f"p{i}") for i in range(10)] + [_pair("long", chosen=LONG)]
    first_report, second_report = PairReport(pairs_kept=11), PairReport(pairs_kept=11)
    limit = len(tok.build_chat_context(format_query("Describe the image.", "merged_images/p1.jpg"))) + 40
    first = tokenize_pairs(pairs, tok, max_length=limit, cache_dir=tmp_path, report=first_report)
    assert sum(calls) == 11
    second = tokenize_pairs(pairs, tok, max_length=limit, cache_dir=tmp_path, report=second_report)
    assert sum(calls) == 11  # not tokenized again
    assert second.to_list() == first.to_list() and len(second) == 10
    assert second_report.as_dict() == first_report.as_dict() and second_report.pairs_dropped == {"too_long": 1}
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 1 and all(f["filename"].startswith(str(entries[0])) for f in second.cache_files)
    tokenize_pairs(pairs, tok, max_length=limit + 1, cache_dir=tmp_path)  # other options -> other entry
    assert sum(calls) == 22 and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    (arrow,) = entries[0].glob("*.arrow")  # a cut cache file (a full disk, a copy stopped midway): built again
    del first, second
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    before = sorted(p.name for p in tmp_path.iterdir())
    rebuilt = tokenize_pairs(pairs, tok, max_length=limit, cache_dir=tmp_path)
    assert sum(calls) == 33 and len(rebuilt) == 10 and rebuilt[0]["prompt_id"] == "p0"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the same entry again, nothing left beside it
    again = tokenize_pairs(pairs, tok, max_length=limit, cache_dir=tmp_path)
    assert sum(calls) == 33 and again.to_list() == rebuilt.to_list()


def test_num_proc_gives_the_same_rows(tok):
    pairs = [_pair(f"p{i}", chosen=f"The image shows {i} squares.") for i in range(12)]
    assert tokenize_pairs(pairs, tok, num_proc=2).to_list() == tokenize_pairs(pairs, tok).to_list()


@pytest.fixture
def store(tmp_path):
    return ZipImageStore(
        write_zip(
            tmp_path / "merged_images.zip",
            {
                "merged_images/a.jpg": jpeg_bytes((200, 0, 0), 20),
                "merged_images/c.jpg": jpeg_bytes((0, 0, 200), 30),
            },
        )
    )


def test_collator_shapes_padding_and_image_counts(tok, store):
    rows = tokenize_pairs(
        [
            _pair("a", image="merged_images/a.jpg"),
            _pair("b", image=None, chosen=LONG),
            _pair("c", image="c.jpg", rejected="No."),
        ],
        tok,
    ).to_list()
    collate = PairCollator(store, QWenVLImageProcessor(56), tok.pad_token_id)
    batch = collate(rows)
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    assert batch["image_counts"].tolist() == [1, 0, 1] and batch["video_counts"].tolist() == [0, 0, 0]
    for name in ("prompt", "chosen", "rejected"):
        ids, mask = batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"]
        lengths = [len(row[f"{name}_input_ids"]) for row in rows]
        assert ids.shape == mask.shape == (3, max(lengths)) and ids.dtype == torch.long
        assert mask.sum(1).tolist() == lengths
        for i, row in enumerate(rows):
            assert ids[i, : lengths[i]].tolist() == row[f"{name}_input_ids"]
            assert (ids[i, lengths[i] :] == tok.pad_token_id).all()
    assert batch["pixel_values"][0, 0].mean() > batch["pixel_values"][1, 0].mean()  # red vs blue, in order


def test_collator_drops_pair_with_missing_image(tok, store):
    rows = tokenize_pairs(
        [
            _pair("a", image="merged_images/a.jpg"),
            _pair("gone", image="merged_images/gone.jpg"),
            _pair("c", image="merged_images/c.jpg"),
        ],
        tok,
    ).to_list()
    collate = PairCollator(store, QWenVLImageProcessor(56), tok.pad_token_id)
    with pytest.warns(DroppedPairWarning, match="gone"):
        batch = collate(rows)
    # the batch keeps its size and rows: the broken pair keeps its place with a blank picture and weight 0
    assert batch["prompt_input_ids"].shape[0] == 3 and batch["image_counts"].tolist() == [1, 1, 1]
    assert batch["pair_weight"].tolist() == [1.0, 0.0, 1.0]
    assert batch["pixel_values"].shape[0] == 3 and batch["pixel_values"][1].flatten(1).std(1).max() == 0  # blank
    assert torch.equal(
        batch["chosen_input_ids"][1, : len(rows[1]["chosen_input_ids"])], torch.tensor(rows[1]["chosen_input_ids"])
    )
    with pytest.warns(DroppedPairWarning):
        alone = collate([rows[1]])  # a batch of only broken pairs: still a batch, nothing in it counts
    assert alone["pair_weight"].tolist() == [0.0] and alone["prompt_input_ids"].shape[0] == 1


def test_synthetic_end_to_end_with_workers(tok, tmp_path):
    write_synthetic_vlfeedback(tmp_path, n=24, seed=0, bad_rows=4)
    store = ZipImageStore(tmp_path / "merged_images.zip")
    # no image_store here: the pairs of the row without an image reach the collator, which drops them
    pairs, report = build_vlfeedback_pairs(load_vlfeedback_jsonl(tmp_path / "vlfeedback_80k.jsonl"), min_margin=1)
    dataset = tokenize_pairs(pairs, tok, max_length=1000, truncation="answer", report=report)
    missing = sum(1 for pair in pairs if not store.exists(pair.images[0]))
    assert missing == 4 and len(dataset) == report.pairs_kept == len(pairs)
    collate = PairCollator(store, QWenVLImageProcessor(56), tok.pad_token_id)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)  # images are read from the zip inside the forked workers
    assert sum(batch["prompt_input_ids"].shape[0] for batch in batches) == len(dataset)  # sizes kept
    assert sum(int((batch["pair_weight"] == 0).sum()) for batch in batches) == missing  # broken pairs weighted 0
    assert all(batch["pixel_values"].shape[1:] == (3, 56, 56) for batch in batches)
