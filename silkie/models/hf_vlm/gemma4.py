"""Gemma 4 (transformers' `Gemma4ForConditionalGeneration`: gemma-4-E2B/E4B/31B-it, the 26B-A4B mixture of experts).

A vision tower that takes each picture at its aspect ratio: resized to fill at most `max_soft_tokens` x 9 patches
(16 px), padded to that many, and pooled 3x3 into at most `max_soft_tokens` soft tokens (280 by default), so images
take different token counts, as Qwen2-VL's. The language model has 1-D positions and, as Gemma 3's, sliding-window
and full-attention layers; in 31B and 26B-A4B (`use_bidirectional_attention: vision`) an image's tokens attend each
other both ways in the sliding-window layers only (`create_masks_for_vision_model`), in E2B / E4B nowhere. Its other
parts need nothing here: per-layer input embeddings are read from the ids the model is given, the last layers reuse
earlier layers' keys and values within the one forward, and the MoE variant's experts sit beside each layer's MLP
(LoRA reaches them through `lora.target_parameters`; the release defines no load-balancing loss). `Gemma4Processor`
writes each image as `<|image>` + its soft tokens + `<image|>` in place of the template's `<|image|>`; videos are
frames with their `mm:ss` times (`gemma4_video`). Audio is not read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from silkie.errors import InputError
from silkie.models.family import ImageBatch, unwrap_causal_lm

from .codec import ImageSpan, load_processor
from .family import HFVisionFamily, image_encoder_outputs
from .gemma3 import same_image, sliding_masks
from .gemma4_video import FRAME_COUNTS, Gemma4Videos


class Gemma4Family(HFVisionFamily):
    """Gemma 4: pictures of any aspect ratio in up to `max_soft_tokens` tokens each (encoded once per step, each
    image's features picked per row); a mask per layer kind for the packed rows (sliding window, full)."""

    class_names = ("Gemma4ForConditionalGeneration",)
    vision_lora_pattern = (
        r"model\.vision_tower\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)\.linear"
    )
    vision_parts = ("vision_tower", "embed_vision")
    projector_part = "embed_vision"
    hearing_parts = ("audio_tower", "embed_audio")  # E2B / E4B's

    def refuse_checkpoint(self, path: str, quantized: bool) -> None:
        """Images attended both ways everywhere (`use_bidirectional_attention: all`, an encoder's setting), and
        4-bit weights for the mixture of experts."""
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(path).get_text_config()
        if text.use_bidirectional_attention == "all":
            raise InputError(
                f"model.path: {path} attends every token both ways (text_config.use_bidirectional_attention: all, an "
                "encoder's setting); Silkie trains causal language models (vision or null)"
            )
        if quantized and text.enable_moe_block:
            raise InputError(
                "lora.load_in_4bit with a Gemma 4 mixture of experts (26B-A4B): bitsandbytes quantizes linear layers "
                "only, so its experts (3-D weights, most of the model) would stay unquantized and be cast to fp32; "
                "train it in bf16 (deepspeed.stage=3 spreads it over the GPUs)"
            )

    def prepare_for_training(self, model: nn.Module) -> None:
        """Freeze the audio tower (E2B / E4B), which no pair feeds: trainable, it would get no gradient, which DDP
        refuses, in full fine-tuning with the vision tower trained too."""
        base, _ = unwrap_causal_lm(model)
        for part in self.hearing_parts:
            if getattr(base.model, part, None) is not None:
                getattr(base.model, part).requires_grad_(False)

    def reentrant_checkpointing_problem(self, base: nn.Module) -> str | None:
        """E2B / E4B's last layers read keys and values an earlier layer stores during the forward: a reentrant
        checkpoint runs that layer without gradients, so what flows back through the sharing layers is lost."""
        shared = base.config.get_text_config().num_kv_shared_layers
        if shared:
            return f"{shared} of its layers reuse earlier layers' keys and values, whose gradients it would drop"
        return None

    def quantization_skip_modules(self) -> list[str]:
        return ["lm_head", *self.vision_parts, *self.hearing_parts]

    def image_span(self, processor: Any) -> ImageSpan:
        """`Gemma4Processor.replace_image_token` with one soft token (the marker the collator expands)."""
        return ImageSpan(
            placeholder=processor.image_token,
            text=f"{processor.boi_token}{processor.image_token}{processor.eoi_token}",
            marker=processor.image_token,
        )

    def image_token_budget(self, processor: Any, path: str) -> int:
        return int(processor.image_processor.max_soft_tokens)

    def image_processor(self, model_config: Any, section: Any) -> Any:
        processor = load_processor(section.path, None, None, None, section.max_image_tokens)
        return Gemma4Images(processor, model_config, Gemma4Videos(processor, model_config, section))

    def video_processor(self, processor: Any, section: Any) -> Gemma4Videos:
        from transformers import AutoConfig

        return Gemma4Videos(processor, AutoConfig.from_pretrained(section.path), section)

    def _features(self, base: nn.Module, pixel_values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        return list(base.model.get_image_features(pixel_values, positions).pooler_output)

    def encode_images(self, base: nn.Module, batch: dict) -> dict[str, list | None]:
        """Each image's soft tokens [n_i, D] and each video's (all its frames') [n_v, D], padding patches dropped by
        the tower."""
        features: dict[str, list | None] = {"image": None, "video": None}
        if batch.get("pixel_values") is not None and batch["pixel_values"].numel():
            features["image"] = self._features(base, batch["pixel_values"], batch["image_position_ids"])
        if batch.get("pixel_values_videos") is not None and batch["pixel_values_videos"].numel():
            out = base.model.get_video_features(
                batch["pixel_values_videos"], batch["video_position_ids"], num_frames_per_video=batch[FRAME_COUNTS]
            )
            features["video"] = list(out.pooler_output)
        return features

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        """The features of one blank image of a single soft token (3x3 patches)."""
        vision = base.config.vision_config
        side = vision.pooling_kernel_size
        device = next(base.model.vision_tower.parameters()).device
        pixels = torch.zeros(1, side * side, 3 * vision.patch_size**2, device=device)
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), dim=-1)
        return torch.cat(self._features(base, pixels, grid.reshape(1, side * side, 2).to(device)))

    def row_image_kwargs(
        self, base: nn.Module, batch: dict, order: torch.Tensor, features: Any, video_order: torch.Tensor | None = None
    ) -> dict:
        """The rows' images (`order`) and videos (`video_order`): their features, else their pixels (a video's
        frames picked by `num_frames_per_video`)."""
        kwargs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        for kind, picks in (("image", order), ("video", video_order)):
            if picks is None or not picks.numel():
                continue
            if features is not None:
                picked = [features[kind][i] for i in picks.tolist()]
                outputs |= image_encoder_outputs(picked, kind)["mm_encoder_outputs"]
            elif kind == "image":
                picks = picks.to(batch["pixel_values"].device)
                kwargs |= {name: batch[name].index_select(0, picks) for name in ("pixel_values", "image_position_ids")}
            else:
                counts = batch[FRAME_COUNTS].tolist()
                for name in ("pixel_values_videos", "video_position_ids"):
                    frames = torch.split(batch[name], counts)
                    kwargs[name] = torch.cat([frames[i] for i in picks.tolist()])
                kwargs[FRAME_COUNTS] = batch[FRAME_COUNTS].index_select(0, picks.to(batch[FRAME_COUNTS].device))
        if outputs:
            kwargs["mm_encoder_outputs"] = outputs
        return kwargs

    def last_position(self, input_ids: torch.Tensor) -> torch.Tensor:
        """As an index tensor: an integer `logits_to_keep` makes Gemma 4 run its KV-sharing layers (E2B / E4B) on
        the kept positions alone, whose hidden states are then all it returns."""
        return torch.tensor([input_ids.size(1) - 1], device=input_ids.device)

    def token_kwargs(self, model_config: Any, input_ids: torch.Tensor) -> dict:
        """`mm_token_type_ids` as `Gemma4Processor` gives them (1 on image tokens, 2 on video tokens): where the model
        builds the masks itself (concatenated rows, generation) it reads an image's or a frame's extent from them."""
        return {"mm_token_type_ids": mm_token_types(model_config, input_ids)}

    def attention_masks(
        self,
        base: nn.Module,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict:
        """Packed rows' block mask [R, 1, L, L] -> the mask of each layer kind, as transformers composes them for a
        row of its own: full = the block mask; sliding = (block mask OR same image, where images are attended both
        ways) AND within the window of positions."""
        if mask.dim() != 4:
            return mask
        text = base.config.get_text_config()
        both_ways = mask | same_image(input_ids, base.config.image_token_id, base.config.video_token_id)
        sliding = both_ways if text.use_bidirectional_attention == "vision" else mask
        return {"full_attention": mask, **sliding_masks(sliding, position_ids, text)}


class Gemma4Images:
    """PIL images -> `pixel_values` [N, P, 3 * patch^2] (each image's patches, padded to P = max_soft_tokens x
    pooling^2) + `image_position_ids` [N, P, 2] (each patch's column and row; -1 on padding), and each image's
    soft-token count; video clips -> their frames' tensors and ids (`Gemma4Videos`)."""

    def __init__(self, processor: Any, model_config: Any, videos: Gemma4Videos):
        self.image_processor = processor.image_processor
        self.marker_id = model_config.image_token_id
        image = self.image_processor
        self.patches = image.max_soft_tokens * image.pooling_kernel_size**2
        self.width = 3 * image.patch_size**2
        self.videos = videos

    def fingerprint(self) -> str:
        """The image processor's settings (patch size, soft-token bound, pooling) and the video ones."""
        return self.image_processor.to_json_string() + self.videos.fingerprint()

    def __call__(self, images: list, videos: list = ()) -> ImageBatch:
        if not images:
            tensors = {
                "pixel_values": torch.zeros(0, self.patches, self.width),
                "image_position_ids": torch.zeros(0, self.patches, 2, dtype=torch.long),
            }
            batch = ImageBatch(tensors, [], self.marker_id)
        else:
            out = self.image_processor(images=images, return_tensors="pt")
            tensors = {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]}
            batch = ImageBatch(tensors, [int(n) for n in out["num_soft_tokens_per_image"]], self.marker_id)
        if videos:
            video_tensors, batch.tokens_per_video = self.videos(list(videos))
            batch.tensors |= video_tensors
            batch.video_marker_id = self.videos.marker_id
        return batch


def mm_token_types(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Token types as `Gemma4Processor` gives them: 0 text, 1 image, 2 video."""
    return (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long()
