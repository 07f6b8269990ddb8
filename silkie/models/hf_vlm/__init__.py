"""Hugging Face-format vision-language models (Qwen2/3-VL, LLaVA-1.5, InternVL) driven through transformers' Auto
classes."""
