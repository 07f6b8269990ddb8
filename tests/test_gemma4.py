"""Gemma 4: prompts, pixels and patch positions exactly as `Gemma4Processor` makes them, TRL's split of the generation
prompt's empty thought channel, images attended both ways in the sliding-window layers only, the KV-sharing layers
and the logit cap on the chunked log-probs, the routed experts (26B-A4B), the soft-token budget (what Gemma 3 and 4
share: test_gemma_families)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig

from silkie.config import LoraSection, ModelSection
from silkie.data.collator import PairCollator
from silkie.dev.tiny_gemma4 import GEMMA4_SLIDING_WINDOW, build_tiny_gemma4_moe
from silkie.errors import RecipeError
from silkie.models.family import get_family
from silkie.models.loading import apply_lora, load_base_model, load_tokenizer

from .hf_fixtures import BUILDERS, OPTION_SETS, PLAIN, assert_same_step, family_batch, pair_image, run_step


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return BUILDERS["gemma4"](tmp_path_factory.mktemp("gemma4") / "tiny-gemma4")


def section(folder, **extra) -> ModelSection:
    return ModelSection(path=str(folder), family="gemma4", dtype="fp32", **extra)


@pytest.mark.parametrize(
    ("prompt", "system", "sizes"),
    [
        ("Compare <image> with\n<image>.", "Be brief.", [(112, 56), (300, 200)]),  # text trimmed around each image
        ("<image>What is this?", None, [(64, 80)]),
        ("Both: <image><image>", None, [(90, 90), (20, 400)]),  # an elongated picture: 24 px wide
    ],
)
def test_prompt_ids_pixels_positions_and_token_types_equal_the_processor_s(folder, prompt, system, sizes):
    """The collator's expanded ids (`<|image>` + each image's soft tokens + `<image|>`), the patches, their positions
    and the token types are what `Gemma4Processor` gives for the chat template's text (TRL's path)."""
    codec = load_tokenizer(section(folder))
    family = get_family("gemma4")
    config = AutoConfig.from_pretrained(folder)
    pictures = [pair_image(k, size) for k, size in enumerate(sizes)]
    ids = codec.prompt_ids(prompt, ["a", "b"][: len(sizes)], system=system, generation=True)
    processed = family.image_processor(config, section(folder))(pictures)
    (expanded,) = PairCollator._expanded([ids], processed, [len(sizes)], [0])
    parts = [part for piece in prompt.split("<image>") for part in ({"type": "text", "text": piece}, {"type": "image"})]
    messages = [{"role": "user", "content": parts[:-1]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    text = codec.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = codec.processor(images=pictures, text=[text], return_tensors="pt", add_special_tokens=False)
    assert expanded == reference["input_ids"][0].tolist()
    for name in ("pixel_values", "image_position_ids"):
        assert torch.equal(processed.tensors[name], reference[name])
    token_types = family.token_kwargs(config, torch.tensor([expanded]))["mm_token_type_ids"]
    assert torch.equal(token_types, reference["mm_token_type_ids"])
    assert processed.tokens_per_image == [int(n) for n in (reference["image_position_ids"][..., 0] >= 0).sum(1) // 9]
    assert expanded.count(config.boi_token_id) == expanded.count(config.eoi_token_id) == len(sizes)


@pytest.mark.parametrize("prompt", ["What happens in <video>?", "Clip:<video> and <image>", "<video>"])
def test_video_ids_are_the_processor_s_frame_by_frame(folder, prompt):
    """A video's marker becomes, per frame, `mm:ss <|image>` + its soft tokens + `<image|>`, frames joined by spaces,
    as `Gemma4Processor.replace_video_token` writes it (the text written in place, tokenized with the prompt: the
    first time joins the text before it); frames are sized at the video budget (70 tokens), as the official
    `get_aspect_ratio_preserving_size` gives."""
    from types import SimpleNamespace

    from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

    from silkie.models.family import VideoClip

    codec = load_tokenizer(section(folder))
    family = get_family("gemma4")
    config = AutoConfig.from_pretrained(folder)
    images = family.image_processor(config, section(folder))
    frames = [pair_image(k, (80, 50)) for k in range(3)]
    clip = VideoClip(frames, fps=0.5, times=(0.0, 2.0, 61.0))  # 00:00, 00:02, 01:01
    pictures = [pair_image(9, (64, 64))] if "<image>" in prompt else []
    ids = codec.prompt_ids(prompt, ["a"] * len(pictures), ["v"], generation=True)
    processed = images(pictures, videos=[clip])
    (expanded,) = PairCollator._expanded([ids], processed, [len(pictures)], [1])
    height, width = get_aspect_ratio_preserving_size(50, 80, patch_size=8, max_patches=70 * 9, pooling_kernel_size=3)
    per_frame = (height // 8) * (width // 8) // 9
    assert processed.tensors["num_frames_per_video"].tolist() == [3]
    assert (processed.tensors["video_position_ids"][..., 0] >= 0).sum(1).tolist() == [9 * per_frame] * 3
    kinds = {"<image>": "image", "<video>": "video"}
    content = [{"type": kinds[piece]} if piece in kinds else {"type": "text", "text": piece}
               for piece in re.split("(<image>|<video>)", prompt)]  # fmt: skip
    text = codec.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
    metadata = SimpleNamespace(fps=0.5, timestamps=[0.0, 2.0, 61.0])
    inputs = {"num_soft_tokens_per_video": [per_frame], "video_metadata": [metadata]}
    video = codec.processor.replace_video_token(inputs, 0)
    assert video.startswith("00:00 <|image>") and " 01:01 <|image>" in video
    text = text.replace("<|video|>", video, 1)
    if pictures:
        count = processed.tokens_per_image[0]
        text = text.replace("<|image|>", f"<|image>{'<|image|>' * count}<image|>", 1)
    assert expanded == codec.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert expanded.count(config.video_token_id) == 3 * per_frame


def test_the_empty_thought_channel_stays_with_the_generation_prompt(folder):
    """gemma-4-31B-it's generation prompt closes an empty thought channel, which a rendered model turn does not
    write: as TRL splits them, a pair's prompt ends at `<|turn>model\\n` and an answer is its text and `<turn|>\\n`;
    generation prompts keep the channel. With `enable_thinking` (model.chat_template_kwargs) the two agree."""
    codec = load_tokenizer(section(folder))
    assert codec.generation_tail == "<|channel>thought\n<channel|>"
    assert codec.prompt_text("Q").endswith("<|turn>user\nQ<turn|>\n<|turn>model\n")
    assert codec.prompt_text("Q", generation=True).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    tokenize = codec.tokenizer.convert_tokens_to_ids
    assert codec.answer_ids("A cat.") == codec._ids("A cat.") + tokenize(["<turn|>", "\n"])
    thinking = load_tokenizer(section(folder, chat_template_kwargs={"enable_thinking": True}))
    assert thinking.generation_tail == "" and thinking.prompt_text("Q").startswith("<bos><|turn>system\n<|think|>\n")
    assert thinking.answer_ids("A cat.") == codec.answer_ids("A cat.")


@pytest.mark.parametrize(
    ("system_branch", "rendered"),
    [  # gemma-4-31B-it's first release: a list of parts would be written as its repr, so the text goes as a string
        ("{{- messages[0]['content'] | trim -}}", "<|turn>system\nBe brief.<turn|>\n"),
        # later revisions: list parts each trimmed and followed by a space; TRL's list form is kept
        ("{%- if messages[0]['content'] is string -%}{{- messages[0]['content'] | trim -}}{%- else -%}"
         "{%- for item in messages[0]['content'] -%}{{- item['text'] | trim + ' ' -}}{%- endfor -%}{%- endif -%}",
         "<|turn>system\nBe brief. <turn|>\n"),
    ],
)  # fmt: skip
def test_system_messages_as_the_release_templates_render_them(folder, system_branch, rendered):
    from silkie.dev.tiny_gemma4 import GEMMA4_CHAT_TEMPLATE

    codec = load_tokenizer(section(folder))
    ours = "{{- content_text(messages[0]['content'], 'system') -}}"
    assert ours in GEMMA4_CHAT_TEMPLATE
    try:
        codec.processor.chat_template = GEMMA4_CHAT_TEMPLATE.replace(ours, system_branch)
        text = codec.prompt_text("Q", system="Be brief.")
    finally:
        codec.processor.chat_template = GEMMA4_CHAT_TEMPLATE  # the processor is cached per folder
    assert text.startswith(f"<bos>{rendered}<|turn>user\nQ<turn|>\n") and "'type'" not in text


@pytest.mark.parametrize("both_ways", ["vision", None])  # 31B / 26B-A4B; E2B / E4B
def test_packed_rows_attend_images_both_ways_in_the_sliding_layers_only(folder, both_ways):
    """As transformers' `create_masks_for_vision_model`: the full-attention layers are causal (the block mask); the
    sliding-window layers see `sliding_window` positions back and, where images are attended both ways, an image's
    later tokens. The prompts are longer than the window, so the step-equality tests exercise both."""
    from silkie.dpo.batching import packed_rows

    model = load_base_model(section(folder))
    model.config.get_text_config().use_bidirectional_attention = both_ways
    batch, pad = family_batch(folder, "gemma4", model)
    assert batch["prompt_attention_mask"].sum(1).min() > GEMMA4_SLIDING_WINDOW
    rows = packed_rows(batch, pad, None, 1, False)
    family = get_family("gemma4")
    block = rows.attention_mask_on()
    masks = family.attention_masks(model, block, rows.input_ids, rows.position_ids)
    assert set(masks) == {"full_attention", "sliding_attention"} and masks["full_attention"] is block
    sliding = masks["sliding_attention"][0, 0]
    image = (rows.input_ids[0] == model.config.image_token_id).nonzero().flatten()
    first, second = int(image[0]), int(image[1])
    assert not block[0, 0, first, second] and bool(sliding[first, second]) == (both_ways == "vision")
    rejected = (rows.segment[0] == 2).nonzero().flatten()
    query, positions = int(rejected[0]), rows.position_ids[0]
    seen = sliding[query].nonzero().flatten()
    assert (positions[query] - positions[seen]).max() == GEMMA4_SLIDING_WINDOW - 1  # by position, not row offset
    padding = batch["prompt_attention_mask"]  # a concatenated row's: the model builds its masks from token types
    assert family.attention_masks(model, padding, batch["prompt_input_ids"], None) is padding


def test_chunked_log_probs_read_every_position_and_cap_the_logits(folder):
    """The last layer reuses the keys and values of the one before it (E2B / E4B's KV sharing): an integer
    `logits_to_keep` would run it on the kept positions alone, so the hidden states are read with an index. The
    head applies the model's logit cap (`final_logit_softcapping`), as its forward does."""
    model = load_base_model(section(folder))
    batch, pad = family_batch(folder, "gemma4", model)
    family = get_family("gemma4")
    ids = batch["prompt_input_ids"]
    kwargs = {"input_ids": ids, "attention_mask": batch["prompt_attention_mask"], "use_cache": False}
    kwargs |= family.row_image_kwargs(model, batch, torch.arange(3), None) | family.row_kwargs(model, ids)
    with torch.no_grad():
        hidden = family.hidden_states(model, model, kwargs)
        logits = model(**kwargs).logits
        head = family.output_head(model)
        assert hidden.shape[:2] == ids.shape
        torch.testing.assert_close(head(hidden), logits, atol=1e-5, rtol=0)
        assert (model.lm_head(hidden) - logits).abs().max() > 1e-3  # the cap matters at these logits
        shared = model(**kwargs, logits_to_keep=1)
    assert shared.logits.shape[1] == 1


def test_routed_experts_take_lora_and_the_paths_agree(tmp_path):
    """26B-A4B's layout: each layer's experts sit beside its MLP; LoRA reaches them as parameters
    (`lora.target_parameters`), the efficient step scores as the plain one, and the expert adapters get gradients."""
    folder = build_tiny_gemma4_moe(tmp_path / "tiny-gemma4-moe")
    torch.manual_seed(0)
    base = load_base_model(section(folder))
    assert base.config.get_text_config().enable_moe_block
    lora = LoraSection(r=8, alpha=16, dropout=0.0, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = apply_lora(base, lora, "gemma4")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    batch, pad = family_batch(folder, "gemma4", model.train())
    plain = run_step(model, batch, PLAIN, pad)
    assert_same_step(run_step(model, batch, OPTION_SETS["all"], pad), plain, "gemma4")
    experts = [name for name in plain[3] if ".experts." in name]
    assert len(experts) == 2 * 2 * 4 and all(plain[3][name].abs().max() > 0 for name in experts)  # A, B x 2 x 4


def test_the_soft_token_budget_bounds_each_image(folder):
    """`model.max_image_tokens` is the processor's `max_soft_tokens`: a 90x90 picture fills 64 tokens at the stand-in's
    70 and 121 at 140 (resized to 264 px: 33x33 patches, pooled 3x3); the codec's bound and the tokenization cache
    key follow it. Off the processor's budgets, or for another family, it is refused in the recipe."""
    from silkie.data.formatting import cache_key

    default, larger = (load_tokenizer(section(folder, max_image_tokens=n)) for n in (None, 140))
    assert (default.image_token_budget, larger.image_token_budget) == (70, 140)
    record = {"prompt_id": "p", "prompt": "Q", "image": "i", "chosen": "a", "rejected": "b",
              "chosen_score": 1.0, "rejected_score": 0.0}  # fmt: skip
    assert cache_key([record], default, 512, "drop") != cache_key([record], larger, 512, "drop")
    config = AutoConfig.from_pretrained(folder)
    images = get_family("gemma4").image_processor(config, section(folder, max_image_tokens=140))
    assert images.image_processor is larger.processor.image_processor
    at_default = get_family("gemma4").image_processor(config, section(folder))
    assert at_default([pair_image(0, (90, 90))]).tokens_per_image == [64]
    batch = images([pair_image(0, (90, 90))])
    assert batch.tokens_per_image == [121] and batch.tensors["pixel_values"].shape == (1, 140 * 9, 192)
    with pytest.raises(RecipeError, match="model.max_image_tokens = 100.*one of 70, 140, 280, 560, 1120"):
        ModelSection(path="m", family="gemma4", max_image_tokens=100).check()
    with pytest.raises(RecipeError, match="model.max_image_tokens = 140.*only gemma4"):
        ModelSection(path="m", family="gemma3", max_image_tokens=140).check()


def test_an_encoder_s_masks_and_4_bit_experts_are_refused_at_load(folder, tmp_path):
    """`use_bidirectional_attention: all` (every token both ways) and 4-bit weights for the experts, which
    bitsandbytes would leave unquantized (and peft cast to fp32), are refused before the weights load."""
    import json
    import shutil

    from silkie.errors import InputError

    encoder = tmp_path / "encoder"
    shutil.copytree(folder, encoder)
    config = json.loads((encoder / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = "all"
    (encoder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="use_bidirectional_attention: all"):
        load_base_model(section(encoder))
    experts = build_tiny_gemma4_moe(tmp_path / "moe")
    with pytest.raises(InputError, match=r"lora.load_in_4bit with a Gemma 4 mixture of experts"):
        get_family("gemma4").load_model(section(experts), torch.float32, quantization_config=object())


def test_reentrant_checkpointing_is_refused_where_layers_share_keys_and_values(folder):
    """A reentrant checkpoint runs the layer that stores the shared keys and values without gradients, so the
    sharing layers' gradients into it would be lost (E2B / E4B): refused with the key to change."""
    from types import SimpleNamespace

    from silkie.errors import InputError
    from silkie.train.build import _check_reentrant_checkpointing

    model = load_base_model(section(folder))
    reentrant = SimpleNamespace(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(InputError, match=r"use_reentrant: true .*: 1 of its layers reuse earlier layers' keys"):
        _check_reentrant_checkpointing(reentrant, model, "gemma4")
    plain = SimpleNamespace(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    _check_reentrant_checkpointing(plain, model, "gemma4")
    model.config.get_text_config().num_kv_shared_layers = 0  # 31B, 26B-A4B
    _check_reentrant_checkpointing(reentrant, model, "gemma4")


def test_the_audio_tower_is_frozen_for_training(folder):
    """E2B / E4B hear too: no pair feeds their audio tower, which full fine-tuning with `lora.vision` would otherwise
    leave trainable without a gradient (DDP refuses that); the vision tower stays as the recipe asks."""
    from transformers import Gemma4AudioConfig, Gemma4ForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    config.audio_config = Gemma4AudioConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            output_proj_dims=16, subsampling_conv_channels=[8, 4])  # fmt: skip
    model = Gemma4ForConditionalGeneration(config)
    get_family("gemma4").prepare_for_training(model)
    hearing = [p for n, p in model.named_parameters() if n.startswith(("model.audio_tower.", "model.embed_audio."))]
    assert hearing and not any(p.requires_grad for p in hearing)
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())


def test_liger_is_refused_in_the_recipe():
    """liger-kernel has no Gemma 4 patch: refused before anything loads (fp16 too: test_gemma_families)."""
    with pytest.raises(RecipeError, match="model.liger_kernels = True.*no patch"):
        ModelSection(path="m", family="gemma4", liger_kernels=True).check()
    ModelSection(path="m", family="gemma4").check()
