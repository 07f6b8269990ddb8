"""The recipe's model section (a typed dataclass, help text and reader on every key, its own value checks; the data's
keys are in `data_section`, LoRA's in `lora_section`, DPO's in `dpo_section`, the run's placement in `cluster`).
Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checks import choice, key, require
from .names import (
    BIDIRECTIONAL_IMAGE_FAMILIES,
    FAMILIES,
    NO_FP16_FAMILIES,
    NO_LIGER_FAMILIES,
    QWEN_HF_FAMILIES,
    SOFT_TOKEN_BUDGETS,
    SOFT_TOKEN_FAMILIES,
    TILED_FAMILIES,
)

# apply_chat_template's own arguments, which the codec sets (not template variables)
RENDER_ARGUMENTS = (
    "conversation", "messages", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "return_tensors", "processor_kwargs",
)  # fmt: skip


@dataclass
class ModelSection:
    """Which checkpoint to train and how to load it."""

    path: str = key(
        "",
        "Checkpoint folder: `config.json`, weights and tokenizer files (`qwen.tiktoken` or the processor's).",
        "models.loading:local_checkpoint models.qwen_vl.family:QwenVLFamily.load_model",
    )
    family: str = key(
        "qwen_vl",
        "Model family: `qwen_vl` (Qwen-VL-Chat, native), `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `qwen3_vl_moe`, "
        "`llava`, `internvl`, `gemma3`, `gemma4`, `qwen3_5`, `qwen3_5_moe` (transformers); left out, read from the "
        "local checkpoint's config.json (`model_type`), else qwen_vl.",
        "models.family:get_family",
    )
    ref_model: str | None = key(
        None,
        "Another checkpoint (folder or hub id) as the frozen reference, TRL's, LLaMA-Factory's and ms-swift's "
        "`ref_model`: e.g. the SFT model when model.path is a later checkpoint. Same family and tokenizer as "
        "model.path; it is kept beside the policy (its memory), also under LoRA. null: model.path itself (under "
        "LoRA its adapters switched off; a frozen copy for full fine-tuning).",
        "train.build:_policy_and_reference",
    )
    dtype: str = key(
        "auto",
        "Weights/compute dtype: `auto` (bf16 on GPUs that support it, else fp32), `bf16`, `fp16`, `fp32`.",
        "models.loading:load_base_model",
    )
    attn_implementation: str = key(
        "sdpa",
        "Attention kernel: `sdpa` (default), `eager` (reference), `flex_attention` (qwen_vl: block mask), `varlen` "
        "(padding-free flash attention over the packed rows, CUDA; SDPA per sequence on CPU).",
        "models.qwen_vl.family:QwenVLFamily.load_model",
    )
    chat_template_kwargs: dict[str, str | bool | int | float | None] | None = key(
        None,
        "Transformers families: keyword arguments of the checkpoint's chat template for every pair, prompt and "
        "generation (TRL's per-row `chat_template_kwargs`), e.g. `{enable_thinking: false}` for Qwen3.5: the "
        "generation prompt then closes an empty `<think>` block and each answer is its text alone. null: the "
        "template's defaults.",
        "models.hf_vlm.codec:ChatTemplateCodec",
    )
    fp32_norm_rope: bool = key(
        True,
        "qwen_vl: RMSNorm and rotary embedding in fp32, as the original; false: in the model's dtype (fewer "
        "up-cast copies; the bf16 logit difference is in docs/benchmarks.md).",
        "models.kernels:apply_kernels",
    )
    liger_kernels: bool = key(
        False,
        "Fused Triton kernels from liger-kernel (RMSNorm, SwiGLU, rotary) in the language model; needs a CUDA GPU "
        "and `pip install -e '.[gpu]'`.",
        "models.kernels:apply_kernels",
    )
    compile_blocks: bool = key(
        False,
        "Regional compilation: torch.compile each decoder block (identical blocks share one graph); the first "
        "steps pay the compile time.",
        "models.kernels:apply_kernels",
    )
    min_pixels: int | None = key(
        None,
        "Qwen2-VL families: fewest pixels per image after resizing (null: the processor's setting).",
        "models.hf_vlm.codec:load_processor",
    )
    max_pixels: int | None = key(
        None,
        "Qwen2-VL families: most pixels per image after resizing; bounds image tokens.",
        "models.hf_vlm.codec:load_processor",
    )
    max_tiles: int | None = key(
        None,
        "internvl: most tiles an image is cut into at the processor's tile size (448 px; its `max_patches`, a "
        "thumbnail tile added when an image takes several); bounds image tokens (256 per tile). null: the "
        "checkpoint's (12).",
        "models.hf_vlm.codec:load_processor",
    )
    max_image_tokens: int | None = key(
        None,
        "gemma4: most soft tokens per image, one of 70, 140, 280, 560, 1120 (the processor's `max_soft_tokens`: each "
        "picture is resized at its aspect ratio to fill 9 patches per token); bounds image tokens. null: the "
        "checkpoint's (280).",
        "models.hf_vlm.codec:load_processor",
    )
    video_min_pixels: int | None = key(
        None,
        "The Qwen2-VL / 2.5-VL / 3-VL families (InternVL's frames are one tile each): fewest pixels per video frame "
        "after resizing (null: the checkpoint's "
        "video_preprocessor_config.json, else 128 x (patch x merge)^2 as qwen-vl-utils; Qwen3-VL's config records a "
        "floor over the whole clip).",
        "models.hf_vlm.video:Qwen2VLVideos.frame_bounds",
    )
    video_max_pixels: int | None = key(
        None,
        "The Qwen2-VL / 2.5-VL / 3-VL families: most pixels per video frame after resizing (null: the checkpoint's "
        "video config, else 768 x (patch x merge)^2; Qwen3-VL's records a clip's budget, each frame at most 768 tokens "
        "of it); with `data.video_max_frames` it bounds a video's tokens.",
        "models.hf_vlm.video:Qwen2VLVideos.frame_bounds",
    )

    def check(self) -> None:
        require(bool(self.path), "model.path", self.path, "a checkpoint folder (config.json, weights, tokenizer)")
        require(
            self.ref_model is None or (isinstance(self.ref_model, str) and bool(self.ref_model.strip())),
            "model.ref_model",
            self.ref_model,
            "a checkpoint folder or hub id, or null (the reference is model.path)",
        )
        choice("model.family", self.family, FAMILIES)
        choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        require(
            self.family not in NO_FP16_FAMILIES or self.dtype != "fp16",
            "model.dtype",
            self.dtype,
            f"auto, bf16 or fp32 for family {self.family} (its activations overflow fp16: infinite, then NaN losses)",
        )
        choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flex_attention", "varlen"))
        require(
            self.family == "qwen_vl" or self.attn_implementation != "flex_attention",
            "model.attn_implementation",
            self.attn_implementation,
            f"sdpa, eager or varlen for family {self.family} (flex_attention is implemented for qwen_vl)",
        )
        require(
            self.family not in BIDIRECTIONAL_IMAGE_FAMILIES or self.attn_implementation != "varlen",
            "model.attn_implementation",
            self.attn_implementation,
            f"sdpa or eager for family {self.family} (its image tokens attend each other both ways; varlen's flash "
            "kernel is causal only)",
        )
        require(
            self.family not in NO_LIGER_FAMILIES or not self.liger_kernels,
            "model.liger_kernels",
            self.liger_kernels,
            f"false for family {self.family} (liger-kernel has no patch for its layers)",
        )
        require(
            self.family == "qwen_vl" or self.fp32_norm_rope,
            "model.fp32_norm_rope",
            self.fp32_norm_rope,
            f"true for family {self.family} (its norms follow transformers; the switch is for qwen_vl)",
        )
        for name in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"model.{name}", value, "null or an integer >= 1")
            video = name.startswith("video")  # InternVL's frames are one tile each: no pixel bounds
            require(
                value is None or self.family in QWEN_HF_FAMILIES,
                f"model.{name}",
                value,
                f"null: only {'/'.join(QWEN_HF_FAMILIES)} take {'video frame' if video else 'per-image'} pixel bounds",
            )
        self._check_chat_template_kwargs()
        require(self.max_tiles is None or self.max_tiles >= 1, "model.max_tiles", self.max_tiles, "null or >= 1")
        require(
            self.max_tiles is None or self.family in TILED_FAMILIES,
            "model.max_tiles",
            self.max_tiles,
            f"null: only {'/'.join(TILED_FAMILIES)} cut images into tiles",
        )
        require(
            self.max_image_tokens is None or self.max_image_tokens in SOFT_TOKEN_BUDGETS,
            "model.max_image_tokens",
            self.max_image_tokens,
            f"null or one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}",
        )
        require(
            self.max_image_tokens is None or self.family in SOFT_TOKEN_FAMILIES,
            "model.max_image_tokens",
            self.max_image_tokens,
            f"null: only {'/'.join(SOFT_TOKEN_FAMILIES)} size images by a soft-token budget",
        )
        for low, high in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
            bottom, top = getattr(self, low), getattr(self, high)
            if bottom is not None and top is not None:
                require(bottom <= top, f"model.{low}", bottom, f"<= model.{high}")

    def _check_chat_template_kwargs(self) -> None:
        check_chat_template_kwargs(self.chat_template_kwargs, "model.chat_template_kwargs")
        require(
            self.chat_template_kwargs is None or self.family != "qwen_vl",
            "model.chat_template_kwargs",
            self.chat_template_kwargs,
            "null for family qwen_vl (its prompt format is the original's, not a chat template)",
        )


def check_chat_template_kwargs(kwargs: Any, where: str) -> None:
    """One-line `RecipeError` unless `kwargs` (at `where`) is null or a mapping of the chat template's own variables
    to scalar values (apply_chat_template's arguments refused; an `enable_*` switch true or false)."""
    if kwargs is None:
        return
    require(
        isinstance(kwargs, dict) and all(isinstance(name, str) and name.isidentifier() for name in kwargs),
        where,
        kwargs,
        "a mapping of the template's variable names to values, e.g. {enable_thinking: false}",
    )
    for name, value in kwargs.items():
        require(
            name not in RENDER_ARGUMENTS,
            f"{where}.{name}",
            value,
            "left out: Silkie sets it when it renders a prompt (only the template's own variables go here)",
        )
        require(
            value is None or isinstance(value, (str, bool, int, float)),
            f"{where}.{name}",
            value,
            "a string, number, true/false or null",
        )
        require(  # `no` in a YAML file is the string 'no', which a template's `is false` test does not take
            not name.startswith("enable_") or isinstance(value, bool),
            f"{where}.{name}",
            value,
            "true or false (a switch)",
        )
