"""`silkie chat` over several turns with the transformers-native families (Qwen2-VL here): the earlier turns, their
pictures and videos go into the prompt as training renders a pair's earlier turns, and the saved conversation
reads back as the same prompt."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from silkie.dev.clips import colour_clip
from silkie.tools.chat import GenerationOptions, chat_once, converse, read_history, write_history
from silkie.tools.chat_inputs import family_inputs
from silkie.tools.cli import ToolError

from .hf_fixtures import BUILDERS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-turns")
    Image.new("RGB", (60, 80), "red").save(root / "red.png")
    (root / "clip.mkv").write_bytes(colour_clip([(0, 200, 0)] * 4 + [(200, 0, 200)] * 4, size=(56, 56), fps=4))
    return BUILDERS["qwen2_vl"](root / "tiny-qwen2-vl"), root / "red.png", root / "clip.mkv"


def greedy(model_dir, ids: torch.Tensor, tensors: dict, tokenizer, tokens: int) -> str:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **tensors, max_new_tokens=tokens,
                             do_sample=False, eos_token_id=[tokenizer.eos_token_id])  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_conversation_keeps_its_first_turn_s_picture_and_video_and_saves_them(setup, tmp_path):
    from silkie.models.loading import load_tokenizer
    from silkie.tools.common import load_model

    from .hf_fixtures import model_section

    model_dir, picture, clip = setup
    saved = tmp_path / "talk.json"
    options = GenerationOptions(max_new_tokens=5)
    turns = converse(model_dir, iter(["What is it?", "And now?"]), image=[picture], videos=[clip], options=options,
                     device="cpu", on_turn=lambda t: write_history(saved, t), write=lambda text: None)  # fmt: skip
    records = json.loads(saved.read_text())
    assert [(r["user"], r.get("images"), r.get("videos")) for r in records] == [
        ("<image><video>What is it?", [str(picture)], [str(clip)]), ("And now?", None, None)]  # fmt: skip
    config = load_model(model_dir, None).config
    first = family_inputs(model_dir, None, config, [picture], [clip], "What is it?")
    assert turns[0][1] == greedy(model_dir, first[1], first[2], first[0], 5)
    tokenizer, ids, tensors = family_inputs(model_dir, None, config, None, None, "And now?", history=turns[:1])
    assert turns[1][1] == greedy(model_dir, ids, tensors, tokenizer, 5)  # answered after the first turn
    # the prompt is training's for a pair whose earlier turn is the first one, its media tokens expanded
    codec = load_tokenizer(model_section(model_dir, "qwen2_vl"))
    trained = codec.prompt_ids("And now?", [str(picture)], [str(clip)], history=[(records[0]["user"], turns[0][1])])
    expanded = [t for t in ids[0].tolist() if t not in (config.image_token_id, config.video_token_id)]
    assert expanded == [t for t in trained if t not in (config.image_token_id, config.video_token_id)]
    assert ids[0].tolist().count(config.image_token_id) == first[1][0].tolist().count(config.image_token_id) > 0
    assert ids[0].tolist().count(config.video_token_id) == first[1][0].tolist().count(config.video_token_id) > 0
    # read back, the saved conversation gives the same prompt (what --history FILE --question does)
    assert read_history(saved) == [tuple(turns[0]), tuple(turns[1])]
    again = chat_once(model_dir, None, "And now?", history=read_history(saved)[:1], options=options, device="cpu",
                      write=lambda text: None)  # fmt: skip
    assert again["answer"] == turns[1][1]


def test_what_a_history_cannot_be_is_said_naming_the_entry(setup, tmp_path):
    from silkie.tools.chat_inputs import check_history

    model_dir, picture, _ = setup
    path = tmp_path / "history.json"
    path.write_text(json.dumps([{"user": "Q", "assistant": "A", "images": "red.png"}]))
    with pytest.raises(ToolError, match="entry 0's images / videos must be lists of file paths"):
        read_history(path)
    path.write_text(json.dumps([{"user": "Q", "assistant": "A", "image": ["red.png"]}]))
    with pytest.raises(ToolError, match="entry 0 has image .expected user, assistant, images, videos"):
        read_history(path)
    # each turn places its own pictures: one marker for two is not made up by a later turn's extra marker
    turns = [("<image> compare these", "ok", (str(picture), str(picture)), ())]
    with pytest.raises(ToolError, match="history turn 0: the prompt has 1 <image> marker.s. for 2 image"):
        chat_once(model_dir, [picture], "and this <image><image>?", history=turns, device="cpu")
    with pytest.raises(ToolError, match="history turn 0's file not found: .*gone.png"):
        check_history([("<image>Q", "A", (str(tmp_path / "gone.png"),), ())], model_dir)
    with pytest.raises(ToolError, match="history turn 0 has no answer"):
        chat_once(model_dir, [picture], "Q", history=[("Hi", None)], device="cpu")
    from silkie.tools.chat_inputs import qwen_vl_turns

    with pytest.raises(ToolError, match="Qwen-VL-Chat's turns name their pictures in it"):
        qwen_vl_turns([("<image>Q", "A", (str(picture),), ())])


def test_a_text_only_question_is_asked_as_training_renders_a_text_only_pair(setup, capsys):
    """`--image` was required, though training takes text-only pairs."""
    from silkie.models.loading import load_tokenizer
    from silkie.tools.chat_cli import main
    from silkie.tools.common import load_model

    from .hf_fixtures import model_section

    model_dir, _, _ = setup
    assert main(["--model", str(model_dir), "--question", "Say hi.", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    config = load_model(model_dir, None).config
    tokenizer, ids, tensors = family_inputs(model_dir, None, config, None, None, "Say hi.")
    assert not tensors.get("pixel_values") and ids[0].tolist() == load_tokenizer(
        model_section(model_dir, "qwen2_vl")).prompt_ids("Say hi.", [], [])  # fmt: skip
    assert greedy(model_dir, ids, tensors, tokenizer, 4) in printed
