"""Hugging Face-format vision-language models (Qwen2-VL, LLaVA-1.5) driven through transformers' Auto classes."""
