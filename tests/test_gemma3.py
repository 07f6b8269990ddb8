"""Gemma 3: prompts and pixels exactly as `Gemma3Processor` makes them (blank lines around each image joined with the
text), an image's tokens attended both ways and sliding-window layers in the packed rows (what Gemma 3 and 4 share,
generation's stops among it: test_gemma_families)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from transformers import AutoConfig

from silkie.config import ModelSection
from silkie.data.collator import PairCollator
from silkie.data.formatting import encode_pair
from silkie.dev.tiny_gemma3 import GEMMA3_SLIDING_WINDOW
from silkie.errors import InputError
from silkie.models.family import get_family
from silkie.models.loading import load_base_model, load_tokenizer

from .hf_fixtures import BUILDERS, family_batch, pair_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return BUILDERS["gemma3"](tmp_path_factory.mktemp("gemma3") / "tiny-gemma3")


def section(folder, **extra) -> ModelSection:
    return ModelSection(path=str(folder), family="gemma3", dtype="fp32", **extra)


@pytest.mark.parametrize(
    ("prompt", "system", "joined"),
    [
        ("Compare <image> with\n<image>.", "Be brief.", False),  # the template trims texts: no newline meets
        ("<image>What is this?", None, True),  # "user\n" + "\n\n"
        ("<image>Describe it.", "Be brief.", True),  # the system message's "\n\n" + "\n\n"
        ("Both: <image><image>", None, True),  # one image's "\n\n" + the next one's
    ],
)
def test_prompt_ids_pixels_and_token_types_equal_the_processor_s(folder, prompt, system, joined):
    """Images at their markers after text, first, next to each other, with and without a system message: the
    collator's expanded ids, the pixels and the token types are what `Gemma3Processor` gives for the chat
    template's text (TRL's path), also where the blank lines around an image join the newlines next to them."""
    codec = load_tokenizer(section(folder))
    family = get_family("gemma3")
    config = AutoConfig.from_pretrained(folder)
    count = prompt.count("<image>")
    pictures = [pair_image(1, (112, 56)), pair_image(2, (300, 200))][:count]
    ids = codec.prompt_ids(prompt, ["a", "b"][:count], system=system)
    assert ids.count(codec.image_marker_id) == count  # one marker per image until the collator expands it
    processed = family.image_processor(config, section(folder))(pictures)
    (expanded,) = PairCollator._expanded([ids], processed, [count], [0])
    parts = [part for piece in prompt.split("<image>") for part in ({"type": "text", "text": piece}, {"type": "image"})]
    messages = [{"role": "user", "content": parts[:-1]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    text = codec.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = codec.processor(images=pictures, text=[text], return_tensors="pt", add_special_tokens=False)
    assert expanded == reference["input_ids"][0].tolist()
    assert torch.equal(processed.tensors["pixel_values"], reference["pixel_values"])
    token_types = family.token_kwargs(config, torch.tensor([expanded]))["token_type_ids"]
    assert torch.equal(token_types, reference["token_type_ids"])
    assert expanded.count(config.image_token_id) == 16 * count
    # the blank lines join the newlines around them: the image's ids put between the text's would differ
    tokenize = codec.tokenizer.convert_tokens_to_ids
    span = [*tokenize(["\n\n", "<start_of_image>"]), *[config.image_token_id] * 16]
    span += tokenize(["<end_of_image>", "\n\n"])
    pieces = [codec.tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in text.split("<start_of_image>")]
    apart = pieces[0] + [token for piece in pieces[1:] for token in span + piece]
    assert len(apart) - len(expanded) == int(joined)  # one token fewer where two newline runs join


def test_newlines_and_media_tokens_in_texts(folder):
    """Gemma's newline runs are added tokens, not template markers: texts with blank lines are kept; the image
    tokens written in a text drop the pair."""
    codec = load_tokenizer(section(folder))
    assert "\n" in codec.tokenizer.get_added_vocab() and all(m.strip() for m in codec.template_markers)
    assert encode_pair("Line one.\n\nLine two.", ["a"], "A.\n\nB.", "C.", codec)[1] is None
    for tag in ("<start_of_image>", "<image_soft_token>", "<end_of_image>"):
        assert encode_pair(f"Look {tag} here", ["a"], "A.", "B.", codec) == (None, "image_tag_in_text")
    assert encode_pair("Q", [], "A.<end_of_turn>", "B.", codec) == (None, "chat_template_in_text")


def test_packed_rows_take_a_mask_per_layer_kind(folder):
    """The efficient step's rows: the sliding-window layers see `sliding_window` positions back (from where each
    answer restarts after the prompt), an image's tokens see each other both ways; the prompts here are longer
    than the window, so the step-equality tests (tests/test_hf_vlm_step.py) exercise both."""
    from silkie.dpo.batching import packed_rows

    model = load_base_model(section(folder))
    batch, pad = family_batch(folder, "gemma3", model)
    assert batch["prompt_attention_mask"].sum(1).min() > GEMMA3_SLIDING_WINDOW
    rows = packed_rows(batch, pad, None, 1, False)
    family = get_family("gemma3")
    masks = family.attention_masks(model, rows.attention_mask_on(), rows.input_ids, rows.position_ids)
    assert set(masks) == {"full_attention", "sliding_attention"}
    full, sliding, block = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0], rows.attention_mask_on()
    image = (rows.input_ids[0] == model.config.image_token_id).nonzero().flatten()
    first, last = int(image[0]), int(image[-1])
    assert full[first, last] and not block[0, 0, first, last]  # the image's first token sees its last
    rejected = (rows.segment[0] == 2).nonzero().flatten()
    query, positions = int(rejected[0]), rows.position_ids[0]
    assert block[0, 0, query].sum() > GEMMA3_SLIDING_WINDOW  # the full layer sees the prompt
    seen = sliding[query].nonzero().flatten()
    assert (positions[query] - positions[seen]).max() == GEMMA3_SLIDING_WINDOW - 1  # by position, not row offset
    assert int(query - seen.min()) > GEMMA3_SLIDING_WINDOW  # the chosen answer lies between in the row
    padding = batch["prompt_attention_mask"]  # a concatenated row's: the model builds its masks from token types
    assert family.attention_masks(model, padding, batch["prompt_input_ids"], None) is padding


def test_eager_attention_takes_the_packed_rows_masks_too(folder):
    """Eager attention adds the masks: each of the per-kind masks is made additive, and the packed rows score as
    the plain path does."""
    from .hf_fixtures import OPTION_SETS, PLAIN, assert_same_step, lora_model, run_step

    model = lora_model(folder, "gemma3", attn="eager")
    batch, pad = family_batch(folder, "gemma3", model)
    assert_same_step(run_step(model, batch, OPTION_SETS["all"], pad), run_step(model, batch, PLAIN, pad))


def test_newline_runs_saved_as_special_are_not_image_tags(folder, tmp_path):
    """A fine-tune may save Gemma's newline runs as special tokens: texts with blank lines still encode."""
    import shutil

    from transformers import AutoProcessor

    from silkie.models.hf_vlm.codec import ChatTemplateCodec

    copy = tmp_path / "special-newlines"
    shutil.copytree(folder, copy)
    processor = AutoProcessor.from_pretrained(copy)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["\n\n"]})
    family = get_family("gemma3")
    codec = ChatTemplateCodec(processor, 16, image_span=family.image_span(processor))
    assert "\n\n" not in codec._tags
    assert encode_pair("Line one.\n\nLine two.", ["a"], "A.", "B.", codec)[1] is None


def test_pan_and_scan_and_a_token_count_mismatch_are_refused(folder, tmp_path):
    import shutil

    config = AutoConfig.from_pretrained(folder)
    config.mm_tokens_per_image = 4
    with pytest.raises(InputError, match=r"gives 16 tokens per image \(image_seq_length\), its model 4"):
        get_family("gemma3").image_processor(config, section(folder))
    scanned = tmp_path / "scanned"
    shutil.copytree(folder, scanned)
    settings = json.loads((scanned / "processor_config.json").read_text())
    settings["image_processor"]["do_pan_and_scan"] = True
    (scanned / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(InputError, match="turns on pan-and-scan"):
        get_family("gemma3").image_processor(AutoConfig.from_pretrained(folder), section(scanned))


def test_liger_patches_gemma3_with_its_geglu_kernel(folder, monkeypatch):
    """liger-kernel's Gemma 3 patch names its MLP kernel `geglu` (Gemma's GELU-gated MLP), not `swiglu`."""
    from silkie.models.kernels import use_liger

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_gemma3 = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    assert use_liger(load_base_model(section(folder)), "gemma3") == 2
    assert calls[0]["geglu"] and "swiglu" not in calls[0] and not calls[0]["fused_linear_cross_entropy"]


def test_a_folder_laid_out_as_the_releases_loads_the_same(folder, tmp_path):
    """google/gemma-3-*-it as released (transformers 4.50): a minimal text config (`sliding_window_pattern`, the old
    `rope_scaling` / `rope_local_base_freq` keys), the image processor in preprocessor_config.json, the media tokens as
    `extra_special_tokens`: the same layer kinds, window, ids and prompts as the stand-in."""
    import shutil

    released = tmp_path / "released"
    shutil.copytree(folder, released)
    config = json.loads((released / "config.json").read_text())
    text = config["text_config"]
    for key in ("layer_types", "rope_parameters", "_sliding_window_pattern", "use_bidirectional_attention"):
        text.pop(key)
    text |= {"sliding_window_pattern": 2, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
             "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}  # fmt: skip
    (released / "config.json").write_text(json.dumps(config))
    combined = json.loads((released / "processor_config.json").read_text())
    image = combined.pop("image_processor") | {"processor_class": "Gemma3Processor", "do_pan_and_scan": None}
    (released / "preprocessor_config.json").write_text(json.dumps(image))
    (released / "processor_config.json").write_text(json.dumps(combined))
    tokenizer = json.loads((released / "tokenizer_config.json").read_text())
    for key in ("model_specific_special_tokens", "is_local", "local_files_only"):
        tokenizer.pop(key, None)
    tokenizer["extra_special_tokens"] = {k: tokenizer[k] for k in ("boi_token", "eoi_token", "image_token")}
    (released / "tokenizer_config.json").write_text(json.dumps(tokenizer))

    model = load_base_model(section(released))
    text = model.config.get_text_config()
    assert text.layer_types == ["sliding_attention", "full_attention"] and text.sliding_window == GEMMA3_SLIDING_WINDOW
    assert text.rope_parameters["full_attention"]["rope_type"] == "linear"
    ours, theirs = load_tokenizer(section(folder)), load_tokenizer(section(released))
    assert theirs.image_marker_id == ours.image_marker_id == model.config.image_token_id
    prompt = ("Compare <image> with <image>.", ["a", "b"])
    assert theirs.prompt_ids(*prompt, system="Be brief.") == ours.prompt_ids(*prompt, system="Be brief.")
    assert theirs.answer_ids("Red.") == ours.answer_ids("Red.")
    images = get_family("gemma3").image_processor(model.config, section(released))
    assert images([pair_image(1, (80, 60))]).tensors["pixel_values"].shape == (1, 3, 112, 112)
