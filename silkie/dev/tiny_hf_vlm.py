"""Tiny random Qwen2-VL and LLaVA-1.5 folders in the official Hugging Face format (stand-ins for tests and the demo).

Each folder loads offline with `AutoProcessor.from_pretrained` and `AutoModelForImageTextToText.from_pretrained`:
config.json, model.safetensors (fp32), generation_config.json, a BPE tokenizer trained here on the synthetic
VLFeedback texts, the PIL image processor settings and the official-style chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from silkie.models.hf_vlm.processors import (
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    register_image_only_processors,
)

QWEN2_VL_SPECIAL_TOKENS = (  # official order: ids follow the BPE vocabulary (151643.. in the real model)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
LLAVA_SPECIAL_TOKENS = ("<image>", "<pad>")  # appended after the vocabulary, like llava-hf's 32000/32001
LLAMA_CORE_TOKENS = ("<unk>", "<s>", "</s>")
QWEN2_VL_SYSTEM = "You are a helpful assistant."

# Qwen/Qwen2-VL-7B-Instruct's chat_template, verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's template (images first, then text), closing assistant turns with `</s>` like the
# original LLaVA-1.5 "v1" conversation: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}"
    "{% set contents = [{'type': 'text', 'text': message['content']}] %}{% else %}"
    "{% set contents = message['content'] %}{% endif %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in contents | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in contents | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% else %}{% generation %}"
    "{% for content in contents | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_VL_MIN_PIXELS = 56 * 56  # 4 merged tokens at least
QWEN2_VL_MAX_PIXELS = 112 * 112  # 16 merged tokens at most
LLAVA_IMAGE_SIZE = 56  # (56 / 14)^2 = 16 image tokens
PATCH_SIZE = 14
QWEN_VIDEO_KEYS = ("patch_size", "temporal_patch_size", "merge_size")  # the video processor's own settings
TEXT_HIDDEN = 64
VISION_HIDDEN = 32


def tokenizer_corpus() -> list[str]:
    """The synthetic VLFeedback prompts/answers plus the chat scaffolding of both templates."""
    from silkie.dev.tiny_qwen_vl import demo_corpus

    scaffolding = [QWEN2_VL_SYSTEM, "system\n", "user\n", "assistant\n", "USER: ", " ASSISTANT: ", "Picture 1: "]
    return scaffolding + demo_corpus()


def train_bpe(texts: Iterable[str], vocab_size: int, backend: Tokenizer, **trainer_kwargs) -> tuple[dict, list]:
    """Train BPE merges with `backend`'s normalizer and pre-tokenizer; return (vocab, merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = backend.normalizer
    tokenizer.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kwargs)
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def _llama_vocab(texts: Iterable[str], vocab_size: int) -> tuple[dict, list]:
    """Llama layout: <unk> <s> </s>, the 256 byte-fallback tokens <0x00>..<0xFF>, then the learned pieces."""
    words = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = words  # split on words while training; LlamaTokenizer applies merges unsplit
    learned, merges = train_bpe(texts, vocab_size, backend, special_tokens=list(LLAMA_CORE_TOKENS))
    pieces = list(LLAMA_CORE_TOKENS) + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += [piece for piece, _ in sorted(learned.items(), key=lambda item: item[1]) if piece not in pieces]
    return {piece: index for index, piece in enumerate(pieces)}, merges


def train_tiny_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = QWEN2_VL_SPECIAL_TOKENS,
    style: Literal["qwen2", "llama"] = "qwen2",
) -> PreTrainedTokenizerFast:
    """Train a small BPE offline and wrap it in the family's tokenizer class, `special_tokens` appended in order.

    "qwen2": byte-level BPE with Qwen2's pre-tokenizer (`Qwen2Tokenizer`, eos <|im_end|> like Qwen2-VL-Instruct).
    "llama": sentencepiece-style BPE with byte fallback (`LlamaTokenizer`, <s>/</s>/<unk>, bos added).
    """
    corpus = list(texts) if texts is not None else tokenizer_corpus()
    if style == "qwen2":
        vocab, merges = train_bpe(
            corpus, vocab_size, Qwen2Tokenizer().backend_tokenizer, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    elif style == "llama":
        vocab, merges = _llama_vocab(corpus, vocab_size)
        tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=4096)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    new = [token for token in special_tokens if token not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": new})
    if style == "qwen2" and "<|im_end|>" in special_tokens:
        tokenizer.eos_token = "<|im_end|>"
    if style == "llama" and "<pad>" in special_tokens:
        tokenizer.pad_token = "<pad>"
    return tokenizer


def padded_vocab_size(tokenizer: PreTrainedTokenizerFast, multiple: int = 64) -> int:
    """Embedding rows for `tokenizer`, padded like the official checkpoints (151936, 32064)."""
    return (len(tokenizer) + multiple - 1) // multiple * multiple


# wider than the 0.02 of real checkpoints: at 64 wide that would leave the outputs near uniform and the tiny
# demo's LoRA gradients near zero
INIT_STD = 0.1
TINY_VIT = dict(  # the 2-layer, 32-wide ViT of the CLIP-style towers (LLaVA's CLIP, InternVL's InternViT)
    hidden_size=VISION_HIDDEN,
    intermediate_size=4 * VISION_HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=PATCH_SIZE,
    initializer_range=INIT_STD,
)


TINY_TEXT = dict(  # the 2-layer, 64-wide language model of the stand-ins (4 heads of 16, 2 key-value heads)
    hidden_size=TEXT_HIDDEN,
    intermediate_size=4 * TEXT_HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=INIT_STD,
)


def qwen2_text_and_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[dict, dict]:
    """The tiny Qwen2 text config and the special-token ids of a Qwen2-VL-style config."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    text = dict(
        **TINY_TEXT,
        vocab_size=padded_vocab_size(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},  # head 16
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    special = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return text, special


def tiny_qwen2_vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    """Qwen2-VL with a 2-layer, 64-wide text model and a 2-block, 32-wide ViT; token ids from `tokenizer`."""
    text, special = qwen2_text_and_ids(tokenizer)
    vision = dict(
        depth=2,
        embed_dim=VISION_HIDDEN,
        num_heads=2,
        mlp_ratio=4,
        hidden_size=TEXT_HIDDEN,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=INIT_STD,
    )
    return Qwen2VLConfig(text_config=text, vision_config=vision, **special)


def tiny_qwen2_5_vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL: the same text model; a 2-block ViT with a SwiGLU MLP, window attention in block 0, full in 1."""
    text, special = qwen2_text_and_ids(tokenizer)
    vision = dict(
        depth=2,
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_heads=2,
        out_hidden_size=TEXT_HIDDEN,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        initializer_range=INIT_STD,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)


def tiny_llava_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA-1.5 with a 2-layer, 32-wide CLIP ViT (56 px, patch 14) and a 2-layer, 64-wide Llama."""
    vision = CLIPVisionConfig(**TINY_VIT, image_size=LLAVA_IMAGE_SIZE, projection_dim=VISION_HIDDEN)
    text = LlamaConfig(
        **{**TINY_TEXT, "num_key_value_heads": 4},  # LLaVA-1.5's Vicuna: no grouped-query heads
        vocab_size=padded_vocab_size(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(LLAVA_IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def save_tiny_model(
    model_class: type[PreTrainedModel],
    config,
    out: Path,
    seed: int,
    eos: int | list[int],
    init: Callable[[PreTrainedModel], None] | None = None,
) -> None:
    """Initialise `model_class(config)` from `seed` (then `init(model)`: weights a release would not leave as the
    model's own init does); save it (fp32 safetensors) with a greedy generation config."""
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    if init is not None:
        with torch.no_grad():
            init(model)
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=eos, pad_token_id=text.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)


def finish_image_only_processor(
    out: Path,
    image_processor: Any,
    video_type: str = "Qwen2VLVideoProcessor",
    keys: Sequence[str] = QWEN_VIDEO_KEYS,
    parts: dict | None = None,
) -> None:
    """Let a saved image-only processor (`ImageOnlyQwen2VLProcessor`, ...) load as the official one where
    torchvision is.

    Drops the class name (AutoProcessor then goes by config.json's model type) and records the video processor
    settings (of `video_type`: the image processor's size, where it has one, and `keys`) and any other `parts` (name
    -> settings: Gemma 4's audio feature extractor) that the official processor needs.
    """
    video = {"video_processor_type": video_type}
    if image_processor.size:
        video["size"] = dict(image_processor.size)
    video |= {key: getattr(image_processor, key) for key in keys}
    additions = {"processor_config.json": {"video_processor": video, **(parts or {})}, "tokenizer_config.json": {}}
    for name, extra in additions.items():
        data = json.loads((out / name).read_text(encoding="utf-8"))
        data.pop("processor_class", None)
        (out / name).write_text(json.dumps(data | extra, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_qwen2_vl(out_dir: str | Path, seed: int = 0, version: str = "2") -> Path:
    """Write a tiny random Qwen2-VL (`version` "2.5": Qwen2.5-VL) folder: model, tokenizer, PIL image processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(style="qwen2")
    if version == "2.5":
        config, model_class, processor_class = (
            tiny_qwen2_5_vl_config(tokenizer), Qwen2_5_VLForConditionalGeneration, ImageOnlyQwen2_5_VLProcessor
        )  # fmt: skip
    else:
        config, model_class = tiny_qwen2_vl_config(tokenizer), Qwen2VLForConditionalGeneration
        processor_class = ImageOnlyQwen2VLProcessor
    eos = [config.text_config.eos_token_id, config.text_config.bos_token_id]  # <|im_end|>, <|endoftext|>
    save_tiny_model(model_class, config, out, seed, eos)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN2_VL_MIN_PIXELS, max_pixels=QWEN2_VL_MAX_PIXELS, patch_size=PATCH_SIZE, merge_size=2
    )
    processor = processor_class(image_processor, tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    finish_image_only_processor(out, image_processor)
    register_image_only_processors()
    return out


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL folder (same tokenizer, template and image processor as Qwen2-VL)."""
    return build_tiny_qwen2_vl(out_dir, seed, version="2.5")


def build_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA-1.5 folder (model, Llama tokenizer, PIL CLIP image processor, processor)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(special_tokens=LLAVA_SPECIAL_TOKENS, style="llama")
    config = tiny_llava_config(tokenizer)
    save_tiny_model(LlavaForConditionalGeneration, config, out, seed, tokenizer.eos_token_id)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_IMAGE_SIZE}, crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out
