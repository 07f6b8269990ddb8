"""Tiny random Qwen3.5 folders in the official Hugging Face format (stand-ins for tests and the demo): dense, and the
mixture-of-experts variant (`build_tiny_qwen3_5_moe`: 4 experts per layer, 2 per token, and a shared expert).

The tiny Qwen3-VL's tokenizer, processor and tower (without DeepStack), and Qwen3.5's hybrid language model at a
tiny size: a gated full-attention layer (4 heads of 32, a quarter of each rotated, interleaved M-RoPE), then a
linear-attention layer (gated DeltaNet: 2 key heads and 4 value heads of 16, a width-4 causal convolution). The
releases start with three linear-attention layers; in the stand-in's order (two layers, linear first) its random
weights never learn to read the demo's pictures (held-out accuracy 0.30: it learns the answer texts alone). The
chat template has the layout of Qwen3.5's for system, user and assistant turns: a system turn only when one is
given, the generation prompt opening a `<think>` block, the last answer rendered after an empty one.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    PreTrainedTokenizerFast,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)

from silkie.dev.tiny_hf_vlm import qwen2_text_and_ids, save_tiny_model
from silkie.dev.tiny_qwen3_vl import QWEN3_VL_MOE_TEXT, QWEN3_VL_VISION, qwen3_tokenizer, save_qwen3_vl_processor

# Qwen3.5's layout for system / user / assistant turns (tool turns left out): texts trimmed; an assistant turn after
# the last user turn carries its reasoning in a <think> block (empty without one), earlier ones only their answer;
# the generation prompt opens the block (closes it empty with enable_thinking=false)
QWEN3_5_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content, do_vision_count) %}{%- if content is string %}{{- content }}"
    "{%- elif content is iterable and content is not mapping %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'video' in item or item.type == 'video' %}"
    "{%- if do_vision_count %}{%- set video_count.value = video_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    "{%- if messages[0].role == 'system' %}{%- set content = render_content(messages[0].content, false)|trim %}"
    "{{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = render_content(message.content, true)|trim %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- set reasoning_content = reasoning_content|trim %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)
# Qwen3.5-35B-A3B's layout at a tiny size: every layer's MLP routed experts plus a shared expert (256 + 1 there)
QWEN3_5_MOE_TEXT = {**QWEN3_VL_MOE_TEXT, "shared_expert_intermediate_size": 16}


def tiny_qwen3_5_config(tokenizer: PreTrainedTokenizerFast, moe: bool = False) -> Qwen3_5Config | Qwen3_5MoeConfig:
    """Qwen3.5 with a 2-layer, 64-wide hybrid text model (gated attention, then linear attention; with `moe` each
    layer's MLP is 4 experts, 2 per token, and a shared expert) and a 2-block, 32-wide ViT; ids from `tokenizer`."""
    text, special = qwen2_text_and_ids(tokenizer)
    text |= dict(
        head_dim=32,
        layer_types=["full_attention", "linear_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        rope_parameters={
            "rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1], "mrope_interleaved": True,
        },
    )  # fmt: skip
    if moe:
        text = {key: value for key, value in text.items() if key != "intermediate_size"} | QWEN3_5_MOE_TEXT
        text = {key: value for key, value in text.items() if key not in ("decoder_sparse_step", "mlp_only_layers")}
    config_class = Qwen3_5MoeConfig if moe else Qwen3_5Config
    return config_class(text_config=text, vision_config=dict(QWEN3_VL_VISION), tie_word_embeddings=False, **special)


def build_tiny_qwen3_5(out_dir: str | Path, seed: int = 0, moe: bool = False) -> Path:
    """Write a tiny random Qwen3.5 folder (`moe`: Qwen3.5 MoE): model, tokenizer, PIL image processor, template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen3_tokenizer()
    config = tiny_qwen3_5_config(tokenizer, moe)
    eos = [config.text_config.eos_token_id, config.text_config.bos_token_id]  # <|im_end|>, <|endoftext|>
    model_class = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    save_tiny_model(model_class, config, out, seed, eos)
    save_qwen3_vl_processor(out, tokenizer, QWEN3_5_CHAT_TEMPLATE)  # Qwen3.5's processor is Qwen3-VL's
    return out


def build_tiny_qwen3_5_moe(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen3.5 MoE folder (`build_tiny_qwen3_5` with `moe`)."""
    return build_tiny_qwen3_5(out_dir, seed, moe=True)
