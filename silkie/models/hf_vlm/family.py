"""Transformers-native VLMs (`AutoModelForImageTextToText` + `AutoProcessor`) behind `ModelFamily`.

`Qwen2VLFamily` (Qwen2-VL and Qwen2.5-VL: dynamic resolution, `pixel_values` patches + `image_grid_thw`, videos as
`pixel_values_videos` + `video_grid_thw`, 3-D M-RoPE) and `LlavaFamily` (LLaVA-1.5: fixed-size CLIP images, 1-D
positions). Images and videos are encoded once through the model's own `get_image_features` /
`get_video_features` and injected back through `mm_encoder_outputs`; packed (shared-prompt) rows get M-RoPE
positions from the model's `get_rope_index` on the prompt, each answer continuing from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from silkie.errors import InputError
from silkie.models.family import ImageBatch, ModelFamily
from silkie.models.qwen_vl.checkpoint_io import refuse_incomplete_load
from silkie.models.varlen import constructible

from .codec import ChatTemplateCodec, ImageSpan, load_processor
from .expert_layout import expert_shapes_seen_under_zero3
from .softcap import SoftcappedHead
from .varlen_attention import LAYOUT_KEY, use_varlen, uses_varlen
from .video import Qwen2VLVideos

LLM_PREFIX = r"model\.language_model\.layers\.\d+\.(?:.*\.)?"


def image_encoder_outputs(features: list[torch.Tensor] | torch.Tensor, kind: str = "image") -> dict:
    """Forward kwargs handing the model's `kind` ("image" / "video") features computed before (`mm_encoder_outputs`)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"mm_encoder_outputs": {kind: BaseModelOutputWithPooling(pooler_output=features)}}


class HFVisionFamily(ModelFamily):
    """What every transformers-native VLM shares; subclasses give the image side and module names."""

    class_names: tuple[str, ...] = ()
    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    vision_lora_pattern = ""
    vision_parts: tuple[str, ...] = ()  # attribute names under `model.model` (tower first, projector last)
    projector_part = ""
    video_span_collapsed = False  # the template's vision span around a video becomes the bare marker (Qwen3-VL)

    def load_model(self, section: Any, dtype: torch.dtype, quantization_config: Any = None) -> nn.Module:
        from transformers import AutoModelForImageTextToText

        self.check_folder(section.path)
        self.refuse_checkpoint(section.path, quantization_config is not None)
        if section.attn_implementation == "flex_attention":
            raise InputError(
                f"model.attn_implementation: flex_attention is for qwen_vl; use sdpa, eager or varlen with {self.name}"
            )
        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        with expert_shapes_seen_under_zero3():
            model, info = AutoModelForImageTextToText.from_pretrained(
                section.path,
                dtype=dtype,
                attn_implementation=constructible(section.attn_implementation),
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported in `info` (refused below), not raised with a whole report
                **extra,
            )
        if section.attn_implementation == "varlen":
            use_varlen(model)
        # left at random init: a weight missing, or of another shape (Qwen3.5 MoE's experts stacked from a folder
        # that lacks one expert's tensor)
        refuse_incomplete_load(section.path, info, kinds=("missing_keys", "mismatched_keys"))
        if type(model).__name__ not in self.class_names:
            raise InputError(
                f"model.family: {section.path} holds a {type(model).__name__}, not a {self.name} model "
                f"({', '.join(self.class_names)})"
            )
        return model

    def refuse_checkpoint(self, path: str, quantized: bool) -> None:
        """`InputError` before the weights load for a checkpoint the family would train wrongly (`quantized`: in
        4-bit); most families refuse none."""

    def load_codec(self, section: Any, files: str | None = None) -> ChatTemplateCodec:
        """The codec of the checkpoint; tokenizer/processor files from `files` (e.g. an adapter folder) if given."""
        if files is None:
            self.check_folder(section.path)
        processor = load_processor(
            files or section.path, section.min_pixels, section.max_pixels, section.max_tiles, section.max_image_tokens
        )
        budget = self.image_token_budget(processor, section.path)
        videos = self.video_processor(processor, section)
        return ChatTemplateCodec(processor, budget, videos, self.video_span_collapsed, self.image_span(processor),
                                 section.chat_template_kwargs)  # fmt: skip

    def image_span(self, processor: Any) -> ImageSpan | None:
        """The text the processor writes for an image in place of the template's placeholder, where it writes more
        than the feature tokens (Gemma 3); None: the placeholder is the marker itself."""
        return None

    def video_processor(self, processor: Any, section: Any) -> Any:
        """The codec's view of the family's videos (`most_tokens`, `slice_key`); None: no video."""
        return None

    def image_token_budget(self, processor: Any, path: str) -> int:
        """Most tokens one image can take (bounds prompt lengths at tokenization); `path`: the model folder."""
        raise NotImplementedError

    def generation_inputs(self, tensors: dict, media_kinds: list[int]) -> dict:
        """The image/video tensors `generate()` takes for one prompt whose media come in `media_kinds` order (0 image,
        1 video); the collator's tensors as they are for most families."""
        return tensors

    def lora_target_regex(self, lora: Any) -> str:
        llm = "|".join(re.escape(t) for t in (lora.target_modules or self.default_lora_targets))
        pattern = rf"{LLM_PREFIX}(?:{llm})"
        if lora.vision:
            pattern += f"|{self.vision_lora_pattern}"
        return pattern

    def freeze_vision(self, model: nn.Module, keep_projector: bool = False) -> None:
        for part in self.vision_parts:
            trainable = keep_projector and part == self.projector_part
            getattr(model.model, part).requires_grad_(trainable)

    def owns(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.class_names

    def vision_module(self, base: nn.Module) -> nn.Module:
        return nn.ModuleList([getattr(base.model, part) for part in dict.fromkeys(self.vision_parts)])

    def decoder_layers(self, base: nn.Module) -> nn.ModuleList:
        return base.model.language_model.layers

    def uses_varlen(self, base: nn.Module) -> bool:
        return uses_varlen(base)

    def varlen_kwargs(self, layout: Any, mask: Callable[[], torch.Tensor]) -> dict:
        """The layout goes down through the attention kwargs; the dense mask goes in as given (4-D, so nothing is
        built per forward) and keeps any call the layout does not reach right."""
        return {"attention_mask": mask(), LAYOUT_KEY: layout}

    def hidden_states(self, model: nn.Module, base: nn.Module, kwargs: dict) -> torch.Tensor:
        # through the outermost module (DeepSpeed's per-step hooks, e.g. ZeRO-3 prefetch, live on the root), with
        # logits for one position only; the decoder's last hidden states are taken from its output on the way
        captured: dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            captured["hidden"] = output.last_hidden_state

        handle = base.model.register_forward_hook(keep)
        try:
            model(**kwargs, logits_to_keep=self.last_position(kwargs["input_ids"]))
        finally:
            handle.remove()
        return captured["hidden"]

    def last_position(self, input_ids: torch.Tensor) -> int | torch.Tensor:
        """`logits_to_keep` for the logits of the last position alone (the hidden states are what is read)."""
        return 1

    def output_head(self, base: nn.Module) -> nn.Module:
        cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        return SoftcappedHead(base.lm_head, cap) if cap else base.lm_head


class Qwen2VLFamily(HFVisionFamily):
    """Qwen2-VL / Qwen2.5-VL: images of any size within the recipe's pixel bounds; 3-D M-RoPE positions."""

    class_names = ("Qwen2VLForConditionalGeneration",)
    vision_lora_pattern = (
        r"model\.visual\.blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.(?:fc1|fc2|gate_proj|up_proj|down_proj))"
    )
    vision_parts = ("visual",)
    projector_part = ""

    def freeze_vision(self, model: nn.Module, keep_projector: bool = False) -> None:
        visual = model.model.visual
        visual.requires_grad_(False)
        if keep_projector:  # the merger is Qwen2-VL's vision->LLM projector
            visual.merger.requires_grad_(True)

    def image_token_budget(self, processor: Any, path: str) -> int:
        image = processor.image_processor
        return image.size["longest_edge"] // (image.patch_size * image.merge_size) ** 2

    timed_video = False  # Qwen2.5-VL: video temporal positions spaced by `second_per_grid_ts`

    def image_processor(self, model_config: Any, section: Any) -> Any:
        processor = load_processor(section.path, section.min_pixels, section.max_pixels)
        return Qwen2VLImages(processor, model_config, self.make_videos(processor, model_config, section))

    def video_processor(self, processor: Any, section: Any) -> Qwen2VLVideos:
        from transformers import AutoConfig

        return self.make_videos(processor, AutoConfig.from_pretrained(section.path), section)

    def make_videos(self, processor: Any, model_config: Any, section: Any) -> Qwen2VLVideos:
        """The family's video processor (frames -> tensors and the ids each video fills)."""
        return Qwen2VLVideos(processor.image_processor, model_config, section, self.timed_video)

    def quantization_skip_modules(self) -> list[str]:
        return ["lm_head", "visual"]

    def encode_images(self, base: nn.Module, batch: dict) -> dict[str, list | None]:
        features: dict[str, list | None] = {"image": None, "video": None}
        if batch.get("pixel_values") is not None and batch["pixel_values"].numel():
            out = base.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            features["image"] = self.split_features(out)
        if batch.get("pixel_values_videos") is not None and batch["pixel_values_videos"].numel():
            out = base.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
            features["video"] = self.split_features(out)
        return features

    def split_features(self, out: Any) -> list:
        """One entry per image / video of the tower's output: its merged features."""
        return list(out.pooler_output)

    def encoder_outputs(self, picked: list, kind: str) -> dict:
        """`mm_encoder_outputs` holding the `split_features` entries `picked` (row-major) for `kind`."""
        return image_encoder_outputs(picked, kind)["mm_encoder_outputs"]

    def blank_tower_output(self, base: nn.Module) -> Any:
        """The tower's output for one blank image of the smallest grid."""
        vision = base.config.vision_config
        merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
        device = next(base.model.visual.parameters()).device
        pixels = torch.zeros(merge * merge, vision.in_channels * temporal * patch * patch, device=device)
        grid = torch.tensor([[1, merge, merge]], device=device)
        return base.model.get_image_features(pixels, grid)

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        return torch.cat(list(self.blank_tower_output(base).pooler_output))

    def row_image_kwargs(
        self, base: nn.Module, batch: dict, order: torch.Tensor, features: Any, video_order: torch.Tensor | None = None
    ) -> dict:
        kwargs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        for kind, picks, pixels, grid_name in (
            ("image", order, "pixel_values", "image_grid_thw"),
            ("video", video_order, "pixel_values_videos", "video_grid_thw"),
        ):
            if picks is None or not picks.numel():
                continue
            grids = batch[grid_name]
            kwargs[grid_name] = grids.index_select(0, picks)
            if features is not None:
                outputs |= self.encoder_outputs([features[kind][i] for i in picks.tolist()], kind)
            else:
                patches = torch.split(batch[pixels], grids.prod(-1).tolist())
                kwargs[pixels] = torch.cat([patches[i] for i in picks.tolist()])
            if kind == "video" and "second_per_grid_ts" in batch:
                kwargs["second_per_grid_ts"] = batch["second_per_grid_ts"].index_select(0, picks)
        if outputs:
            kwargs["mm_encoder_outputs"] = outputs
        return kwargs

    def prompt_positions(self, base: nn.Module, batch: dict) -> torch.Tensor:
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        grids = {}
        for name in ("image_grid_thw", "video_grid_thw"):
            grid = batch.get(name)
            grids[name] = grid if grid is not None and grid.numel() else None
        if grids["video_grid_thw"] is not None and "second_per_grid_ts" in batch:
            grids["second_per_grid_ts"] = batch["second_per_grid_ts"]
        positions, _ = base.model.get_rope_index(
            ids, self.row_kwargs(base, ids)["mm_token_type_ids"], attention_mask=mask, **grids
        )
        return positions

    def token_kwargs(self, model_config: Any, input_ids: torch.Tensor) -> dict:
        return {"mm_token_type_ids": mm_token_types(model_config, input_ids)}


def mm_token_types(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Token types as the Qwen processors give them for M-RoPE: 0 text, 1 image, 2 video."""
    return (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()


class Qwen2_5_VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's interface (window-attention ViT with a SwiGLU MLP, same processor); its M-RoPE spaces
    video frames by their time (`second_per_grid_ts`)."""

    class_names = ("Qwen2_5_VLForConditionalGeneration",)
    timed_video = True


class Qwen2VLImages:
    """PIL images -> `pixel_values` patches + `image_grid_thw`, and each image's token count (grid / merge^2); video
    clips -> `pixel_values_videos` + `video_grid_thw` (`Qwen2VLVideos`)."""

    def __init__(self, processor: Any, model_config: Any, videos: Qwen2VLVideos):
        self.image_processor = processor.image_processor
        self.marker_id = model_config.image_token_id
        vision = model_config.vision_config
        self.empty_width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        self.videos = videos

    def check(self, image: Any) -> str | None:
        """Why the processor cannot take `image` (Qwen2-VL refuses aspect ratios over 200), or None."""
        width, height = image.size
        if max(width, height) > 200 * max(1, min(width, height)):
            return f"aspect ratio {width}x{height} is over 200 (Qwen2-VL's limit)"
        return None

    def fingerprint(self) -> str:
        """The image processor's settings and the video ones (they decide pixels and token counts)."""
        return self.image_processor.to_json_string() + self.videos.fingerprint()

    def __call__(self, images: list, videos: list = ()) -> ImageBatch:
        if not images:
            tensors = {
                "pixel_values": torch.zeros(0, self.empty_width),
                "image_grid_thw": torch.zeros(0, 3, dtype=torch.long),
            }
            tokens = []
        else:
            out = self.image_processor(images=images, return_tensors="pt")
            grid = out["image_grid_thw"]
            tokens = (grid.prod(-1) // self.image_processor.merge_size**2).tolist()
            tensors = {"pixel_values": out["pixel_values"], "image_grid_thw": grid}
        batch = ImageBatch(tensors, tokens, self.marker_id)
        if videos:
            video_tensors, batch.tokens_per_video = self.videos(list(videos))
            batch.tensors |= video_tensors
            batch.video_marker_id = self.videos.marker_id
        return batch


class LlavaFamily(HFVisionFamily):
    """LLaVA-1.5 style: a CLIP tower at a fixed size, a projector, and a Llama-style LLM with 1-D positions."""

    class_names = ("LlavaForConditionalGeneration",)
    vision_lora_pattern = (
        r"model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
    )
    vision_parts = ("vision_tower", "multi_modal_projector")
    projector_part = "multi_modal_projector"

    def image_token_budget(self, processor: Any, path: str) -> int:
        from transformers import AutoConfig

        return llava_image_tokens(AutoConfig.from_pretrained(path))

    def image_processor(self, model_config: Any, section: Any) -> Any:
        return LlavaImages(load_processor(section.path, None, None), model_config)

    def quantization_skip_modules(self) -> list[str]:
        return ["lm_head", "vision_tower", "multi_modal_projector"]

    def _features(self, base: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        config = base.config
        out = base.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def encode_images(self, base: nn.Module, batch: dict) -> list[torch.Tensor]:
        return self._features(base, batch["pixel_values"])

    def blank_image_features(self, base: nn.Module) -> torch.Tensor:
        size = base.config.vision_config.image_size
        device = next(base.model.vision_tower.parameters()).device
        return torch.cat(self._features(base, torch.zeros(1, 3, size, size, device=device)))

    def row_image_kwargs(
        self, base: nn.Module, batch: dict, order: torch.Tensor, features: Any, video_order: torch.Tensor | None = None
    ) -> dict:
        if features is not None:
            return image_encoder_outputs(self.feature_input([features[i] for i in order.tolist()]))
        return {"pixel_values": batch["pixel_values"].index_select(0, order)}

    def feature_input(self, picked: list[torch.Tensor]) -> Any:
        """The rows' image features ([tokens, D] each) as the model's forward takes them back: LLaVA's, a list."""
        return picked


def llava_image_tokens(config: Any) -> int:
    """Feature tokens per image: the tower's patches (+ CLS unless the "default" strategy drops it).

    Taken from the model config (the features the model makes), not from processor keys that conversions omit.
    """
    vision = config.vision_config
    cls = 0 if config.vision_feature_select_strategy == "default" else 1
    return (vision.image_size // vision.patch_size) ** 2 + cls


class LlavaImages:
    """PIL images -> `pixel_values` [N, 3, S, S] (CLIP preprocessing); every image fills the same token count."""

    model_name = "LLaVA"
    call_kwargs: dict[str, Any] = {}  # the image processor's call settings, as the family's processor passes them

    def __init__(self, processor: Any, model_config: Any):
        self.image_processor = processor.image_processor
        self.marker_id = model_config.image_token_id
        self.tokens = llava_image_tokens(model_config)
        self.size = model_config.vision_config.image_size

    def fingerprint(self) -> str:
        """The image processor's settings (size, crop, normalisation)."""
        return self.image_processor.to_json_string()

    def __call__(self, images: list, videos: list = ()) -> ImageBatch:
        if videos:
            raise ValueError(
                f"{self.model_name} takes images, not video (tokenization drops such pairs as video_unsupported)"
            )
        if not images:
            return ImageBatch({"pixel_values": torch.zeros(0, 3, self.size, self.size)}, [], self.marker_id)
        out = self.image_processor(images=images, return_tensors="pt", **self.call_kwargs)
        return ImageBatch({"pixel_values": out["pixel_values"]}, [self.tokens] * len(images), self.marker_id)
