"""`QWenLMHeadModel.chat` as the original remote code's (`model.chat(tokenizer, query, history)`): the same greedy
answer as `silkie chat`, the history carried into the next turn, and the tokenizer's output read as attributes."""

from __future__ import annotations

import pytest

from silkie.models.qwen_vl import QWenLMHeadModel, QWenTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_model_chat_answers_as_silkie_chat_and_keeps_the_history(trained, tmp_path):
    from silkie.tools.chat import GenerationOptions, chat_once

    tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    model = QWenLMHeadModel.from_pretrained(trained.model_dir).eval()
    query = tokenizer.from_list_format([{"image": str(trained.image)}, {"text": "What is in the picture?"}])
    reply, history = model.chat(tokenizer, query, history=None, do_sample=False, max_new_tokens=6)
    expected = chat_once(trained.model_dir, trained.image, "What is in the picture?", device="cpu", dtype="fp32",
                         options=GenerationOptions(max_new_tokens=6), write=lambda text: None)  # fmt: skip
    assert reply == expected["answer"] and history == [(query, reply)]
    again, longer = model.chat(tokenizer, "And the colour?", history=history, do_sample=False, max_new_tokens=6)
    follow = chat_once(trained.model_dir, None, "And the colour?", device="cpu", dtype="fp32", history=history,
                       options=GenerationOptions(max_new_tokens=6), write=lambda text: None)  # fmt: skip
    assert again == follow["answer"] and longer == [(query, reply), ("And the colour?", again)]
    assert history == [(query, reply)]  # the caller's list is left as it was
    encoded = tokenizer("Hello there")
    assert encoded.input_ids == encoded["input_ids"] == tokenizer.encode("Hello there")
    with pytest.raises(ValueError, match="local paths only"):
        model.chat(tokenizer, tokenizer.from_list_format([{"image": "https://x.org/a.jpg"}, {"text": "Q"}]))
