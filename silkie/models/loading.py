"""Build the policy (base checkpoint + LoRA, or full fine-tuning), the frozen reference copy and the tokenizer."""

from __future__ import annotations

import re

import torch
from torch import nn

from silkie.config import LoraSection, ModelSection
from silkie.models.qwen_vl import QWenLMHeadModel, QWenTokenizer

VISION_LORA_TARGETS = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` -> bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_tokenizer(section: ModelSection) -> QWenTokenizer:
    """The checkpoint's tokenizer (`qwen.tiktoken` in the model folder)."""
    return QWenTokenizer.from_pretrained(section.path)


def load_base_model(section: ModelSection, load_in_4bit: bool = False) -> QWenLMHeadModel:
    """The checkpoint in the recipe's dtype and attention implementation (LLM linears in 4 bit for QLoRA)."""
    extra = {"quantization_config": qlora_quantization(resolve_dtype(section.dtype))} if load_in_4bit else {}
    return QWenLMHeadModel.from_pretrained(
        section.path, dtype=resolve_dtype(section.dtype), attn_implementation=section.attn_implementation, **extra
    )


def qlora_quantization(compute_dtype: torch.dtype):
    """NF4 4-bit config for the language model's linears (vision tower and LM head stay in `compute_dtype`)."""
    if not torch.cuda.is_available():
        raise ValueError("lora.load_in_4bit: 4-bit QLoRA needs a CUDA GPU (none is visible); set it to false")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError("lora.load_in_4bit: 4-bit QLoRA needs `pip install bitsandbytes`; or set it to false") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["lm_head", "visual"],
    )


def lora_target_regex(lora: LoraSection) -> str:
    """peft `target_modules` regex: the LLM modules named in the recipe, plus the vision blocks if asked."""
    llm = "|".join(re.escape(t) for t in lora.target_modules)
    pattern = rf"transformer\.h\.\d+\.(?:.*\.)?(?:{llm})"
    if lora.vision:
        vision = "|".join(re.escape(t) for t in VISION_LORA_TARGETS)
        pattern += rf"|transformer\.visual\.transformer\.resblocks\.\d+\.(?:{vision})"
    return pattern


RESAMPLER_PARTS = ("attn_pool", "ln_post", "proj")


def freeze_vision(model: nn.Module, keep_resampler: bool = False) -> None:
    """Freeze the vision tower; with `keep_resampler` the resampler (attn_pool, ln_post, proj) stays trainable."""
    for name, param in model.transformer.visual.named_parameters():
        trainable = keep_resampler and name.split(".")[0] in RESAMPLER_PARTS and name != "attn_pool.pos_embed"
        param.requires_grad_(trainable)


def apply_lora(model: QWenLMHeadModel, lora: LoraSection) -> nn.Module:
    """Wrap with peft LoRA adapters (frozen base); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    if lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(lora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if not lora.vision:
        freeze_vision(peft_model.get_base_model())
    return peft_model


def build_policy(model_section: ModelSection, lora: LoraSection) -> nn.Module:
    """Base model plus LoRA (vision frozen unless `lora.vision`), or the whole model for full fine-tuning."""
    if lora.load_in_4bit and not lora.enabled:
        raise ValueError("lora.load_in_4bit needs lora.enabled: true (4-bit weights cannot be fine-tuned directly)")
    model = load_base_model(model_section, load_in_4bit=lora.load_in_4bit)
    if lora.enabled:
        return apply_lora(model, lora)
    if not lora.vision:  # full fine-tuning: LLM + resampler, vision tower frozen (as VL-RLHF)
        freeze_vision(model, keep_resampler=True)
    return model


def build_frozen_reference(model_section: ModelSection) -> QWenLMHeadModel:
    """A separate frozen copy of the base model (reference for full fine-tuning)."""
    model = load_base_model(model_section).eval()
    model.requires_grad_(False)
    return model
