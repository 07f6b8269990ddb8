"""Native Qwen-VL-Chat: configuration, model, tokenizer, image processor."""

from .checkpoint_io import CheckpointError
from .configuration import QWenConfig
from .image_processing import QWenVLImageProcessor
from .modeling import QWenLMHeadModel, QWenModel
from .tokenization import QWenTokenizer

__all__ = ["CheckpointError", "QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer", "QWenVLImageProcessor"]
