"""Tests for the native Qwen-VL tokenizer (tiny offline BPE vocabulary; CPU, no network)."""

from __future__ import annotations

import json
import pickle
import random
import time

import pytest
import torch

from silkie.models.qwen_vl.tokenization import (
    DEFAULT_SYSTEM,
    IMAGE_SLOTS,
    IMAGE_TAG_TOKENS,
    MAX_IMAGE_PATH_BYTES,
    SPECIAL_TOKENS,
    VOCAB_FILE,
    QWenTokenizer,
    load_tiktoken_ranks,
    pad_ranks,
    train_bpe_ranks,
    write_tiktoken_ranks,
)

CORPUS = [
    "You are a helpful assistant. The user asks a question about the picture.\n",
    "Picture 1: a dog is running on the grass, and the sun is shining!\n\n",
    "What is in the image? Describe it in detail, please. It's a cat; they're happy.\n",
    "图片里有一只猫和一只狗。你好，世界！这是一个测试。\n",
    "Numbers 12345 and 2024-06-01, emoji 🙂🎉, café naïve résumé.\n",
    "    indented code: def f(x):\n        return x + 1\n",
]

MIXED = "Hello, world!\n你好，世界 🙂🎉\n\nline 3: café 42\t tab"


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return train_bpe_ranks(CORPUS * 20, 400)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, ranks: dict[bytes, int]):
    d = tmp_path_factory.mktemp("tok")
    write_tiktoken_ranks(ranks, d / VOCAB_FILE)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> QWenTokenizer:
    return QWenTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def padded_tok(tmp_path_factory: pytest.TempPathFactory, ranks: dict[bytes, int]) -> QWenTokenizer:
    path = tmp_path_factory.mktemp("padded") / VOCAB_FILE
    write_tiktoken_ranks(pad_ranks(ranks, 151643), path)
    return QWenTokenizer(path)


# ---------------------------------------------------------------- vocabulary / BPE


def test_trained_ranks_shape(ranks: dict[bytes, int]) -> None:
    assert len(ranks) == 400
    assert sorted(ranks.values()) == list(range(400))
    for b in range(256):
        assert ranks[bytes([b])] == b
    by_rank = {r: t for t, r in ranks.items()}
    for r in range(256, 400):  # every merge is the concatenation of two earlier tokens
        t = by_rank[r]
        assert any(t[:k] in ranks and t[k:] in ranks and max(ranks[t[:k]], ranks[t[k:]]) < r for k in range(1, len(t)))
    assert b" the" in ranks and b"\n" in ranks  # a frequent word became one token
    assert train_bpe_ranks(CORPUS * 20, 400) == ranks  # deterministic


def test_train_is_fast_on_200kb() -> None:
    rng = random.Random(0)
    syll = ["ka", "to", "ri", "mu", "sen", "pa", "lo", "qui", "ve", "dan", "zor", "el", "ith", "um"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    text = " ".join(rng.choice(words) + rng.choice(["", "", ",", ".\n"]) for _ in range(30000))
    assert 180_000 < len(text.encode()) < 260_000
    t0 = time.perf_counter()
    out = train_bpe_ranks([text], 1000)
    assert len(out) == 1000
    assert time.perf_counter() - t0 < 5.0


def test_write_reload_roundtrip(ranks: dict[bytes, int], tok_dir) -> None:
    assert load_tiktoken_ranks(tok_dir / VOCAB_FILE) == ranks
    first = (tok_dir / VOCAB_FILE).read_text().splitlines()[0]
    assert first == "AA== 0"  # base64(b"\x00") rank 0


def test_special_ids_numbered_from_len_ranks(tok: QWenTokenizer, ranks: dict[bytes, int]) -> None:
    n = len(ranks)
    assert len(SPECIAL_TOKENS) == 217 and SPECIAL_TOKENS[-9:] == IMAGE_TAG_TOKENS
    assert IMAGE_TAG_TOKENS == (
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<quad>",
        "</quad>",
        "<img>",
        "</img>",
        "<imgpad>",
    )
    ids = tok.special_tokens
    assert ids["<|endoftext|>"] == n and tok.eod_id == n
    assert ids["<|im_start|>"] == n + 1 == tok.im_start_id
    assert ids["<|im_end|>"] == n + 2 == tok.im_end_id
    assert ids["<|extra_0|>"] == n + 3 and ids["<|extra_204|>"] == n + 207
    assert ids["<ref>"] == n + 208 and ids["</quad>"] == n + 213
    assert ids["<img>"] == n + 214 == tok.img_start_id
    assert ids["</img>"] == n + 215 == tok.img_end_id
    assert ids["<imgpad>"] == n + 216 == tok.img_pad_id
    assert tok.vocab_size == len(tok) == n + 217
    assert tok.pad_token_id == tok.eos_token_id == n and tok.bos_token_id is None
    assert tok.convert_tokens_to_ids("<img>") == n + 214
    with pytest.raises(KeyError, match="hello"):
        tok.convert_tokens_to_ids("hello")


def test_padded_vocab_has_official_ids(padded_tok: QWenTokenizer, tok: QWenTokenizer) -> None:
    ids = padded_tok.special_tokens
    assert ids["<|endoftext|>"] == 151643 == padded_tok.eod_id
    assert ids["<|im_start|>"] == 151644 and ids["<|im_end|>"] == 151645
    assert ids["<|extra_0|>"] == 151646 and ids["<|extra_204|>"] == 151850
    assert ids["<ref>"] == 151851 and ids["<img>"] == 151857 and ids["</img>"] == 151858
    assert ids["<imgpad>"] == 151859 and padded_tok.vocab_size == 151860
    assert padded_tok.encode(MIXED) == tok.encode(MIXED)  # fillers never win a merge
    assert padded_tok.decode(tok.encode(MIXED)) == MIXED
    assert padded_tok.decode([1, 151859, 151860, 151935]) == "\x01<imgpad>"  # unused model rows are skipped
    with pytest.raises(ValueError):
        pad_ranks({b"a": 0, b"b": 1}, 1)


# ---------------------------------------------------------------- encoding


def test_nfc_normalization(tok: QWenTokenizer) -> None:
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.tokenizer.encode("e\u0301") != tok.encode("\u00e9")  # raw tiktoken (no NFC) differs
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"
    assert tok.encode("caf" + "e\u0301") == tok.encode("caf\u00e9")


def test_special_strings_allowed_or_plain(tok: QWenTokenizer) -> None:
    assert tok.encode("<|im_start|>") == [tok.im_start_id]
    plain = tok.encode("<|im_start|><img>x</img>", allowed_special=set())
    assert all(i < len(tok.mergeable_ranks) for i in plain)
    assert tok.decode(plain) == "<|im_start|><img>x</img>"
    only_ref = tok.encode("<ref>a</ref><|endoftext|>", allowed_special={"<ref>", "</ref>"})
    assert only_ref[0] == tok.special_tokens["<ref>"] and tok.eod_id not in only_ref


def test_image_span_layout(tok: QWenTokenizer) -> None:
    ids = tok.encode("Picture 1: <img>a/b.jpg</img>\nWhat?")
    start, end = ids.index(tok.img_start_id), ids.index(tok.img_end_id)
    assert end - start + 1 == 258 == IMAGE_SLOTS + 2
    assert ids[:start] == tok.encode("Picture 1: ") and ids[end + 1 :] == tok.encode("\nWhat?")
    slots = ids[start + 1 : end]
    assert slots[:7] == list(b"a/b.jpg") == [97, 47, 98, 46, 106, 112, 103]
    assert slots[7:] == [tok.img_pad_id] * 249
    assert tok.encode("<img></img>") == [tok.img_start_id] + [tok.img_pad_id] * 256 + [tok.img_end_id]
    two = tok.encode(tok.from_list_format([{"image": "x.png"}, {"image": "y.png"}, {"text": "hi"}]))
    assert two.count(tok.img_start_id) == 2 and two.count(tok.img_pad_id) == 2 * 251


def test_image_path_limit(tok: QWenTokenizer) -> None:
    assert MAX_IMAGE_PATH_BYTES == 254
    ok = "p" * 254
    ids = tok.encode(f"<img>{ok}</img>")
    assert len(ids) == 258 and ids[254] == ord("p") and ids[255] == tok.img_pad_id == ids[256]
    with pytest.raises(ValueError, match="254") as err:
        tok.encode(f"<img>{'p' * 255}</img>")
    assert "p" * 255 in str(err.value)
    cjk = "图" * 84  # 252 UTF-8 bytes
    ids = tok.encode(f"<img>{cjk}.j</img>")
    assert ids[1:255] == list(f"{cjk}.j".encode()) and ids[255] == tok.img_pad_id
    with pytest.raises(ValueError, match="255 UTF-8 bytes"):
        tok.encode(f"<img>{'图' * 85}</img>")
    with pytest.raises(ValueError, match="unclosed"):
        tok.encode("Picture 1: <img>a.jpg")
    # with <img> not allowed the path is plain BPE text (no span)
    assert tok.img_pad_id not in tok.encode("<img>a.jpg</img>", allowed_special={"<ref>"})


# ---------------------------------------------------------------- decoding


def test_decode_roundtrip(tok: QWenTokenizer) -> None:
    text = f"Picture 1: <img>a/b.jpg</img>\n{MIXED}<|im_end|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids, skip_special_tokens=True) == f"Picture 1: a/b.jpg\n{MIXED}\n"  # the path stays
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 70, -100]) == text
    assert tok.decode(tok.encode("A")[0]) == "A"  # an int (TextStreamer passes one)
    assert tok.decode(tok.encode("<img>图/ä.jpg</img>")) == "<img>图/ä.jpg</img>"
    assert tok.batch_decode(torch.tensor([tok.encode("ab"), tok.encode("cd")])) == ["ab", "cd"]


def test_text_iterator_streamer(tok: QWenTokenizer) -> None:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tok, skip_special_tokens=True)
    for t in tok.encode("hello world 你好\nbye") + [tok.im_end_id]:
        streamer.put(torch.tensor([t]))
    streamer.end()
    assert "".join(streamer) == "hello world 你好\nbye"


# ---------------------------------------------------------------- chat format


def test_build_chat_context_layout(tok: QWenTokenizer) -> None:
    tags = set(IMAGE_TAG_TOKENS)

    def enc(s: str) -> list[int]:
        return tok.encode(s, allowed_special=tags)

    s, e, nl = tok.im_start_id, tok.im_end_id, enc("\n")
    query = "Picture 1: <img>a.jpg</img>\nWhat is <|im_start|>this?"
    expected = [s, *enc("system"), *nl, *enc(DEFAULT_SYSTEM), e]
    expected += [*nl, s, *enc("user"), *nl, *enc(query), e, *nl, s, *enc("assistant"), *nl]
    got = tok.build_chat_context(query)
    assert got == expected
    assert got.count(s) == 3 and got.count(e) == 2 and got.count(tok.img_pad_id) == 256 - 5
    assert tok.decode(got) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    )

    hist = [("q1", "r1")]
    got = tok.build_chat_context("q2", history=hist, system="sys")
    expected = [s, *enc("system"), *nl, *enc("sys"), e]
    expected += [*nl, s, *enc("user"), *nl, *enc("q1"), e, *nl, s, *enc("assistant"), *nl, *enc("r1"), e]
    expected += [*nl, s, *enc("user"), *nl, *enc("q2"), e, *nl, s, *enc("assistant"), *nl]
    assert got == expected


def test_encode_answer(tok: QWenTokenizer) -> None:
    nl = tok.encode("\n")
    ans = tok.encode_answer("A dog.<|endoftext|>")
    body = tok.encode("A dog.<|endoftext|>", allowed_special=set())
    assert ans == body + [tok.im_end_id] + nl + [tok.eod_id]
    assert ans.count(tok.eod_id) == 1
    assert tok.encode_answer("ok", add_eod=False) == tok.encode("ok") + [tok.im_end_id] + nl


def test_from_list_format() -> None:
    items = [{"image": "p1.jpg"}, {"image": "http://x/p2.png"}, {"text": "Describe."}]
    assert QWenTokenizer.from_list_format(items) == (
        "Picture 1: <img>p1.jpg</img>\nPicture 2: <img>http://x/p2.png</img>\nDescribe."
    )
    box = [{"ref": "dog", "box": [(1, 2, 3, 4)]}]
    assert QWenTokenizer.from_list_format(box) == "<ref>dog</ref><box>(1,2),(3,4)</box>"


# ---------------------------------------------------------------- __call__ / files


def test_call_padding_and_tensors(tok: QWenTokenizer) -> None:
    a, b = tok.encode("hi"), tok.encode("hello there")
    out = tok(["hi", "hello there"], padding=True, return_tensors="pt")
    assert out["input_ids"].tolist() == [a + [tok.eod_id] * (len(b) - len(a)), b]
    assert out["attention_mask"].tolist() == [[1] * len(a) + [0] * (len(b) - len(a)), [1] * len(b)]
    single = tok("hi", return_tensors="pt")
    assert single["input_ids"].shape == (1, len(a)) and single["input_ids"].dtype == torch.long
    assert tok("hi") == {"input_ids": a, "attention_mask": [1] * len(a)}
    with pytest.raises(ValueError):
        tok(["hi", "hello there"], return_tensors="pt")


def test_save_and_from_pretrained(tok: QWenTokenizer, tmp_path) -> None:
    paths = tok.save_pretrained(tmp_path / "saved")
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["qwen.tiktoken", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "QWenTokenizer" and cfg["model_max_length"] == 8192
    again = QWenTokenizer.from_pretrained(tmp_path / "saved")
    assert again.encode(MIXED) == tok.encode(MIXED) and again.vocab_size == tok.vocab_size
    assert QWenTokenizer.from_pretrained(tmp_path / "saved" / VOCAB_FILE).vocab_size == tok.vocab_size
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(MIXED) == tok.encode(MIXED)


def test_missing_and_malformed_files(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        QWenTokenizer.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("AA== 0\nAQ== 1\nnot-base64!! 2\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken: line 3"):
        load_tiktoken_ranks(bad)
    bad.write_text("AA== 0\nAQ==\n")
    with pytest.raises(ValueError, match="line 2"):
        load_tiktoken_ranks(bad)
    bad.write_text("AA== 0\nAQ== 0\n")
    with pytest.raises(ValueError, match="line 2"):
        load_tiktoken_ranks(bad)
    bad.write_text("AA== 0\nAQ== 5\n")
    with pytest.raises(ValueError, match="rank 1 is missing"):
        load_tiktoken_ranks(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match="bad.tiktoken"):
        load_tiktoken_ranks(bad)
