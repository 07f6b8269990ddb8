"""Qwen2-VL / Qwen2.5-VL processors without torchvision: transformers 5 builds their video processor with it, so a
folder would not load at all; the image-only processors below serve every image recipe."""

from __future__ import annotations

from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLProcessor
from transformers.utils import is_torchvision_available


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor, which transformers 5.x only implements with torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video processor (see `ImageOnlyQwen2VLProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def register_qwen2_vl_processor() -> bool:
    """Without torchvision, make AutoProcessor load Qwen2-VL / Qwen2.5-VL folders as the image-only processors.

    transformers 5.24 cannot build (or load) `Qwen2VLProcessor` without torchvision, because its video processor
    needs it. Returns True when the image-only processor was registered.
    """
    if is_torchvision_available():
        return False
    AutoProcessor.register(Qwen2VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)
    return True
