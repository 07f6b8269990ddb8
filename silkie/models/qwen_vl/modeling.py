"""Native Qwen-VL-Chat (QWenLMHeadModel) for transformers 5: LLM blocks, image injection, generation.

State-dict names and shapes equal the official checkpoint's; see `../shared/reference/`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..varlen import VarlenLayout
from .attention import (
    ATTENTION_FUNCTIONS,
    QWenRotaryEmbedding,
    apply_rotary,
    build_attention_mask,
    build_flex_block_mask,
    logn_scale,
    ntk_alpha_for_length,
)
from .checkpoint_io import CheckpointLoadingMixin
from .configuration import QWenConfig
from .visual import Resampler, ResamplerAttention, VisionTransformer, sincos_pos_embed_2d


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times weight (`upcast = False`: all in x's dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.upcast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.upcast:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class QWenAttention(nn.Module):
    """Causal self-attention with a fused QKV projection (bias) and an output projection (no bias)."""

    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None = None,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.config.hidden_size, dim=-1)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.rotate(q, k, *rotary)
        if q_scale is not None:
            q = (q * q_scale).type_as(k)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ATTENTION_FUNCTIONS[self.config._attn_implementation or "sdpa"]
        dropout = self.config.attn_dropout_prob if self.training else 0.0
        out = attend(q, k, v, mask, dropout)
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of queries and keys [B, H, L, D] (cos, sin: [B, 1, L, D])."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class QWenMLP(nn.Module):
    """c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * nn.functional.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    """Pre-norm decoder block."""

    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        q_scale: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        h = hidden_states + self.attn(self.ln_1(hidden_states), rotary, mask, cache, q_scale)
        return h + self.mlp(self.ln_2(h))


class QWenPreTrainedModel(CheckpointLoadingMixin, PreTrainedModel):
    """Shared loading/saving/initialisation for the Qwen-VL classes."""

    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, VisionTransformer):
            init.normal_(module.positional_embedding, std=module.positional_embedding.size(-1) ** -0.5)
            init.normal_(module.proj, std=module.proj.size(0) ** -0.5)
        elif isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            grid = int(module.num_queries**0.5)
            init.copy_(module.pos_embed, sincos_pos_embed_2d(module.pos_embed.size(-1), grid))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class QWenModel(QWenPreTrainedModel):
    """Embeddings + vision tower + decoder blocks + final norm (`transformer.*` in the checkpoint)."""

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = QWenRotaryEmbedding(config.kv_channels, base=config.rotary_emb_base)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(config)
        self.rotary_fp32 = True  # False: cos/sin in the hidden dtype, so rotation needs no fp32 copies
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features [N, n_queries, hidden] for preprocessed pixels [N, 3, S, S]."""
        return self.visual(pixel_values)

    def inject_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Replace the slots strictly inside each `<img>...</img>` span by image features (row-major order)."""
        start_id = self.config.image_start_id
        n_slots = image_features.size(1)
        batch_idx, start_pos = (input_ids == start_id).nonzero(as_tuple=True)
        if batch_idx.numel() != image_features.size(0):
            raise ValueError(
                f"input_ids hold {batch_idx.numel()} <img> spans but {image_features.size(0)} images were given"
            )
        if batch_idx.numel() == 0:
            return inputs_embeds
        slot_pos = start_pos[:, None] + 1 + torch.arange(n_slots, device=input_ids.device)
        if int(slot_pos.max()) >= input_ids.size(1):
            raise ValueError(f"an <img> span is cut off: each span needs {n_slots} slots and a closing </img>")
        slot_mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        slot_mask[batch_idx[:, None].expand_as(slot_pos), slot_pos] = True
        features = image_features.to(inputs_embeds.dtype).reshape(-1, inputs_embeds.size(-1))
        return inputs_embeds.masked_scatter(slot_mask.unsqueeze(-1), features)

    def _ntk_alpha(self, past_length: int, total_length: int) -> float:
        if self.training or not self.config.use_dynamic_ntk:
            return 1.0
        if past_length == 0:  # prefill decides; cached decode steps reuse it (as the original)
            self.rotary_emb.ntk_alpha = ntk_alpha_for_length(total_length, self.config.seq_length)
        return self.rotary_emb.ntk_alpha

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the decoder; images come as `pixel_values` or precomputed `image_features`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
            if image_features is None and pixel_values is not None:
                image_features = self.encode_images(pixel_values)
            if image_features is not None:
                inputs_embeds = self.inject_image_features(input_ids, inputs_embeds, image_features)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not (self.is_activation_checkpointing and self.training):
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        batch, length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
            context_length = past_length + length
        else:  # packed/shared-prompt rows: the context is the largest position, not the row length
            context_length = int(position_ids.max()) + 1
        ntk_alpha = self._ntk_alpha(past_length, context_length)
        rotary = self.rotary_emb(position_ids, ntk_alpha)
        if not self.rotary_fp32:
            rotary = tuple(t.to(inputs_embeds.dtype) for t in rotary)
        q_scale = None
        if self.config.use_logn_attn and not self.training and context_length > self.config.seq_length:
            q_scale = logn_scale(position_ids, self.config.seq_length)
        if isinstance(attention_mask, VarlenLayout):  # packed DPO rows under `varlen` attention
            mask = attention_mask.to(inputs_embeds.device)
        elif self.config._attn_implementation == "flex_attention":
            mask = build_flex_block_mask(attention_mask, length, past_length, batch, inputs_embeds.device)
        else:
            mask = build_attention_mask(attention_mask, length, past_length, inputs_embeds.dtype, inputs_embeds.device)
        hidden = self.drop(inputs_embeds)
        for block in self.h:
            hidden = block(hidden, rotary=rotary, mask=mask, cache=cache, q_scale=q_scale, use_cache=use_cache)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden), cache=cache)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    """Qwen-VL-Chat with its (untied) LM head; `generate` works with `pixel_values`."""

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features [N, n_queries, hidden]; compute once and pass as `image_features`."""
        return self.transformer.encode_images(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_hidden_states_only: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (all positions, or the last `logits_to_keep`); loss = shifted mean CE ignoring -100.

        With `return_hidden_states_only=True` the LM head is skipped and `hidden_states` holds
        the final normed states, so callers can score only the positions they need.
        """
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_features=image_features,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if return_hidden_states_only:
            return CausalLMOutputWithPast(hidden_states=(hidden,), cache=outputs.cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
            loss = nn.functional.cross_entropy(
                shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def chat(self, tokenizer: Any, query: str, history: list | None = None, **kwargs: Any) -> tuple[str, list]:
        """(reply, history), as the original remote code's `model.chat` (see `silkie.models.qwen_vl.chat`)."""
        from .chat import chat

        return chat(self, tokenizer, query, history, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs):
        """Standard preparation; image inputs only on the first (prefill) step."""
        is_first = kwargs.get("is_first_iteration", False)
        image_features = kwargs.pop("image_features", None)
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if is_first or not kwargs.get("use_cache", True):
            model_inputs["image_features"] = image_features
        else:
            model_inputs.pop("pixel_values", None)
        return model_inputs
