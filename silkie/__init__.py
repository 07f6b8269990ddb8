"""Silkie: config-driven DPO for vision-language models (Qwen-VL-Chat first)."""

__version__ = "0.1.0"
