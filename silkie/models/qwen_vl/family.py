"""Qwen-VL-Chat (native implementation) behind the `ModelFamily` interface."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from silkie.models.family import ModelFamily, PairTextError
from silkie.models.media import Turns, as_keys, as_turns, media_segments, turn_media, user_texts

from ..varlen import constructible
from .image_processing import QWenVLImageProcessor
from .modeling import QWenLMHeadModel
from .tokenization import IMG_END, IMG_START, QWenTokenizer

VISION_LORA_TARGETS = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
RESAMPLER_PARTS = ("attn_pool", "ln_post", "proj")


def format_query(prompt: str, images: Any = (), videos: Any = (), first: int = 1) -> str:
    """The user turn as the original's `from_list_format` writes it: `Picture k: <img>KEY</img>\\n` per image (at
    the prompt's `<image>` markers, else first; k counts from `first`) and the text, stripped as the Silkie
    repository's `qwen_vl_prompt_format` does; `PairTextError` for a video (`video_unsupported`)."""
    if as_keys(videos):
        raise PairTextError("video_unsupported", "Qwen-VL-Chat takes images, not video")
    parts: list[str] = []
    number = first - 1
    for segment in media_segments(prompt.strip(), images):
        if segment.kind == "image":
            number += 1
            parts.append(f"Picture {number}: <img>{segment.value}</img>\n")
        elif parts and parts[-1].endswith("</img>\n") and segment.value.startswith("\n"):
            parts.append(segment.value[1:])  # `<image>\nQ` places the picture's own newline once
        else:
            parts.append(segment.value)
    return "".join(parts)


def format_turns(texts: list[str], images: Any = (), videos: Any = ()) -> list[str]:
    """Each user turn of a conversation as `format_query` writes it, its pictures placed by `turn_media` and numbered
    on from the earlier turns' (as Qwen-VL-Chat's chat data and web demo number them)."""
    queries, first = [], 1
    for text, (keys, clips) in zip(texts, turn_media(texts, images, videos)):
        queries.append(format_query(text, keys, clips, first=first))
        first += len(keys)
    return queries


class QwenVLCodec:
    """Prompt = `build_chat_context(format_query(prompt, images))`, answer = `encode_answer` (+<|im_end|>)."""

    image_token_budget = 0  # the 256 image slots are already in the prompt ids
    video_marker_id = None
    template_markers = ("<|im_start|>", "<|im_end|>")  # chatml's (its encoder keeps them as text in a query)

    def __init__(self, tokenizer: QWenTokenizer):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.image_marker_id = tokenizer.img_start_id

    def prompt_ids(
        self, prompt: str, images: Any = (), videos: Any = (), system: str | None = None, history: Turns = ()
    ) -> list[int]:
        """Chat context with the system prompt (`system`, else Qwen-VL-Chat's "You are a helpful assistant.") and
        the earlier turns (`history`, all kept: `max_length` bounds a training prompt, not the original's window);
        `PairTextError` for an image tag in a text (`image_tag_in_text`), an image key over the tokenizer's limit
        (`bad_image_key`), markers that do not match the images (`image_marker_mismatch`) or a video
        (`video_unsupported`)."""
        history = as_turns(history)
        *earlier, query = format_turns(user_texts(prompt, history), images, videos)
        turns = list(zip(earlier, (answer for _, answer in history)))
        options = {"system": system} if system is not None else {}
        try:
            ids = self.tokenizer.build_chat_context(query, turns, max_window_size=sys.maxsize, **options)
        except ValueError as err:  # an unclosed <img> in the text, or a key over 254 bytes
            texts = [*user_texts(prompt, history), *(answer for _, answer in history), system or ""]
            refused = any(self._refuses(text) for text in texts)
            raise PairTextError("image_tag_in_text" if refused else "bad_image_key", str(err)) from err
        return self._no_stray_tags(ids, len(as_keys(images)))

    def video_token_budget(self, max_frames: int) -> int:
        """Qwen-VL-Chat takes no video."""
        return 0

    def answer_ids(self, text: str) -> list[int]:
        """Answer tokens + `<|im_end|>`; `PairTextError` for an image tag in the text."""
        try:
            ids = self.tokenizer.encode_answer(text)
        except ValueError as err:  # an unclosed <img>
            raise PairTextError("image_tag_in_text", str(err)) from err
        return self._no_stray_tags(ids, 0)

    def _refuses(self, prompt: str) -> bool:
        try:
            self.tokenizer.build_chat_context(prompt)
        except ValueError:
            return True
        return False

    def _no_stray_tags(self, ids: list[int], images: int) -> list[int]:
        tok = self.tokenizer
        if ids.count(tok.img_start_id) != images or ids.count(tok.img_end_id) != images:
            raise PairTextError("image_tag_in_text", f"the text holds an image tag ({IMG_START} or {IMG_END})")
        return ids

    def fingerprint(self) -> str:
        """Hash of the tokenizer class and its `qwen.tiktoken` ranks."""
        digest = hashlib.sha256(type(self.tokenizer).__qualname__.encode())
        vocab_file = getattr(self.tokenizer, "vocab_file", None)
        if vocab_file and Path(vocab_file).is_file():
            digest.update(Path(vocab_file).read_bytes())
        else:
            for token, rank in sorted(self.tokenizer.mergeable_ranks.items(), key=lambda item: item[1]):
                digest.update(token + rank.to_bytes(4, "little"))
        return digest.hexdigest()

    def save_pretrained(self, directory: str) -> Any:
        """Write `qwen.tiktoken` + tokenizer config."""
        return self.tokenizer.save_pretrained(directory)


class QwenVLFamily(ModelFamily):
    """Qwen-VL-Chat: fixed 448px images, 256 resampler queries per image, 1-D rotary positions."""

    default_lora_targets = ("c_attn", "attn.c_proj", "w1", "w2")

    def load_model(self, section: Any, dtype: torch.dtype, quantization_config: Any = None) -> nn.Module:
        self.check_folder(section.path)
        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        attn = section.attn_implementation
        model = QWenLMHeadModel.from_pretrained(
            section.path, dtype=dtype, attn_implementation=constructible(attn), **extra
        )
        model.config._attn_implementation = attn
        return model

    def load_codec(self, section: Any, files: str | None = None) -> QwenVLCodec:
        if files is None:
            self.check_folder(section.path)
        return QwenVLCodec(QWenTokenizer.from_pretrained(files or section.path))

    def image_processor(self, model_config: Any, section: Any) -> QWenVLImageProcessor:
        return QWenVLImageProcessor(model_config.visual["image_size"])

    def lora_target_regex(self, lora: Any) -> str:
        llm = "|".join(re.escape(t) for t in (lora.target_modules or self.default_lora_targets))
        pattern = rf"transformer\.h\.\d+\.(?:.*\.)?(?:{llm})"
        if lora.vision:
            vision = "|".join(re.escape(t) for t in VISION_LORA_TARGETS)
            pattern += rf"|transformer\.visual\.transformer\.resblocks\.\d+\.(?:{vision})"
        return pattern

    def freeze_vision(self, model: nn.Module, keep_projector: bool = False) -> None:
        for name, param in model.transformer.visual.named_parameters():
            trainable = keep_projector and name.split(".")[0] in RESAMPLER_PARTS and name != "attn_pool.pos_embed"
            param.requires_grad_(trainable)

    def prepare_for_training(self, model: nn.Module) -> None:
        # inference-only long-context rules of the original (dynamic NTK, log-n): off for training and its eval,
        # so packed rows and the plain path always score with the same rotary base
        model.config.use_dynamic_ntk = model.config.use_logn_attn = False

    def quantization_skip_modules(self) -> list[str]:
        return ["lm_head", "visual"]

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, QWenLMHeadModel)

    def vision_module(self, base: nn.Module) -> nn.Module:
        return base.transformer.visual

    def decoder_layers(self, base: nn.Module) -> nn.ModuleList:
        return base.transformer.h

    def encode_images(self, base: nn.Module, batch: dict) -> torch.Tensor | None:
        pixel_values = batch.get("pixel_values")
        if pixel_values is None or pixel_values.numel() == 0:
            return None
        return base.encode_images(pixel_values)

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        size = base.config.visual["image_size"]
        weight = base.transformer.visual.conv1.weight
        return base.encode_images(torch.zeros(1, 3, size, size, device=weight.device, dtype=torch.float32))

    def row_image_kwargs(
        self, base: nn.Module, batch: dict, order: torch.Tensor, features: Any, video_order: torch.Tensor | None = None
    ) -> dict:
        if features is not None:
            return {"image_features": features.index_select(0, order)}
        return {"pixel_values": batch["pixel_values"].to(order.device).index_select(0, order)}

    def hidden_states(self, model: nn.Module, base: nn.Module, kwargs: dict) -> torch.Tensor:
        return model(**kwargs, return_hidden_states_only=True).hidden_states[-1]
