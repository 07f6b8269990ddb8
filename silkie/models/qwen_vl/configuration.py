"""Qwen-VL-Chat configuration: reads the official `config.json` unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

DEFAULT_VISUAL: dict[str, Any] = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
    "n_queries": 256,
}


class QWenConfig(PreTrainedConfig):
    """Configuration of Qwen-VL-Chat (`model_type: qwen`) with its `visual` sub-dict.

    Field names and defaults are those of the official checkpoint. `intermediate_size`
    is twice the MLP width (the original halves it), `kv_channels` is the head size.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    no_bias: bool = True
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = False
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    onnx_safe: bool | None = None
    tokenizer_type: str = "QWenTokenizer"
    visual: dict | None = None
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        visual = dict(DEFAULT_VISUAL)
        visual.update(self.visual or {})
        self.visual = visual
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Reject configs the architecture cannot build, naming the field."""
        vis = self.visual
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"config: kv_channels ({self.kv_channels}) x num_attention_heads ({self.num_attention_heads}) "
                f"must equal hidden_size ({self.hidden_size})"
            )
        if self.intermediate_size % 2:
            raise ValueError(
                f"config: intermediate_size must be even (MLP width is half of it), got {self.intermediate_size}"
            )
        if self.visual["output_dim"] != self.hidden_size:
            raise ValueError(
                f"config: visual.output_dim ({self.visual['output_dim']}) must equal hidden_size ({self.hidden_size})"
            )
        if self.visual["output_dim"] % 128:
            raise ValueError(
                f"config: visual.output_dim must be a multiple of 128 (resampler heads), got {vis['output_dim']}"
            )
        if self.visual["width"] % self.visual["heads"]:
            raise ValueError(
                f"config: visual.width ({vis['width']}) must be divisible by visual.heads ({vis['heads']})"
            )
        if self.visual["image_size"] % self.visual["patch_size"]:
            raise ValueError(
                f"config: visual.image_size ({self.visual['image_size']}) must be a multiple of "
                f"visual.patch_size ({self.visual['patch_size']})"
            )
        n_queries = int(self.visual.get("n_queries", 256))
        if n_queries != 256:  # the tokenizer always writes 256 slots between <img> and </img>
            raise ValueError(f"config: visual.n_queries must be 256 (the image span's slots), got {n_queries}")
        if self.rotary_pct != 1.0:
            raise ValueError(f"config: rotary_pct {self.rotary_pct} is not supported (Qwen-VL-Chat uses 1.0)")

    @property
    def head_dim(self) -> int:
        """Per-head size of the LLM attention."""
        return self.kv_channels

    @property
    def image_start_id(self) -> int:
        """Token id of `<img>`; `</img>` and `<imgpad>` follow it."""
        return int(self.visual["image_start_id"])


OFFICIAL_CONFIG = Path(__file__).resolve().with_name("qwen_vl_chat_config.json")


def official_config() -> QWenConfig:
    """Qwen-VL-Chat's published config (9.6B parameters), shipped beside this module."""
    return QWenConfig(**json.loads(OFFICIAL_CONFIG.read_text()))
