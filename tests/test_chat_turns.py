"""chat.py over several turns: --history, --interactive and --save-history on Qwen-VL-Chat's make_context."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from tests.script_fixtures import load_script

FIRST = "What is in the picture?"


def _greedy(model, tokenizer, ids: list[int], pixels, max_new_tokens: int) -> str:
    stop = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tokenizer.eod_id,
        )
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(trained):
    """The run's model and tokenizer, and the picture as the model sees it."""
    from silkie.models.qwen_vl import QWenTokenizer, QWenVLImageProcessor
    from silkie.tools.cli import read_image
    from silkie.tools.common import load_model

    tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    pixels = QWenVLImageProcessor(56)([read_image(trained.image)])
    return load_model(trained.model_dir, trained.adapter_dir), tokenizer, pixels


def test_history_turns_go_before_the_question_with_their_pictures(trained, reference, tmp_path, capsys):
    model, tokenizer, pixels = reference
    history = [(f"Picture 1: <img>{trained.image}</img>\n{FIRST}", "A red shape."), ("Is it round?", None)]
    path = tmp_path / "history.json"
    path.write_text(json.dumps([{"user": history[0][0], "assistant": history[0][1]}, list(history[1])]))
    argv = ["--model", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--history", str(path)]
    argv += ["--question", "And its colour?", "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32"]
    assert load_script("chat").main(argv) == 0  # no --image: the history's turn names the picture
    ids = tokenizer.build_chat_context("And its colour?", history)
    assert tokenizer.image_paths(ids) == [str(trained.image)]
    assert capsys.readouterr().out == _greedy(model, tokenizer, ids, pixels, 6) + "\n"


def test_interactive_turns_carry_the_conversation_and_save_it(trained, reference, tmp_path, monkeypatch, capsys):
    model, tokenizer, pixels = reference
    typed = iter(["Tell me more.", ""])  # then an empty line ends the conversation
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    saved = tmp_path / "talk.json"
    argv = ["--model", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--image", str(trained.image)]
    argv += ["--question", FIRST, "--interactive", "--save-history", str(saved), "--max-new-tokens", "5"]
    assert load_script("chat").main(argv + ["--device", "cpu", "--dtype", "fp32"]) == 0
    turns = json.loads(saved.read_text())
    assert [turn["user"] for turn in turns] == [f"Picture 1: <img>{trained.image}</img>\n{FIRST}", "Tell me more."]
    first = _greedy(model, tokenizer, tokenizer.build_chat_context(turns[0]["user"]), pixels, 5)
    second_ids = tokenizer.build_chat_context("Tell me more.", [(turns[0]["user"], first)])
    second = _greedy(model, tokenizer, second_ids, pixels, 5)  # the first turn's picture is still in the prompt
    assert [turn["assistant"] for turn in turns] == [first, second]
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def test_an_interrupted_conversation_keeps_its_answered_turns(trained, tmp_path, monkeypatch):
    def typed(prompt: str = "") -> str:
        raise KeyboardInterrupt  # Ctrl-C at the second question

    monkeypatch.setattr(builtins, "input", typed)
    saved = tmp_path / "talk.json"
    argv = ["--model", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--image", str(trained.image)]
    argv += ["--question", FIRST, "--interactive", "--save-history", str(saved), "--max-new-tokens", "3"]
    assert load_script("chat").main(argv + ["--device", "cpu"]) == 130
    (turn,) = json.loads(saved.read_text())
    assert turn["user"] == f"Picture 1: <img>{trained.image}</img>\n{FIRST}" and isinstance(turn["assistant"], str)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "entry 0 must be"),
        ('{"user": "q"}', "expected a list of turns, got dict"),
        ("[[", "is not valid JSON"),
    ],
)
def test_a_bad_history_file_is_one_line(trained, tmp_path, capsys, content, message):
    path = tmp_path / "history.json"
    path.write_text(content)
    argv = ["--model", str(trained.model_dir), "--history", str(path), "--question", "q", "--device", "cpu"]
    assert load_script("chat").main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: history file {path}") and message in line
