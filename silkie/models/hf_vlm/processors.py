"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (dense, MoE), InternVL and Gemma 4 processors without torchvision:
transformers 5 builds their video processors with it, so a folder would not load at all; the image-only processors
below serve every image recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import (
    AutoProcessor,
    Gemma4Config,
    Gemma4Processor,
    InternVLConfig,
    InternVLProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
)
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

from silkie.config.checkpoint import model_type_of


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor, which transformers 5.x only implements with torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video processor (see `ImageOnlyQwen2VLProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without the video processor (see `ImageOnlyQwen2VLProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVLProcessor without the video processor (see `ImageOnlyQwen2VLProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )


class ImageOnlyGemma4Processor(Gemma4Processor):
    """Gemma4Processor without the video processor (see `ImageOnlyQwen2VLProcessor`) and the audio feature extractor
    (Silkie feeds Gemma 4 images only). `Gemma4Processor.__init__` takes both as required arguments, so its token
    attributes are set here as it sets them."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 280, **kwargs):
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.image_token_id
        for name in ("boi_token", "eoi_token", "image_token"):
            setattr(self, name, getattr(tokenizer, name))
        self.video_token = "<|video|>"  # Gemma4Processor's: the releases' tokenizers do not name it
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        for name in ("audio_token_id", "audio_token", "boa_token", "eoa_token"):
            setattr(self, name, getattr(tokenizer, name, None))
        ProcessorMixin.__init__(
            self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
        )


IMAGE_ONLY = (  # (config class, the official processor, its image-only stand-in)
    (Qwen2VLConfig, Qwen2VLProcessor, ImageOnlyQwen2VLProcessor),
    (Qwen2_5_VLConfig, Qwen2_5_VLProcessor, ImageOnlyQwen2_5_VLProcessor),
    (Qwen3VLConfig, Qwen3VLProcessor, ImageOnlyQwen3VLProcessor),
    (Qwen3VLMoeConfig, Qwen3VLProcessor, ImageOnlyQwen3VLProcessor),  # the MoE variant: the dense one's processor
    (Qwen3_5Config, Qwen3VLProcessor, ImageOnlyQwen3VLProcessor),  # Qwen3.5 (dense, MoE): Qwen3-VL's processor
    (Qwen3_5MoeConfig, Qwen3VLProcessor, ImageOnlyQwen3VLProcessor),
    (InternVLConfig, InternVLProcessor, ImageOnlyInternVLProcessor),
    (Gemma4Config, Gemma4Processor, ImageOnlyGemma4Processor),
)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def register_image_only_processors() -> bool:
    """Without torchvision, make AutoProcessor load Qwen2-VL / Qwen2.5-VL / Qwen3-VL / InternVL / Gemma 4 folders as
    the image-only processors.

    transformers 5.24 cannot build (or load) their processors without torchvision, because their video processors
    need it. Returns True when the image-only processors were registered.
    """
    if is_torchvision_available():
        return False
    for config, _, processor in IMAGE_ONLY:
        AutoProcessor.register(config, processor, exist_ok=True)
    return True


def load_image_only_processor(path: str) -> Any | None:
    """The image-only processor of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / InternVL / Gemma 4 folder (a checkpoint, or an
    adapter folder with the processor files saved beside it) where it is needed; None for another model, or where
    AutoProcessor loads it.

    Chosen by the processor class the folder names, else by its config.json model type, and loaded by class, not
    through AutoProcessor: without torchvision a released folder's official class would be built with its video
    processor and fail; a folder saved here names the image-only class, which AutoProcessor does not know (it would
    return the bare tokenizer), with or without torchvision.
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    named = {_json_key(folder / name, "processor_class") for name in PROCESSOR_FILES} - {None}
    model_type = model_type_of(folder)
    for config, official, image_only in IMAGE_ONLY:
        if image_only.__name__ in named:
            return image_only.from_pretrained(path)
        if is_torchvision_available():
            continue
        if official.__name__ in named or (not named and model_type == config.model_type):
            return image_only.from_pretrained(path)
    return None


def _json_key(path: Path, key: str) -> Any:
    """`key` of the JSON object in `path`; None when the file is missing, not a JSON object or lacks the key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None
