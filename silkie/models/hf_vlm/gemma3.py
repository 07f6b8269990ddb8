"""Gemma 3 (transformers' `Gemma3ForConditionalGeneration`: gemma-3-4b/12b/27b-it, MedGemma 4B / 27B multimodal).

A SigLIP tower at a fixed size (896 px), average-pooled to `mm_tokens_per_image` (256) tokens and projected, and a
Gemma 3 language model with 1-D positions whose layers are of two kinds: sliding-window attention (a window of
`sliding_window` positions) and full attention (5 to 1 in the releases). An image's tokens attend each other both
ways (transformers' `token_type_ids`), so the model takes one attention mask per layer kind. `Gemma3Processor`
writes each image as "\\n\\n<start_of_image>" + its feature tokens + "<end_of_image>\\n\\n" in place of the chat
template's `<start_of_image>`; the blank lines join the text around them into one token, so the codec writes that
text before tokenizing (`ImageSpan`) and the collator expands its one `<image_soft_token>`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from silkie.errors import InputError

from .codec import ImageSpan, load_processor
from .family import LlavaFamily, LlavaImages


class Gemma3Family(LlavaFamily):
    """Gemma 3: LLaVA's fixed-size image path (SigLIP's blocks are named as CLIP's), images of
    `mm_tokens_per_image` tokens attended both ways within an image; a mask per layer kind (sliding window, full)
    for the packed rows."""

    class_names = ("Gemma3ForConditionalGeneration",)

    def image_span(self, processor: Any) -> ImageSpan:
        """`Gemma3Processor.full_image_sequence` with one feature token (the marker the collator expands)."""
        tokenizer = processor.tokenizer
        text = f"\n\n{tokenizer.boi_token}{tokenizer.image_token}{tokenizer.eoi_token}\n\n"
        return ImageSpan(placeholder=processor.boi_token, text=text, marker=tokenizer.image_token)

    def image_token_budget(self, processor: Any, path: str) -> int:
        return int(processor.image_seq_length)

    def image_processor(self, model_config: Any, section: Any) -> Any:
        return Gemma3Images(load_processor(section.path, None, None), model_config, section.path)

    def _features(self, base: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return list(base.model.get_image_features(pixel_values=pixel_values).pooler_output)

    def feature_input(self, picked: list[torch.Tensor]) -> torch.Tensor:
        """Gemma 3's forward takes the features back as one [images, tokens, D] tensor."""
        return torch.stack(picked)

    def token_kwargs(self, model_config: Any, input_ids: torch.Tensor) -> dict:
        """`token_type_ids` as `Gemma3Processor` gives them (1 on image tokens): the model lets an image's tokens
        attend each other both ways where it builds the masks itself (concatenated rows, generation)."""
        return {"token_type_ids": (input_ids == model_config.image_token_id).long()}

    def attention_masks(
        self,
        base: nn.Module,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict:
        """Packed rows' block mask [R, 1, L, L] -> the mask of each layer kind, as transformers composes them for a
        row of its own: full = block mask OR (same image), sliding = full AND (key position > query position -
        window). Positions, not row offsets: an answer after the other answer in the row restarts after the prompt."""
        if mask.dim() != 4:
            return mask
        full = mask | same_image(input_ids, base.config.image_token_id)
        return {"full_attention": full, **sliding_masks(full, position_ids, base.config.get_text_config())}


def same_image(input_ids: torch.Tensor, *token_ids: int) -> torch.Tensor:
    """[R, 1, L, L]: query and key are tokens of one image (a run of the media `token_ids`: Gemma 4's video frames
    too), as transformers' Gemma `get_block_sequence_ids_for_mask` groups them."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    media = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in token_ids:
        media |= input_ids == token_id
    blocks = get_block_sequence_ids_for_mask(media.long())
    return ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))[:, None]


def sliding_masks(mask: torch.Tensor, position_ids: torch.Tensor | None, text: Any) -> dict:
    """{"sliding_attention": `mask` AND (key position > query position - window)} where the language model has
    sliding-window layers, else {}. Positions, not row offsets: an answer after the other answer in a packed row
    restarts after the prompt."""
    if "sliding_attention" not in text.layer_types:
        return {}
    if position_ids is None:  # row offsets would be wrong for every answer after the first in a row
        raise ValueError("packed rows need their position ids for the sliding-window mask")
    near = position_ids[:, None, :] > position_ids[:, :, None] - text.sliding_window  # [R, query, key]
    return {"sliding_attention": mask & near[:, None]}


class Gemma3Images(LlavaImages):
    """PIL images -> `pixel_values` [N, 3, S, S] (resized whole, no pan-and-scan crops: `Gemma3Processor`'s
    default); every image fills `mm_tokens_per_image` tokens."""

    model_name = "Gemma 3"
    call_kwargs = {"do_pan_and_scan": False}

    def __init__(self, processor: Any, model_config: Any, path: str):
        self.image_processor = processor.image_processor
        if getattr(self.image_processor, "do_pan_and_scan", None):
            raise InputError(
                f"model.path: {path}'s image processor turns on pan-and-scan (do_pan_and_scan); Silkie feeds each "
                "image whole, as Gemma3Processor does by default: set it to false in preprocessor_config.json"
            )
        self.marker_id = model_config.image_token_id
        self.tokens = int(model_config.mm_tokens_per_image)
        if int(processor.image_seq_length) != self.tokens:
            raise InputError(
                f"model.path: {path}'s processor gives {processor.image_seq_length} tokens per image "
                f"(image_seq_length), its model {self.tokens} (mm_tokens_per_image); they must match"
            )
        self.size = model_config.vision_config.image_size
