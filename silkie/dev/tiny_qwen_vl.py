"""Tiny random Qwen-VL-Chat checkpoints in the official folder format (the stand-in for tests and the demo)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import GenerationConfig

from silkie.models.qwen_vl.configuration import QWenConfig
from silkie.models.qwen_vl.modeling import QWenLMHeadModel
from silkie.models.qwen_vl.tokenization import (
    DEFAULT_SYSTEM,
    VOCAB_FILE,
    QWenTokenizer,
    pad_ranks,
    train_bpe_ranks,
    write_tiktoken_ranks,
)

OFFICIAL_RANKS = 151643

SPECIAL_COUNT = 217
IMG_START_OFFSET = 214


def demo_corpus(n_rows: int = 600, seed: int = 0) -> list[str]:
    """Texts the tiny BPE is trained on: the synthetic VLFeedback prompts/answers and the chat scaffolding."""
    from silkie.dev.synthetic import generate_rows

    texts = [DEFAULT_SYSTEM, "system\n", "user\n", "assistant\n", "Picture 1: ", "\n"]
    for row, _meta in generate_rows(n_rows, seed=seed):
        texts.append(row["prompt"])
        texts.extend(completion["response"] for completion in row["completions"])
    return texts


def tiny_config(num_ranks: int, hidden_size: int = 128, layers: int = 2, image_size: int = 56) -> QWenConfig:
    """A small config whose special ids follow a vocabulary of `num_ranks` BPE ranks."""
    vocab = num_ranks + SPECIAL_COUNT
    vocab_size = (vocab + 63) // 64 * 64  # padded like the official 151,936 rows
    return QWenConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 32,
        kv_channels=32,
        intermediate_size=4 * hidden_size,
        visual={
            "heads": 4,
            "image_size": image_size,
            "image_start_id": num_ranks + IMG_START_OFFSET,
            "layers": 2,
            "mlp_ratio": 2.0,
            "output_dim": hidden_size,
            "patch_size": 14,
            "width": 64,
        },
    )


def random_model(config: QWenConfig, device: str, dtype: torch.dtype) -> QWenLMHeadModel:
    """A randomly initialised model created directly on `device` in `dtype` (no full-precision CPU copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return QWenLMHeadModel(config)
    finally:
        torch.set_default_dtype(previous)


def write_tokenizer(out_dir: str | Path, vocab_size: int = 512, official_size: bool = False) -> QWenTokenizer:
    """A `qwen.tiktoken` trained on the demo corpus in `out_dir` (padded to the official 151,643 ranks with
    `official_size`, so the special ids are the official ones); returns the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe_ranks(demo_corpus(), vocab_size)
    write_tiktoken_ranks(pad_ranks(ranks, OFFICIAL_RANKS) if official_size else ranks, out / VOCAB_FILE)
    return QWenTokenizer.from_pretrained(out)


def build_tiny_checkpoint(
    out_dir: str | Path,
    vocab_size: int = 1024,
    corpus: Iterable[str] | None = None,
    hidden_size: int = 128,
    layers: int = 2,
    image_size: int = 56,
    seed: int = 0,
    official_size: bool = False,
    device: str = "cpu",
) -> Path:
    """Write config.json, weights, generation_config.json and a small qwen.tiktoken into `out_dir`.

    `official_size=True` writes Qwen-VL-Chat's architecture instead (random bf16 weights made on `device`,
    the demo vocabulary padded to the official 151,643 ranks so every special id is the official one).
    """
    out = Path(out_dir)
    ranks = train_bpe_ranks(corpus if corpus is not None else demo_corpus(), vocab_size)
    if official_size:
        from silkie.models.qwen_vl.configuration import official_config

        ranks = pad_ranks(ranks, OFFICIAL_RANKS)
        config = official_config()
    else:  # before anything is written: sizes the config refuses leave no half-made folder
        config = tiny_config(len(ranks), hidden_size=hidden_size, layers=layers, image_size=image_size)
    out.mkdir(parents=True, exist_ok=True)
    write_tiktoken_ranks(ranks, out / VOCAB_FILE)
    tokenizer = QWenTokenizer.from_pretrained(out)
    if config.image_start_id != tokenizer.img_start_id:
        raise AssertionError("tiny checkpoint: config image_start_id disagrees with the tokenizer")
    config.eos_token_id = tokenizer.eod_id
    config.pad_token_id = tokenizer.eod_id
    torch.manual_seed(seed)
    model = random_model(config, device, torch.bfloat16 if official_size else torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id],
        pad_token_id=tokenizer.eod_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    return out
