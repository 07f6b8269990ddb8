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


def load_base_model(section: ModelSection) -> QWenLMHeadModel:
    """The checkpoint in the recipe's dtype and attention implementation."""
    return QWenLMHeadModel.from_pretrained(
        section.path, dtype=resolve_dtype(section.dtype), attn_implementation=section.attn_implementation
    )


def lora_target_regex(lora: LoraSection) -> str:
    """peft `target_modules` regex: the LLM modules named in the recipe, plus the vision blocks if asked."""
    llm = "|".join(re.escape(t) for t in lora.target_modules)
    pattern = rf"transformer\.h\.\d+\.(?:.*\.)?(?:{llm})"
    if lora.vision:
        vision = "|".join(re.escape(t) for t in VISION_LORA_TARGETS)
        pattern += rf"|transformer\.visual\.transformer\.resblocks\.\d+\.(?:{vision})"
    return pattern


def freeze_vision(model: nn.Module) -> None:
    """Freeze the vision tower and resampler (the Silkie default)."""
    for param in model.transformer.visual.parameters():
        param.requires_grad_(False)


def apply_lora(model: QWenLMHeadModel, lora: LoraSection) -> nn.Module:
    """Wrap with peft LoRA adapters (frozen base); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    if lora.load_in_4bit:
        raise ValueError(
            "lora.load_in_4bit: 4-bit QLoRA needs bitsandbytes and a CUDA GPU"
            + ("" if torch.cuda.is_available() else " (no GPU here)")
            + "; it is not supported by the native Qwen-VL model in this version, set it to false"
        )
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
    model = load_base_model(model_section)
    if lora.enabled:
        return apply_lora(model, lora)
    if not lora.vision:
        freeze_vision(model)
    return model


def build_frozen_reference(model_section: ModelSection) -> QWenLMHeadModel:
    """A separate frozen copy of the base model (reference for full fine-tuning)."""
    model = load_base_model(model_section).eval()
    model.requires_grad_(False)
    return model
