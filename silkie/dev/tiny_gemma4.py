"""A tiny random Gemma 4 folder in the layout of google/gemma-4-*-it (a stand-in for tests and the demo).

Gemma 3's stand-in tokenizer (`train_gemma_tokenizer`) with Gemma 4's control tokens (`<|turn>` / `<turn|>`, the
image, audio and video tokens, the thought channel); a 2-layer, 32-wide Gemma 4 vision tower (8 px patches, pooled
3x3 into at most 70 soft tokens per image, the fewest the image processor allows; the releases: 16 px patches,
280 by default) and a 4-layer, 64-wide Gemma 4 language model with the releases' parts, each at least once:
sliding-window layers (a window of 16 positions, shorter than a prompt) between full-attention ones (wider heads,
keys as values, a quarter of each head rotated: 31B's), per-layer input embeddings (E2B/E4B's) and a last layer that
reuses the keys and values of the full-attention layer before it (E2B/E4B's KV sharing); a layer that reads a full
layer's output comes between them, so that what the full layer makes of an image reaches the answers. Images are
attended both ways in the sliding-window layers (`use_bidirectional_attention: vision`, as 31B and 26B-A4B). With
`moe`, each layer adds 4 routed experts, 2 per token, beside its MLP (26B-A4B's). The chat template has the layout
of gemma-4-31B-it's for system, user and assistant turns; its generation prompt closes an empty thought channel
unless `enable_thinking`.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import (
    AutoTokenizer,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from silkie.dev.tiny_gemma3 import train_gemma_tokenizer
from silkie.dev.tiny_hf_vlm import (
    INIT_STD,
    TEXT_HIDDEN,
    TINY_TEXT,
    VISION_HIDDEN,
    finish_image_only_processor,
    padded_vocab_size,
    save_tiny_model,
)
from silkie.models.hf_vlm.processors import ImageOnlyGemma4Processor

GEMMA4_MEDIA_TOKENS = {  # the tokenizer's named tokens Gemma4Processor reads (audio's too: it checks them)
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}
GEMMA4_CHAT_TOKENS = (
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", *GEMMA4_MEDIA_TOKENS.values(), "<|video|>"
)  # fmt: skip
# gemma-4-31B-it's layout for system / user / assistant turns (tools left out): a system turn when a system message
# is given or thinking is on (which opens it with <|think|>); texts trimmed; an assistant turn loses any thought
# channel it holds; the generation prompt closes an empty thought channel unless enable_thinking
GEMMA4_CHAT_TEMPLATE = (
    "{%- macro part_text(item, role) -%}{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|video|>' -}}{%- elif item['type'] == 'text' -%}"
    "{{- answer_text(item['text']) if role == 'model' else item['text'] | trim -}}{%- endif -%}{%- endmacro -%}"
    "{%- macro answer_text(text) -%}{%- set kept = namespace(text='') -%}"
    "{%- for piece in text.split('<channel|>') -%}"
    "{%- set kept.text = kept.text + (piece.split('<|channel>')[0] if '<|channel>' in piece else piece) -%}"
    "{%- endfor -%}{{- kept.text | trim -}}{%- endmacro -%}"
    "{%- macro content_text(content, role) -%}{%- if content is string -%}"
    "{{- answer_text(content) if role == 'model' else content | trim -}}"
    "{%- else -%}{%- for item in content -%}{{- part_text(item, role) -}}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}{%- set turns = messages -%}"
    "{{- bos_token -}}"
    "{%- if thinking or messages[0]['role'] in ['system', 'developer'] -%}{{- '<|turn>system\\n' -}}"
    "{%- if thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}{{- content_text(messages[0]['content'], 'system') -}}"
    "{%- set turns = messages[1:] -%}{%- endif -%}{{- '<turn|>\\n' -}}{%- endif -%}"
    "{%- for message in turns -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' + content_text(message['content'], role) + '<turn|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
    "{%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}{%- endif -%}"
)
GEMMA4_PATCH = 8  # px per patch side (the releases: 16)
GEMMA4_POOLING = 3  # patches per pooled soft token side, as the releases
GEMMA4_MAX_SOFT_TOKENS = 70  # per image: the fewest Gemma4ImageProcessor allows (70, 140, 280, 560, 1120)
GEMMA4_SLIDING_WINDOW = 16


def tiny_gemma4_config(tokenizer: PreTrainedTokenizerFast, moe: bool = False) -> Gemma4Config:
    """Gemma 4 with a 2-layer, 32-wide vision tower and a 4-layer, 64-wide text model (sliding, full, sliding, full
    reusing the second layer's keys and values; per-layer inputs); with `moe`, 4 routed experts a layer, 2 per
    token."""
    text = Gemma4TextConfig(
        **{**TINY_TEXT, "num_hidden_layers": 4},
        vocab_size=padded_vocab_size(tokenizer),
        vocab_size_per_layer_input=padded_vocab_size(tokenizer),
        head_dim=16,
        global_head_dim=32,  # the full-attention layers' heads (31B: 512 vs 256)
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=GEMMA4_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=1,
        hidden_size_per_layer_input=8,
        use_bidirectional_attention="vision",
        final_logit_softcapping=30.0,
        enable_moe_block=moe,
        num_experts=4 if moe else None,
        top_k_experts=2 if moe else None,
        moe_intermediate_size=TEXT_HIDDEN if moe else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = Gemma4VisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=VISION_HIDDEN // 2,
        patch_size=GEMMA4_PATCH,
        pooling_kernel_size=GEMMA4_POOLING,
        position_embedding_size=256,  # patches along a side: up to 210 for the most elongated picture
        initializer_range=INIT_STD,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA4_MEDIA_TOKENS.items()}
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,  # as 31B and 26B-A4B (E2B / E4B hear too)
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        audio_token_id=ids["audio_token"],
        initializer_range=INIT_STD,
    )


def _informative_positions(model: Gemma4ForConditionalGeneration) -> None:
    """Gemma 4 initialises its patch position table to ones (every patch at the same place): at random."""
    model.model.vision_tower.patch_embedder.position_embedding_table.normal_(std=INIT_STD)


def build_tiny_gemma4(out_dir: str | Path, seed: int = 0, moe: bool = False) -> Path:
    """Write a tiny random Gemma 4 folder (`moe`: with routed experts): model, tokenizer (with its control and image
    tokens), PIL image processor and chat template, saved by the image-only processor so that the official one
    loads it where torchvision is (its video processor and audio feature extractor at the releases' settings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scaffolding = ["system\n", "thought\n"]
    train_gemma_tokenizer(chat_tokens=GEMMA4_CHAT_TOKENS, scaffolding=scaffolding).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out, extra_special_tokens=GEMMA4_MEDIA_TOKENS)
    tokenizer.save_pretrained(out)  # the named tokens recorded for the processor
    config = tiny_gemma4_config(tokenizer, moe)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]  # as the releases' generation
    save_tiny_model(Gemma4ForConditionalGeneration, config, out, seed, eos, init=_informative_positions)
    image_processor = Gemma4ImageProcessorPil(
        patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_POOLING, max_soft_tokens=GEMMA4_MAX_SOFT_TOKENS
    )
    ImageOnlyGemma4Processor(image_processor, tokenizer, chat_template=GEMMA4_CHAT_TEMPLATE).save_pretrained(out)
    hearing = json.loads(Gemma4AudioFeatureExtractor().to_json_string())  # at its defaults (the releases')
    keys = ("patch_size", "pooling_kernel_size", "max_soft_tokens")
    finish_image_only_processor(out, image_processor, "Gemma4VideoProcessor", keys, {"feature_extractor": hearing})
    return out


def build_tiny_gemma4_moe(out_dir: str | Path, seed: int = 0) -> Path:
    """`build_tiny_gemma4` with routed experts (26B-A4B's layout)."""
    return build_tiny_gemma4(out_dir, seed, moe=True)
