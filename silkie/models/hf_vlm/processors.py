"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors without torchvision: transformers 5 builds their video processors
with it, so a folder would not load at all; the image-only processors below serve every image recipe."""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)
from transformers.utils import is_torchvision_available


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


IMAGE_ONLY = (
    (Qwen2VLConfig, ImageOnlyQwen2VLProcessor),
    (Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor),
    (Qwen3VLConfig, ImageOnlyQwen3VLProcessor),
)


def register_image_only_processors() -> bool:
    """Without torchvision, make AutoProcessor load Qwen2-VL / Qwen2.5-VL / Qwen3-VL folders as the image-only
    processors.

    transformers 5.24 cannot build (or load) their processors without torchvision, because their video processors
    need it. Returns True when the image-only processors were registered.
    """
    if is_torchvision_available():
        return False
    for config, processor in IMAGE_ONLY:
        AutoProcessor.register(config, processor, exist_ok=True)
    return True


def load_image_only_processor(path: str) -> Any | None:
    """Without torchvision, the image-only processor of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder, chosen by its
    config.json; None with torchvision or for another model.

    Loaded by class, not through AutoProcessor: a released folder names its official processor class (its
    `processor_class`), which AutoProcessor would build, video processor included, and fail without torchvision.
    """
    if is_torchvision_available():
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for config_class, processor in IMAGE_ONLY:
        if type(config) is config_class:
            return processor.from_pretrained(path)
    return None
