"""Tiny random Qwen3-VL folders in the official Hugging Face format (stand-ins for tests and the demo): dense, and
the mixture-of-experts variant (`build_tiny_qwen3_vl_moe`: the same model with 4 experts per layer, 2 per token).

The same construction as the tiny Qwen2-VL (`tiny_hf_vlm`): a BPE tokenizer trained offline with Qwen3's added
tokens after the vision ones, Qwen3-VL's layout (a 2-layer, 64-wide Qwen3 text model with q/k norms and
interleaved M-RoPE; a 2-block ViT with 16 px patches, learned position embeddings and a DeepStack merger per
block), the PIL image processor at Qwen3-VL's settings (32 px per merged token, mean/std 0.5) and a chat template
with the layout of Qwen3-VL-Instruct's (no default system turn).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from silkie.dev.tiny_hf_vlm import (
    INIT_STD,
    QWEN2_VL_SPECIAL_TOKENS,
    TEXT_HIDDEN,
    VISION_HIDDEN,
    finish_image_only_processor,
    qwen2_text_and_ids,
    save_tiny_model,
    train_tiny_tokenizer,
)
from silkie.models.hf_vlm.expert_layout import write_release_layout
from silkie.models.hf_vlm.processors import ImageOnlyQwen3VLProcessor, register_image_only_processors

# Qwen3's added tokens after the vision ones, in the official order (151657..151668); ordinary, not special
QWEN3_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip

# Qwen3-VL-Instruct's layout for system / user / assistant turns: a system turn only when one is given, media
# parts as vision spans (numbered with add_vision_id), text parts as they are; tool turns are left out here.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}<|im_start|>system\n{% if messages[0].content is string %}"
    "{{ messages[0].content }}{% else %}{% for part in messages[0].content %}{% if 'text' in part %}{{ part.text }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'assistant' %}"
    "<|im_start|>{{ message.role }}\n{% if message.content is string %}{{ message.content }}{% else %}"
    "{% for part in message.content %}{% if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif part.type == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in part %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN3_VL_PATCH = 16  # 32 px per merged image token
QWEN3_VL_MIN_PIXELS = 64 * 64  # 4 merged tokens at least
QWEN3_VL_MAX_PIXELS = 128 * 128  # 16 merged tokens at most
# Qwen3-VL-30B-A3B's layout at a tiny size: every decoder layer a sparse MoE block (128 experts, 8 per token there)
QWEN3_VL_MOE_TEXT = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[]
)  # 2 x 16 != 64 wide: on load transformers tells the release's expert layout from its own by shape


QWEN3_VL_VISION = dict(  # the 2-block, 32-wide ViT (Qwen3.5's tower too, without DeepStack)
    depth=2,
    hidden_size=VISION_HIDDEN,
    intermediate_size=2 * VISION_HIDDEN,
    num_heads=2,
    out_hidden_size=TEXT_HIDDEN,
    patch_size=QWEN3_VL_PATCH,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,  # an 8x8 learned grid, resampled to each image's grid
    initializer_range=INIT_STD,
)


def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer with Qwen2-VL's special tokens and Qwen3's added ones after them."""
    tokenizer = train_tiny_tokenizer(style="qwen2", special_tokens=QWEN2_VL_SPECIAL_TOKENS)
    tokenizer.add_tokens(list(QWEN3_ADDED_TOKENS))
    return tokenizer


def save_qwen3_vl_processor(out: Path, tokenizer: PreTrainedTokenizerFast, chat_template: str) -> None:
    """Save Qwen3-VL's processor (the PIL image processor at its settings: 32 px per merged token, mean/std 0.5) with
    `tokenizer` and `chat_template` in `out`, loadable as the official one where torchvision is."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN3_VL_MIN_PIXELS,
        max_pixels=QWEN3_VL_MAX_PIXELS,
        patch_size=QWEN3_VL_PATCH,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=chat_template).save_pretrained(out)
    finish_image_only_processor(out, image_processor, video_type="Qwen3VLVideoProcessor")
    register_image_only_processors()


def tiny_qwen3_vl_config(tokenizer: PreTrainedTokenizerFast, moe: bool = False) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """Qwen3-VL with a 2-layer, 64-wide text model (head 16, interleaved M-RoPE; with `moe` each layer's MLP is 4
    experts, 2 per token) and a 2-block, 32-wide ViT whose blocks both feed DeepStack features to the decoder's
    first two layers; token ids from `tokenizer`."""
    text, special = qwen2_text_and_ids(tokenizer)
    text |= dict(
        head_dim=16,
        rope_parameters={
            "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True
        },
    )  # fmt: skip
    if moe:
        text |= QWEN3_VL_MOE_TEXT
    vision = {**QWEN3_VL_VISION, "deepstack_visual_indexes": [0, 1]}
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, **special)


def build_tiny_qwen3_vl(out_dir: str | Path, seed: int = 0, moe: bool = False) -> Path:
    """Write a tiny random Qwen3-VL folder (`moe`: Qwen3-VL MoE): model, tokenizer, PIL image processor, chat
    template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen3_tokenizer()
    config = tiny_qwen3_vl_config(tokenizer, moe)
    eos = [config.text_config.eos_token_id, config.text_config.bos_token_id]  # <|im_end|>, <|endoftext|>
    model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    save_tiny_model(model_class, config, out, seed, eos)
    if moe:  # the experts as the releases store them
        write_release_layout(out)
    save_qwen3_vl_processor(out, tokenizer, QWEN3_VL_CHAT_TEMPLATE)
    return out


def build_tiny_qwen3_vl_moe(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-VL MoE folder (`build_tiny_qwen3_vl` with `moe`)."""
    return build_tiny_qwen3_vl(out_dir, seed, moe=True)
