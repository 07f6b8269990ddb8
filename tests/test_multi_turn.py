"""Prompts with earlier turns: TRL's, LLaMA-Factory's (ShareGPT conversations or a `history` column) and ms-swift's
multi-turn rows read as one pair with its history; each family renders the whole conversation as its chat format
does, pictures placed by their markers across the turns; the split, the caches and the ids tell conversations
apart."""

from __future__ import annotations

import pytest

from silkie.config import DataSection, RecipeError
from silkie.data.formatting import cache_key, encode_pair, tokenize_pairs
from silkie.data.pairs import PreferencePair, pairs_from_preference_rows
from silkie.data.sources import RowError, normalize_preference_row, prompt_key
from silkie.data.split import split_by_prompt
from silkie.models.family import PairTextError, get_family
from silkie.models.media import turn_media
from silkie.models.qwen_vl.tokenization import QWenTokenizer

from .data_fixtures import write_tiny_vocab
from .hf_fixtures import BUILDERS, model_section

FIRST, ANSWER, LAST = "<image>What is this?", "A red circle.", "Which colour was it?"
EXPECTED = (LAST, (("<image>What is this?", "A red circle."),), ("a.jpg",), "Be brief.")


def user(text: str, image: bool = False) -> dict:
    return {"role": "user", "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [SYSTEM, user("What is this?", image=True), assistant(ANSWER), user(LAST)]


def fields(row) -> tuple:
    return row.prompt, row.history, row.images, row.system


@pytest.mark.parametrize(
    "raw",
    [{"prompt": TURNS, "chosen": [assistant("Red.")], "rejected": [assistant("Blue.")], "images": ["a.jpg"]},
     {"chosen": [*TURNS, assistant("Red.")], "rejected": [*TURNS, assistant("Blue.")], "images": ["a.jpg"]},
     {"conversations": [{"from": "human", "value": FIRST}, {"from": "gpt", "value": ANSWER},
                        {"from": "human", "value": LAST}],
      "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Blue."},
      "system": "Be brief.", "images": ["a.jpg"]},
     {"messages": [SYSTEM, {"role": "user", "content": FIRST}, {"role": "assistant", "content": ANSWER},
                   {"role": "user", "content": LAST}, {"role": "assistant", "content": "Red."}],
      "rejected_response": "Blue.", "images": ["a.jpg"]},
     {"prompt": LAST, "history": [[FIRST, ANSWER]], "chosen": "Red.", "rejected": "Blue.", "system": "Be brief.",
      "image": "a.jpg"}],
    ids=["trl", "trl-implicit", "sharegpt", "ms-swift", "history-column"],
)  # fmt: skip
def test_every_layout_gives_the_last_question_with_its_earlier_turns(raw):
    row = normalize_preference_row(raw)
    assert fields(row) == EXPECTED and (row.chosen, row.rejected) == ("Red.", "Blue.")


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [({"prompt": LAST, "history": [[FIRST, "<image> is red."]], "chosen": "a", "rejected": "b"},
      "unsupported_conversation", "history[0]: an earlier answer holds a picture or video"),
     ({"prompt": [user("x"), {"role": "assistant", "content": [{"type": "image"}]}, user("y")], "chosen": "a",
       "rejected": "b"}, "unsupported_conversation", "history[0]: an earlier answer holds a picture"),
     ({"prompt": LAST, "history": [FIRST, ANSWER], "chosen": "a", "rejected": "b"}, "wrong_type",
      "history[0] is str (expected [user, assistant])"),
     ({"prompt": [user("x"), assistant("y"), user("z")], "history": [["p", "q"]], "chosen": "a", "rejected": "b"},
      "unsupported_conversation", "a history column beside a prompt with earlier turns")],
)  # fmt: skip
def test_what_earlier_turns_cannot_hold_is_refused_by_row(raw, reason, detail):
    with pytest.raises(RowError) as caught:
        normalize_preference_row(raw)
    assert caught.value.reason == reason and caught.value.detail.startswith(detail), caught.value.detail


def test_media_go_to_the_turns_their_markers_are_in_and_without_markers_to_the_first():
    texts = ["<image>Look.", "And <image> and <video>?", "Last."]
    assert turn_media(texts, ["a", "b"], ["v"]) == [(("a",), ()), (("b",), ("v",)), ((), ())]
    assert turn_media(["Look.", "More?"], ["a", "b"], ["v"]) == [(("a", "b"), ("v",)), ((), ())]
    with pytest.raises(PairTextError, match="the prompt's 2 user turns have 1 <image> marker"):
        turn_media(["<image>Look.", "More?"], ["a", "b"])
    pairs, report = pairs_from_preference_rows(
        [{"id": "m", "prompt": "More?", "history": [["<image>Look.", "ok"]], "images": ["a", "b"], "chosen": "x",
          "rejected": "y"}, {"id": "k", "prompt": "Q", "chosen": "x", "rejected": "y"}])  # fmt: skip
    assert [p.prompt_id for p in pairs] == ["k"] and report.rows_dropped["image_marker_mismatch"] == 1
    assert "2 user turns have 1 <image> marker(s) for 2 image(s)" in report.first_details["image_marker_mismatch"]


def test_qwen_vl_writes_the_conversation_as_its_make_context_numbering_pictures_on(tmp_path):
    tokenizer = QWenTokenizer.from_pretrained(write_tiny_vocab(tmp_path))
    history = (("<image>What is this?", "A red circle."),)
    ids, reason = encode_pair("And <image>?", ["a.jpg", "b.jpg"], "Red.", "Blue.", tokenizer, history=history)
    assert reason is None
    first = "Picture 1: <img>a.jpg</img>\nWhat is this?"
    assert ids["prompt_input_ids"] == tokenizer.build_chat_context(
        "And Picture 2: <img>b.jpg</img>\n?", [(first, "A red circle.")])  # fmt: skip
    alone, _ = encode_pair("And <image>?", ["b.jpg"], "Red.", "Blue.", tokenizer)
    assert ids["chosen_input_ids"] == alone["chosen_input_ids"]  # answers do not depend on the turns before
    assert tokenizer.image_paths(ids["prompt_input_ids"]) == ["a.jpg", "b.jpg"]
    long_ago = (("Q " * 7000, "A"),)  # beyond the original's 6144-token window: kept (max_length bounds a pair)
    ids, _ = encode_pair("Now?", None, "a", "b", tokenizer, history=long_ago)
    assert len(ids["prompt_input_ids"]) > 7000
    assert encode_pair("Q", None, "a", "b", tokenizer, history=(("x", "<|im_end|>"),)) == (None,
                                                                                          "chat_template_in_text")
    assert encode_pair("Q", None, "a", "b", tokenizer, history=(("<img>x", "y"),)) == (None, "image_tag_in_text")


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_hf_families_render_the_conversation_with_their_chat_template(family, tmp_path):
    from silkie.models.loading import load_tokenizer

    codec = load_tokenizer(model_section(BUILDERS[family](tmp_path), family))
    history = (("<image>What is this?", "A red circle."),)
    ids, reason = encode_pair("Which colour was it? <image>", ["a.png", "b.png"], "Red.", "Blue.", codec,
                              history=history)  # fmt: skip
    assert reason is None
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colour was it? "}, {"type": "image"},
                                     {"type": "text", "text": ""}]},
    ]  # fmt: skip
    text = codec.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(codec.generation_tail)  # Gemma 4's empty thought channel: left to generation prompts
    text = text.removesuffix(codec.generation_tail) if codec.generation_tail else text
    span = get_family(family).image_span(codec.processor)  # Gemma 3: the processor's text around each image
    text = text.replace(span.placeholder, span.text) if span else text
    assert ids["prompt_input_ids"] == codec.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids["prompt_input_ids"].count(codec.image_marker_id) == 2
    assert "A red circle." in codec.tokenizer.decode(ids["prompt_input_ids"])
    alone, _ = encode_pair("Which colour was it? <image>", ["b.png"], "Red.", "Blue.", codec)
    assert ids["chosen_input_ids"] == alone["chosen_input_ids"]
    assert ids["prompt_input_ids"][-len(alone["prompt_input_ids"]) + 20 :] == alone["prompt_input_ids"][20:]
    dataset = tokenize_pairs([PreferencePair("p", "Which colour was it? <image>", ("a.png", "b.png"), "Red.",
                                             "Blue.", 1.0, 0.0, history=history)], codec)  # fmt: skip
    assert list(dataset[0]["prompt_input_ids"]) == ids["prompt_input_ids"]


def test_a_conversation_is_one_prompt_for_the_split_and_pairs_without_turns_keep_their_keys(tmp_path):
    tokenizer = QWenTokenizer.from_pretrained(write_tiny_vocab(tmp_path))
    record = {"prompt_id": "p", "prompt": "Q", "images": [], "videos": [], "chosen": "a", "rejected": "b",
              "chosen_score": 1.0, "rejected_score": 0.0}  # fmt: skip
    key = cache_key([record], tokenizer, 64, "drop")
    assert key == cache_key([{**record, "history": []}], tokenizer, 64, "drop")
    assert key != cache_key([{**record, "history": [["hi", "hello"]]}], tokenizer, 64, "drop")
    plain = normalize_preference_row({"prompt": "Q", "chosen": "a", "rejected": "b"})
    later = normalize_preference_row({"prompt": "Q2", "chosen": "a", "rejected": "b", "history": [["Q", "A"]]})
    assert plain.id != later.id and prompt_key(plain) == prompt_key(later) == ("Q", (), ())
    # the pairs of a conversation at each of its turns are one prompt: on one side of the split, never both
    pairs = [PreferencePair(f"c{c}-{turn}", f"Q{turn}", (), "a", "b", 1.0, 0.0,
                            history=tuple((f"open {c}" if t == 0 else f"Q{t}", "ok") for t in range(turn)))
             for c in range(6) for turn in range(1, 4)]  # fmt: skip
    train, evaluation = split_by_prompt(pairs, eval_size=2, seed=0)
    assert len(train) == 12 and len(evaluation) == 6
    assert {p.history[0][0] for p in train}.isdisjoint({p.history[0][0] for p in evaluation})
    assert pairs[0].to_dict()["history"] == [["open 0", "ok"]]
    # one id for a conversation's pairs at its turns; another first turn under that id is refused, saying so
    rows = [{"id": "c", "prompt": "Q1", "chosen": "a", "rejected": "b"},
            {"id": "c", "prompt": "Q2", "history": [["Q1", "ok"]], "chosen": "a", "rejected": "b"},
            {"id": "c", "prompt": "Q2", "history": [["Other", "ok"]], "chosen": "a", "rejected": "b"}]  # fmt: skip
    kept, report = pairs_from_preference_rows(rows)
    assert [p.history for p in kept] == [(), (("Q1", "ok"),)] and report.rows_dropped["reused_id"] == 1
    assert "another prompt (question, or first turn) or media" in report.first_details["reused_id"]


def test_history_as_messages_and_what_is_wrong_with_a_row_is_said_where_it_is():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A red circle."}]  # fmt: skip
    row = normalize_preference_row({"prompt": LAST, "history": messages, "chosen": "a", "rejected": "b"})
    assert row.history == (("<image>What is this?", "A red circle."),)
    other = {"prompt": "Q", "history": "job-7 log", "chosen": "a", "rejected": "b"}  # a column of another meaning
    assert normalize_preference_row(other, columns={"history": None}).history == ()
    assert DataSection(source="preference", path="x.jsonl", columns={"history": None}).check() is None
    with pytest.raises(RecipeError, match="data.columns.prompt = None is not allowed"):
        DataSection(source="preference", path="x.jsonl", columns={"prompt": None}).check()
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "x"},
                                  {"from": "gpt", "value": 3}, {"from": "human", "value": "y"}],
                "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}  # fmt: skip
    cases = [
        ({"prompt": "Q", "history": [["x", None]], "chosen": "a", "rejected": "b"},
         "history[0]'s assistant text is NoneType"),
        ({"prompt": "Q", "history": [["x"]], "chosen": "a", "rejected": "b"}, "history[0] is 1 items"),
        ({"prompt": "Q", "history": "x", "chosen": "a", "rejected": "b"}, "history is str"),
        ({"prompt": "Q", "history": messages[:1], "chosen": "a", "rejected": "b"}, "history has the roles ['user']"),
        (sharegpt, "conversations[2] content is int"),  # counted in the file, the system message included
        ({"chosen": [user("x"), assistant("a"), assistant("c")], "rejected": [user("x"), assistant("b")]},
         "after the messages both start with (the prompt), chosen and rejected must be one assistant message each"),
    ]  # fmt: skip
    for raw, detail in cases:
        with pytest.raises(RowError) as caught:
            normalize_preference_row(raw)
        assert caught.value.detail.startswith(detail), caught.value.detail


def test_silkie_chat_numbers_pictures_on_from_the_earlier_turns_as_training():
    from silkie.models.qwen_vl.family import format_turns
    from silkie.tools.chat_inputs import image_query

    history = [("Picture 1: <img>a.jpg</img>\nWhat is this?", "A circle.")]
    assert image_query(["b.jpg"], "And this?", history) == "Picture 2: <img>b.jpg</img>\nAnd this?"
    assert format_turns(["<image>What is this?", "<image>And this?"], ["a.jpg", "b.jpg"]) == [
        history[0][0], "Picture 2: <img>b.jpg</img>\nAnd this?"]  # fmt: skip


def write_conversations(root, n: int = 48):
    """LLaMA-Factory ShareGPT rows whose picture is in the first turn and whose question is in the last: which colour
    was the shape (chosen: its colour, rejected: another)."""
    import json

    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
    names = sorted(colours)
    (root / "media").mkdir(parents=True)
    rows = []
    for index in range(n):
        colour, other = names[index % 3], names[(index + 1 + index // 3 % 2) % 3]
        Image.new("RGB", (56, 56), colours[colour]).save(root / "media" / f"{index:03d}.png")
        rows.append({"id": f"c{index}", "images": [f"{index:03d}.png"],
                     "conversations": [{"from": "human", "value": "<image>Here is a shape."},
                                       {"from": "gpt", "value": "I see it."},
                                       {"from": "human", "value": "Which colour was the shape?"}],
                     "chosen": {"from": "gpt", "value": f"It was {colour}."},
                     "rejected": {"from": "gpt", "value": f"It was {other}."}})  # fmt: skip
    path = root / "conversations.json"
    path.write_text(json.dumps(rows))
    return path


def test_a_conversation_whose_picture_came_turns_ago_trains_and_evaluates_as_trained(tmp_path):
    import json

    from silkie.config import load_recipe
    from silkie.tools.evaluate import evaluate_run
    from silkie.train import run_training

    from .conftest import REPO_ROOT

    data = write_conversations(tmp_path / "data")
    overrides = [f"model.path={BUILDERS['qwen2_vl'](tmp_path / 'model')}", "data.source=preference",
                 f"data.path={data}", f"data.images={data.parent / 'media'}", "data.eval_fraction=0.25",
                 "training.max_steps=10", "training.per_device_train_batch_size=4", "training.eval_strategy=steps",
                 "training.eval_steps=10", "training.logging_steps=1", "training.report_to=none",
                 "training.lr_scheduler_type=constant", "training.warmup_ratio=0.0",
                 "training.learning_rate=3e-3"]  # fmt: skip
    working = tmp_path / "run"
    final = run_training(load_recipe(REPO_ROOT / "dpo_config" / "demo_qwen2_vl.yaml", overrides), working)
    records = [json.loads(line) for line in (working / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    result = evaluate_run(working, device="cpu")
    assert result["split_size"] == result["summary"]["n_pairs"] == 12 and result["dropped_pairs"] == 0
    assert result["summary"]["rewards/accuracies"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert result["summary"]["logps/chosen"] == pytest.approx(final["eval_logps/chosen"], rel=1e-4)
    import datasets

    from silkie.data.formatting import STATS_FILE
    from silkie.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_section(tmp_path / "model", "qwen2_vl")).tokenizer
    cached = [datasets.load_from_disk(str(path.parent)) for path in (working / "cache").rglob(STATS_FILE)]
    assert sorted(map(len, cached)) == [12, 36]
    prompt = tokenizer.decode(cached[0][0]["prompt_input_ids"])  # the whole conversation, its picture first
    assert prompt.count("<|im_start|>user") == 2 and "I see it.<|im_end|>" in prompt
    assert prompt.index("<|image_pad|>") < prompt.index("Here is a shape.") < prompt.index("Which colour")
