"""A pair's system message (a `system` column, or the system turn of a conversation) reaches the prompt ids of every
family, and LLaMA-Factory's ShareGPT and ms-swift's RLHF rows read as the same pairs as TRL's conversational ones."""

from __future__ import annotations

import pytest

from silkie.data.formatting import cache_key, encode_pair, tokenize_pairs
from silkie.data.pairs import PreferencePair, pairs_from_preference_rows
from silkie.data.sources import RowError, normalize_preference_row
from silkie.models.qwen_vl.tokenization import QWenTokenizer

from .data_fixtures import write_tiny_vocab
from .hf_fixtures import BUILDERS, model_section

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]}
ANSWERS = {"chosen": [{"role": "assistant", "content": "Red."}],
           "rejected": [{"role": "assistant", "content": "Blue."}]}  # fmt: skip
EXPECTED = ("<image>Which colour?", "Red.", "Blue.", ("a.jpg",), "Answer in one word.")


def fields(row) -> tuple:
    return row.prompt, row.chosen, row.rejected, row.images, row.system


@pytest.mark.parametrize(
    "raw",
    [{"prompt": [SYSTEM, USER], **ANSWERS, "images": ["a.jpg"]},  # TRL, explicit prompt
     {"chosen": [SYSTEM, USER, *ANSWERS["chosen"]], "rejected": [SYSTEM, USER, *ANSWERS["rejected"]],
      "images": ["a.jpg"]},  # TRL, implicit prompt
     {"prompt": "<image>Which colour?", "chosen": "Red.", "rejected": "Blue.", "image": "a.jpg",
      "system": "Answer in one word."},  # a plain row with a system column
     {"conversations": [{"from": "human", "value": "<image>Which colour?"}], "chosen": {"from": "gpt", "value": "Red."},
      "rejected": {"from": "gpt", "value": "Blue."}, "system": "Answer in one word.", "images": ["a.jpg"]},  # LLaMA-F.
     {"conversations": [{"from": "system", "value": "Answer in one word."},
                        {"from": "human", "value": "<image>Which colour?"}],
      "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Blue."}, "system": "",
      "images": ["a.jpg"]},  # LLaMA-Factory, a system turn (its empty system column: none)
     {"messages": [{"role": "system", "content": "Answer in one word."},
                   {"role": "user", "content": "<image>Which colour?"}, {"role": "assistant", "content": "Red."}],
      "rejected_response": "Blue.", "images": ["a.jpg"]}],  # ms-swift
    ids=["trl", "trl-implicit", "plain", "sharegpt", "sharegpt-system-turn", "ms-swift"],
)  # fmt: skip
def test_every_layout_gives_the_same_pair_with_its_system_message(raw):
    assert fields(normalize_preference_row(raw)) == EXPECTED


def test_tags_and_system_columns_as_llama_factory_and_ms_swift_write_them():
    sharegpt = {"conversations": [{"from": "user", "value": "<image>Which colour?"}],
                "chosen": {"from": "assistant", "value": "Red."}, "rejected": {"from": "assistant", "value": "Blue."},
                "system": "Answer in one word.", "images": ["a.jpg"]}  # fmt: skip
    assert fields(normalize_preference_row(sharegpt)) == EXPECTED  # user / assistant tags under `from`
    same = {"prompt": [SYSTEM, USER], **ANSWERS, "images": ["a.jpg"], "system": " Answer in one word. "}
    assert fields(normalize_preference_row(same)) == EXPECTED  # a system column that repeats the turn
    swift = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "a"}],
             "rejected_response": "b", "images": ["x.jpg"], "rejected_images": ["x.jpg"], "system": "  "}
    assert normalize_preference_row(swift).system is None  # the same pictures; a blank system is unset


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [({"prompt": [SYSTEM, USER], **ANSWERS, "system": "Be brief."}, "wrong_type",
      "a system column and a system message in the prompt that differ"),
     ({"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "a"}],
       "rejected_response": "b", "images": ["x.jpg"], "rejected_images": ["y.jpg"]}, "unsupported_conversation",
      "rejected_images: a rejected answer with pictures of its own"),
     ({"prompt": "Q", "chosen": "a", "rejected": "b", "tools": '[{"name": "search"}]'}, "unsupported_conversation",
      "tools: tool definitions"),
     ({"prompt": [SYSTEM, *ANSWERS["chosen"], USER], **ANSWERS}, "unsupported_conversation",
      "prompt has the roles ['assistant', 'user']"),
     ({"conversations": [{"from": "observation", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
       "rejected": {"from": "gpt", "value": "b"}}, "unsupported_conversation",
      "conversations[0] is from 'observation'"),
     ({"messages": [{"role": "user", "content": "Q"}], "rejected_response": "b"}, "unsupported_conversation",
      "messages end without the assistant's (chosen) answer"),
     ({"prompt": "Q", "chosen": "a", "rejected": "b", "system": 3}, "wrong_type", "system is int")],
)  # fmt: skip
def test_what_a_chat_row_cannot_hold_is_refused_by_row(raw, reason, detail):
    with pytest.raises(RowError) as caught:
        normalize_preference_row(raw)
    assert caught.value.reason == reason and caught.value.detail.startswith(detail), caught.value.detail


def test_qwen_vl_puts_the_system_message_where_the_default_was(tmp_path):
    tokenizer = QWenTokenizer.from_pretrained(write_tiny_vocab(tmp_path))
    plain, _ = encode_pair("Describe the image.", "merged_images/p1.jpg", "yes", "no", tokenizer)
    told, _ = encode_pair("Describe the image.", "merged_images/p1.jpg", "yes", "no", tokenizer, system="Be a picture.")
    query = tokenizer.build_chat_context  # the original make_context with that system text
    assert plain["prompt_input_ids"] == query("Picture 1: <img>merged_images/p1.jpg</img>\nDescribe the image.")
    assert told["prompt_input_ids"] == query("Picture 1: <img>merged_images/p1.jpg</img>\nDescribe the image.",
                                             system="Be a picture.")  # fmt: skip
    assert told["prompt_input_ids"] != plain["prompt_input_ids"]
    assert told["chosen_input_ids"] == plain["chosen_input_ids"]
    assert "<|im_start|>system\nBe a picture.<|im_end|>" in tokenizer.decode(told["prompt_input_ids"])
    assert encode_pair("Q", None, "a", "b", tokenizer, system="Look at <img>x") == (None, "image_tag_in_text")


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_hf_families_render_the_system_message_or_drop_the_pair(family, tmp_path):
    from silkie.models.loading import load_tokenizer

    codec = load_tokenizer(model_section(BUILDERS[family](tmp_path), family))
    pairs = [PreferencePair("p0", "<image>Which colour?", ("a.png",), "Red.", "Blue.", 1.0, 0.0),
             PreferencePair("p1", "<image>Which colour?", ("a.png",), "Red.", "Blue.", 1.0, 0.0,
                            system="Answer in one word.")]  # fmt: skip
    plain, told = (encode_pair(p.prompt, p.images, p.chosen, p.rejected, codec, system=p.system) for p in pairs)
    text = codec.tokenizer.decode(told[0]["prompt_input_ids"])
    if family == "llava":  # llava-hf's template writes a system message as plain text before USER:
        assert text.startswith("Answer in one word. USER:") and not codec.tokenizer.decode(
            plain[0]["prompt_input_ids"]).startswith("Answer")  # fmt: skip
    elif family == "gemma3":  # Gemma's template opens the first user turn with the system message
        assert text.startswith("<bos><start_of_turn>user\nAnswer in one word.\n\n\n\n<start_of_image>")
        assert codec.tokenizer.decode(plain[0]["prompt_input_ids"]).startswith("<bos><start_of_turn>user\n\n\n<st")
    elif family == "gemma4":  # a system turn of its own, only when a system message is given
        assert text.startswith("<bos><|turn>system\nAnswer in one word.<turn|>\n<|turn>user\n<|image>")
        assert codec.tokenizer.decode(plain[0]["prompt_input_ids"]).startswith("<bos><|turn>user\n<|image>")
    else:  # chatml: the system turn in place of the template's default one (none in Qwen3-VL's, Qwen3.5's, InternVL's)
        assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in text and "helpful assistant" not in text
        default = codec.tokenizer.decode(plain[0]["prompt_input_ids"])
        no_default = family.startswith(("qwen3_vl", "qwen3_5")) or family == "internvl"
        assert ("helpful assistant" in default) == (not no_default)
        assert default.startswith("<|im_start|>user\n") == no_default
    dataset = tokenize_pairs(pairs, codec, max_length=4096)
    assert [list(ids) for ids in dataset["prompt_input_ids"]] == [plain[0]["prompt_input_ids"],
                                                                 told[0]["prompt_input_ids"]]  # fmt: skip
    template = codec.processor.chat_template
    user_and_assistant = (  # a template that renders user and assistant turns only
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'][-1]['text'] }} "
        "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'][-1]['text'] }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    try:
        for codec.processor.chat_template in (user_and_assistant, refusing + user_and_assistant):
            # the system text also in the question: the template still drops it
            told = encode_pair("<image>Which colour? Answer in one word.", pairs[1].images, "Red.", "Blue.", codec,
                               system=pairs[1].system)  # fmt: skip
            assert told == (None, "system_unsupported")
    finally:
        codec.processor.chat_template = template  # the processor is cached per folder: leave it as found


def test_a_system_message_keys_the_cache_and_pairs_without_one_keep_their_key(tmp_path):
    tokenizer = QWenTokenizer.from_pretrained(write_tiny_vocab(tmp_path))
    record = {"prompt_id": "p", "prompt": "Q", "images": [], "videos": [], "chosen": "a", "rejected": "b",
              "chosen_score": 1.0, "rejected_score": 0.0}  # fmt: skip
    key = cache_key([record], tokenizer, 64, "drop")
    assert key == cache_key([{**record, "system": None}], tokenizer, 64, "drop")
    assert key != cache_key([{**record, "system": "Be brief."}], tokenizer, 64, "drop")
    pairs, _ = pairs_from_preference_rows([{"prompt": "Q", "chosen": "a", "rejected": "b", "system": "Be brief."}])
    assert pairs[0].system == "Be brief." and pairs[0].to_dict()["system"] == "Be brief."


def test_a_generation_prompt_that_opens_a_think_block_ends_the_prompt_where_trl_does(tmp_path):
    """A reasoning template's generation prompt writes `<think>` that its rendered assistant turn does not (and a
    template may write another header there): TRL ends the prompt where the two renderings part (their common
    prefix), so the pair's tokens are the rendered conversation. It used to be a traceback."""
    from trl.data_utils import apply_chat_template

    from silkie.models.loading import load_tokenizer

    codec = load_tokenizer(model_section(BUILDERS["qwen3_vl"](tmp_path), "qwen3_vl"))
    template = codec.processor.chat_template
    generation = "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    assert generation in template
    example = {"prompt": [USER], "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
               "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}  # fmt: skip
    decode = codec.tokenizer.decode
    try:
        for opened, prompt_end in (("<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n"),
                                   ("BOT:", "<|im_end|>\n")):  # fmt: skip
            codec.processor.chat_template = template.replace(generation, generation.replace(
                "<|im_start|>assistant\n", opened))  # fmt: skip
            ids, reason = encode_pair("<image>Which colour?", ["a.jpg"], "Red.", "Blue.", codec)
            trl = apply_chat_template(example, codec.processor)
            assert reason is None and trl["prompt"].endswith(prompt_end) and not trl["prompt"].endswith(opened)
            assert decode(ids["prompt_input_ids"]) == trl["prompt"]
            answers = [decode(ids[f"{kind}_input_ids"]) for kind in ("chosen", "rejected")]
            assert answers == [trl["chosen"], trl["rejected"]]
            # a prompt to generate from (chat, annotate) keeps the whole generation prompt
            whole = decode(codec.prompt_ids("<image>Which colour?", ["a.jpg"], generation=True))
            assert whole.startswith(trl["prompt"]) and whole.endswith(opened)
    finally:
        codec.processor.chat_template = template  # the processor is cached per folder: leave it as found


def test_answers_that_open_as_the_generation_prompt_does_are_split_as_trl_splits_them(tmp_path):
    """TRL's `DPOTrainer` tokenizes the whole generation prompt and prompt+answer, and the prompt ends where they
    part for either answer: when both answers open with the `<think>` the generation prompt writes, that text is
    the prompt's; when one does not, the split is the template's. The ids equal TRL's rule, pair by pair."""
    from trl.data_utils import common_prefix_length

    from silkie.models.loading import load_tokenizer

    codec = load_tokenizer(model_section(BUILDERS["qwen3_vl"](tmp_path), "qwen3_vl"))
    template = codec.processor.chat_template
    generation = "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    codec.processor.chat_template = template.replace(generation, generation.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"))  # fmt: skip

    def ids(messages: list, generation_prompt: bool) -> list[int]:
        text = codec.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return codec.tokenizer(text, add_special_tokens=False)["input_ids"]

    def turn(text: str) -> dict:
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    try:
        cases = [("<think>\nred</think>Red.", "<think>\nblue</think>Blue.", True),
                 ("<think>\nred</think>Red.", "Blue.", False), ("Red.", "Blue.", False)]  # fmt: skip
        for chosen, rejected, opens in cases:
            pair, reason = encode_pair("<image>Which colour?", ["a.jpg"], chosen, rejected, codec)
            whole, with_chosen, with_rejected = ids([USER], True), ids([USER, turn(chosen)], False), ids(
                [USER, turn(rejected)], False)  # fmt: skip
            split = min(common_prefix_length(whole, with_chosen), common_prefix_length(whole, with_rejected))
            assert reason is None and pair["prompt_input_ids"] == whole[:split]
            assert pair["chosen_input_ids"] == with_chosen[split:]
            assert pair["rejected_input_ids"] == with_rejected[split:]
            assert (split == len(whole)) == opens  # the whole generation prompt is the prompt when both open with it
    finally:
        codec.processor.chat_template = template  # the processor is cached per folder: leave it as found
