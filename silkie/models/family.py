"""The model-family seam: everything that differs between VLM families lives behind `ModelFamily`.

A family knows how to load its checkpoint and text codec, which modules LoRA targets, how images become
tensors (and how many placeholder tokens each one takes), how image features are computed and injected,
and which position ids its rows need. The data pipeline, the DPO step and the trainer only call this
interface; they never branch on model names. Families: `qwen_vl` (native Qwen-VL-Chat), `qwen2_vl` /
`qwen2_5_vl`, `qwen3_vl`, `qwen3_vl_moe`, `llava`, `internvl`, `gemma3`, `gemma4`, `qwen3_5` and `qwen3_5_moe`
(transformers-native, `AutoModelForImageTextToText`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from silkie.config.checkpoint import checkpoint_problem
from silkie.config.names import FAMILY_TABLE
from silkie.errors import InputError

FAMILY_CLASSES = {name: implementation for name, (implementation, _) in FAMILY_TABLE.items()}


class PairTextError(ValueError):
    """Pair text a codec cannot encode; `reason` names the drop reason the data report counts it under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class PairCodec(Protocol):
    """Text side of a family: prompt/answer token ids for preference pairs."""

    pad_token_id: int
    image_marker_id: int  # the token that marks an image in a prompt (exactly one per image at tokenization)
    image_token_budget: int  # most tokens an image adds to its marker when the collator expands it
    video_marker_id: int | None  # the token that marks a video (one per video); None: the family takes no video
    template_markers: tuple[str, ...]  # the chat template's own tokens: text holding one was templated already

    def prompt_ids(
        self, prompt: str, images: Any = (), videos: Any = (), system: str | None = None, history: Any = ()
    ) -> list[int]:
        """Chat-formatted system turn (`system`, else the template's default) + earlier turns (`history`: (user,
        assistant) texts, oldest first) + user turn (media placed by `silkie.models.media.turn_media`) + assistant
        header; `PairTextError` for what it cannot encode (a media tag in a text, a video it does not take, a
        system message its template leaves out)."""

    def video_token_budget(self, max_frames: int) -> int:
        """Most tokens a video of at most `max_frames` sampled frames adds to its marker (0: no video)."""

    def answer_ids(self, text: str) -> list[int]:
        """The assistant's answer, ending with the family's end-of-turn token(s)."""

    def fingerprint(self) -> str:
        """Hash of everything that decides the ids (vocabulary, template): keys the tokenization cache."""

    def save_pretrained(self, directory: str) -> Any:
        """Write the tokenizer/processor files next to a saved adapter."""


@dataclass
class ImageBatch:
    """A batch's images (and videos) as model tensors, plus per image / video the placeholder tokens it fills."""

    tensors: dict[str, torch.Tensor]
    tokens_per_image: list[int] | None = None  # None: prompts already hold every image token (qwen_vl)
    marker_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tokens_per_video: list[int | list[int]] | None = None  # a count, or the ids that replace the marker (Qwen3-VL)
    video_marker_id: int | None = None
    # one placeholder id for images and video frames (InternVL): the model fills them in prompt order, so the
    # collator records each pair's media kinds in that order (`media_kinds`: 0 image, 1 video, -1 pads)
    media_in_prompt_order: bool = False


@dataclass
class VideoClip:
    """A video's sampled frames (RGB, one size), the rate they were sampled at (frames per second) and, when known,
    each frame's time in the source video (seconds; Qwen3-VL writes them into the prompt)."""

    frames: list[Any]
    fps: float
    times: tuple[float, ...] = ()

    def frame_times(self) -> list[float]:
        """Each frame's time in seconds (from the sampling rate when the source times are not known)."""
        return list(self.times) if self.times else [index / self.fps for index in range(len(self.frames))]


class ModelFamily:
    """Per-family behaviour. Subclasses implement every method; see `QwenVLFamily` and `HFVisionFamily`."""

    name: str = ""
    default_lora_targets: tuple[str, ...] = ()
    video_frame_spread = "arange"  # how its video processor spreads sampled frames (`VideoSampling.spread`)
    model_types: tuple[str, ...] = ()  # config.json `model_type` of this family's checkpoints (from FAMILY_TABLE)

    # ----- loading ------------------------------------------------------------------------------------------------
    def check_folder(self, path: str) -> None:
        """One-line error when `path` is not a checkpoint folder of this family (before it is parsed)."""
        problem = checkpoint_problem(path, self.name)
        if problem:
            raise InputError(problem)

    def load_model(self, section: Any, dtype: torch.dtype, quantization_config: Any = None) -> nn.Module:
        """The checkpoint in `dtype` with the recipe's attention implementation."""
        raise NotImplementedError

    def load_codec(self, section: Any, files: str | None = None) -> PairCodec:
        """The text codec for the checkpoint in `section.path` (tokenizer files from `files` when given)."""
        raise NotImplementedError

    def image_processor(self, model_config: Any, section: Any) -> Any:
        """Callable `(images, videos=())` -> `ImageBatch` (or a `pixel_values` tensor) used by the collator: PIL
        images and `VideoClip`s, each kind in batch order; with `fingerprint()` (settings that decide pixels and
        token counts) and optionally `check(image)` (why the processor would fail on an image, or None)."""
        raise NotImplementedError

    def lora_target_regex(self, lora: Any) -> str:
        """peft `target_modules` regex for the language model (+ the vision blocks when `lora.vision`)."""
        raise NotImplementedError

    def freeze_vision(self, model: nn.Module, keep_projector: bool = False) -> None:
        """Freeze the vision tower; `keep_projector` leaves the vision->LLM projector trainable."""
        raise NotImplementedError

    def prepare_for_training(self, model: nn.Module) -> None:
        """Switch off inference-only behaviour that training and its evaluation must not use."""

    def finish_saved_folder(self, folder: str) -> None:
        """Rewrite a checkpoint folder just written by transformers' `save_pretrained` where its layout differs from
        the released checkpoints' (Qwen3-VL MoE's experts); most families need nothing."""

    def quantization_skip_modules(self) -> list[str]:
        """Modules kept out of 4-bit quantization (QLoRA)."""
        raise NotImplementedError

    # ----- the DPO step -------------------------------------------------------------------------------------------
    def owns(self, module: nn.Module) -> bool:
        """True for this family's unwrapped causal LM (the module that owns `lm_head`)."""
        raise NotImplementedError

    def vision_module(self, base: nn.Module) -> nn.Module:
        """The vision tower (+ projector) of the unwrapped model."""
        raise NotImplementedError

    def decoder_layers(self, base: nn.Module) -> nn.ModuleList:
        """The language model's decoder blocks of the unwrapped model (what regional compilation compiles)."""
        raise NotImplementedError

    def encode_images(self, base: nn.Module, batch: dict) -> Any:
        """Features of the batch's images (and videos) in batch order (called under no_grad), or None."""
        raise NotImplementedError

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        """Run the tower on one blank image (ZeRO-3: every rank must gather the tower each step)."""
        raise NotImplementedError

    def row_image_kwargs(
        self, base: nn.Module, batch: dict, order: torch.Tensor, features: Any, video_order: torch.Tensor | None = None
    ) -> dict:
        """Forward kwargs carrying the images of `order` (and videos of `video_order`: index into the batch's
        images / videos for each span of the rows, row-major), from features or pixels."""
        raise NotImplementedError

    def prompt_positions(self, base: nn.Module, batch: dict) -> torch.Tensor | None:
        """Multi-axis prompt position ids [D, B, Lp] (M-RoPE), or None for plain 1-D positions."""
        return None

    def row_kwargs(self, base: nn.Module, input_ids: torch.Tensor) -> dict:
        """Extra per-row forward kwargs (e.g. modality token types)."""
        return self.token_kwargs(base.config, input_ids)

    def token_kwargs(self, model_config: Any, input_ids: torch.Tensor) -> dict:
        """Per-token forward kwargs read from the ids (e.g. modality token types); also what `generate` takes."""
        return {}

    def attention_masks(
        self,
        base: nn.Module,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict:
        """The attention mask the language model takes for rows whose `mask` is the padding mask [R, L] or the
        packed rows' block mask [R, 1, L, L] (`segments`: their tokens' pair and segment, [R, L] each on the host, see
        `ScoredRows`): `mask` itself for most families; a model with several kinds of layer takes one mask per
        kind, built from the block mask, the ids and the position ids (Gemma 3), or from the segments (Qwen3.5's
        linear-attention layers)."""
        return mask

    # ----- mixture of experts (none: a dense language model) ------------------------------------------------------
    def routers(self, base: nn.Module) -> list[nn.Module]:
        """The language model's expert routers, in layer order; each one's forward returns its router logits
        [tokens, experts] first (for the load-balancing loss). Empty for a dense model."""
        return []

    def router_aux_loss_coef(self, base: nn.Module) -> float | None:
        """The checkpoint's own weight of the load-balancing loss (config `router_aux_loss_coef`); None: dense."""
        return None

    def router_top_k(self, base: nn.Module) -> int:
        """How many experts each token is routed to."""
        raise NotImplementedError

    def uses_varlen(self, base: nn.Module) -> bool:
        """Whether the unwrapped model's language model runs `varlen` attention (packed rows as sequences)."""
        return getattr(base.config, "_attn_implementation", None) == "varlen"

    def varlen_kwargs(self, layout: Any, mask: Callable[[], torch.Tensor]) -> dict:
        """Forward kwargs that hand the packed rows' `VarlenLayout` (and their dense block mask, `mask()` builds it
        on the device, where the model could need it) to the attention; native: the layout is its mask."""
        return {"attention_mask": layout}

    def hidden_states(self, model: nn.Module, base: nn.Module, kwargs: dict) -> torch.Tensor:
        """Last hidden states [R, L, D] (LoRA active as in `model`), without computing logits."""
        raise NotImplementedError

    def reentrant_checkpointing_problem(self, base: nn.Module) -> str | None:
        """Why reentrant activation checkpointing would give this model wrong gradients, or None (most models)."""
        return None

    def output_head(self, base: nn.Module) -> nn.Module:
        """Hidden states -> logits as the model's own forward computes them: `lm_head` (and, where the model caps its
        logits, the cap), applied to answer positions only by the chunked log-probs."""
        return base.lm_head

    def logits(self, model: nn.Module, kwargs: dict) -> torch.Tensor:
        """Full logits [R, L, V] through the model's own forward (the plain, TRL-equivalent path)."""
        return model(**kwargs).logits


@functools.cache
def get_family(name: str) -> ModelFamily:
    """The family registered under `name` (the recipe's `model.family`)."""
    if name not in FAMILY_CLASSES:
        raise ValueError(f"model.family: unknown family {name!r}; expected one of {sorted(FAMILY_CLASSES)}")
    module_name, class_name = FAMILY_CLASSES[name].split(":")
    family = getattr(importlib.import_module(module_name), class_name)()
    family.name, family.model_types = name, FAMILY_TABLE[name][1]
    return family


def unwrap_causal_lm(model: nn.Module) -> tuple[nn.Module, ModelFamily]:
    """The model under peft/DeepSpeed wrappers that owns `lm_head` (LoRA layers stay inside) and its family."""
    families = [get_family(name) for name in FAMILY_CLASSES]
    while True:
        if hasattr(model, "lm_head"):
            for family in families:
                if family.owns(model):
                    return model, family
        for attr in ("module", "model", "base_model"):  # "model" first: HF's `base_model` skips the LM head
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                break
        else:
            raise TypeError(f"{type(model).__name__} is not a model of a known family under its wrappers")
