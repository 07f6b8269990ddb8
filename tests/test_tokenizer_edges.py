"""Qwen-VL tokenizer edge cases against the original's published rules (../shared/reference/qwen_vl_facts.md):
special ids len(ranks)+k (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, <img> 151857, </img>
151858, <imgpad> 151859; 151860 ids), image spans of 258 ids, make_context's history and max_window_size."""

from __future__ import annotations

import pytest

from silkie.models.qwen_vl.tokenization import MAX_WINDOW_SIZE, VOCAB_FILE, QWenTokenizer

from .test_tokenizer import CORPUS, pad_ranks, train_bpe_ranks, write_tiktoken_ranks

EOT, IM_START, IM_END, IMG, IMG_END, PAD = 151643, 151644, 151645, 151857, 151858, 151859


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> QWenTokenizer:
    """The real vocabulary's layout: 151643 ranks, so the specials have their published ids."""
    path = tmp_path_factory.mktemp("real-layout") / VOCAB_FILE
    write_tiktoken_ranks(pad_ranks(train_bpe_ranks(CORPUS * 20, 400), 151643), path)
    return QWenTokenizer(path)


def _span(path: str) -> list[int]:
    data = list(path.encode())
    return [IMG, *data] + [PAD] * (256 - len(data)) + [IMG_END]


def test_the_published_ids(tok: QWenTokenizer) -> None:
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (EOT, IM_START, IM_END)
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id, tok.vocab_size) == (IMG, IMG_END, PAD, 151860)
    assert tok.encode("<img>images/cat.png</img>") == _span("images/cat.png")


def test_skip_special_tokens_keeps_the_image_path_as_the_original(tok: QWenTokenizer) -> None:
    """The original replaces a span by <img> + the path's BPE ids + </img>, then drops ids >= 151643."""
    ids = tok.encode("Picture 1: ") + _span("images/cat.png") + tok.encode("\nWhat is it?") + [IM_END, EOT]
    assert tok.decode(ids, skip_special_tokens=True) == "Picture 1: images/cat.png\nWhat is it?"
    assert tok.decode(ids) == "Picture 1: <img>images/cat.png</img>\nWhat is it?<|im_end|><|endoftext|>"
    two = _span("a.jpg") + tok.encode("\n") + _span("图/b.png")
    assert tok.decode(two, skip_special_tokens=True) == "a.jpg\n图/b.png"
    assert tok.image_paths(two) == ["a.jpg", "图/b.png"]


def test_malformed_ids_decode_without_raising(tok: QWenTokenizer) -> None:
    """Where the original raises (decided here: decode what can be decoded, as streaming needs)."""
    text = tok.encode("ok")
    # a lone <img> (a generation cut before </img>): the tag, then the ordinary tokens
    assert tok.decode([IMG, *text]) == "<img>ok" and tok.decode([IMG, *text], skip_special_tokens=True) == "ok"
    # a path span without <imgpad>: not read as a path; its ids are decoded as ordinary tokens
    assert tok.decode([IMG, *text, IMG_END]) == "<img>ok</img>" and tok.image_paths([IMG, *text, IMG_END]) == []
    # a non-byte id before the padding: not a path either
    assert tok.decode([IMG, 300, PAD, IMG_END], skip_special_tokens=True) == tok.decode([300])
    # ids outside the vocabulary (the model's unused rows 151860..151935, -100) are left out
    assert tok.decode([*text, 151860, 151935, -100]) == "ok"
    # a path that is not UTF-8 uses the tokenizer's errors mode
    assert tok.decode([IMG, 0xFF, PAD, IMG_END]) == "<img>\ufffd</img>"


def _turn(tok: QWenTokenizer, role: str, content: str) -> list[int]:
    """facts: im_start, enc(role), enc("\\n"), enc(content), im_end (only the 9 tag tokens allowed)."""
    tags = {"<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"}
    role_ids, content_ids = tok.encode(role, allowed_special=tags), tok.encode(content, allowed_special=tags)
    return [IM_START, *role_ids, *tok.encode("\n"), *content_ids, IM_END]


def _expected(tok: QWenTokenizer, system: str, turns: list[tuple[str, str | None]], query: str) -> list[int]:
    nl = tok.encode("\n")
    ids = _turn(tok, "system", system)
    for q, r in turns:
        ids += nl + _turn(tok, "user", q) + nl + (_turn(tok, "assistant", r) if r is not None else [])
    return ids + nl + _turn(tok, "user", query) + nl + [IM_START, *tok.encode("assistant"), *nl]


def test_a_history_turn_without_a_response_gives_the_user_turn_alone(tok: QWenTokenizer) -> None:
    history = [("What is it?", "A cat."), ("And its colour?", None)]
    got = tok.build_chat_context("Thanks.", history=history)
    assert got == _expected(tok, "You are a helpful assistant.", history, "Thanks.")
    assert tok.decode(got).count("<|im_start|>assistant") == 2  # the answered turn and the open one


def test_history_beyond_max_window_size_drops_the_oldest_turns(tok: QWenTokenizer) -> None:
    assert MAX_WINDOW_SIZE == 6144  # generation_config.json
    history = [(f"question {i} " + "word " * 30, f"answer {i} " + "word " * 30) for i in range(4)]
    system = _turn(tok, "system", "sys")
    pieces = [len(_expected(tok, "sys", [turn], "q")) - len(_expected(tok, "sys", [], "q")) for turn in history]
    # room for exactly the two newest turns: the original keeps a turn while system + kept + it < window
    window = len(system) + pieces[3] + pieces[2] + 1
    kept = tok.build_chat_context("q", history, "sys", max_window_size=window)
    assert kept == _expected(tok, "sys", history[2:], "q")
    fewer = tok.build_chat_context("q", history, "sys", max_window_size=window - 1)
    assert fewer == _expected(tok, "sys", history[3:], "q")
    assert tok.build_chat_context("q", history, "sys") == _expected(tok, "sys", history, "q")  # all fit in 6144
    # a newer turn that does not fit stops the walk: older ones are not taken even if they would fit
    long_first = [("short", "short"), ("long " * 400, "long")]
    assert tok.build_chat_context("q", long_first, "sys", max_window_size=200) == _expected(tok, "sys", [], "q")
