"""Native Qwen-VL-Chat model: checkpoint layout, loading, attention paths, caching, long-context rules."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from silkie.models.qwen_vl import CheckpointError, QWenConfig, QWenLMHeadModel
from silkie.models.qwen_vl.attention import ntk_alpha_for_length

from .conftest import REFERENCE_DIR, image_prompt_ids


def read_reference_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE_DIR / "qwen_vl_chat_state_dict.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        shapes[name] = tuple(int(dim) for dim in shape.split("x"))
    return shapes


def test_official_state_dict_names_and_shapes():
    config = QWenConfig(**json.loads((REFERENCE_DIR / "qwen_vl_chat_config.json").read_text()))
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    reference = read_reference_shapes()
    assert sorted(set(ours) - set(reference)) == []
    assert sorted(set(reference) - set(ours)) == []
    assert {n: s for n, s in ours.items() if reference[n] != s} == {}
    assert len(ours) == 853
    assert sum(t.numel() for t in model.state_dict().values()) == 9_656_935_168
    assert model.transformer.visual.num_queries == 256
    assert model.transformer.visual.attn_pool.attn.num_heads == 32


def test_config_rejects_inconsistent_sizes(tiny_config):
    kwargs = tiny_config.to_dict()
    kwargs["visual"] = dict(kwargs["visual"], output_dim=256)
    with pytest.raises(ValueError, match="visual.output_dim"):
        QWenConfig(**{k: v for k, v in kwargs.items() if k in QWenConfig.__dataclass_fields__})


def test_save_load_round_trip_identical_logits(tiny_model, tmp_path):
    ids = image_prompt_ids(tiny_model.config)
    pixels = torch.randn(2, 3, 56, 56)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = QWenLMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        a = tiny_model(ids, pixel_values=pixels).logits
        b = loaded(ids, pixel_values=pixels).logits
    assert torch.equal(a, b)


def test_bin_checkpoint_loads(tiny_model, tmp_path):
    folder = tmp_path / "bin"
    tiny_model.config.save_pretrained(folder)
    torch.save(tiny_model.state_dict(), folder / "pytorch_model.bin")
    loaded = QWenLMHeadModel.from_pretrained(folder)
    assert torch.equal(loaded.lm_head.weight, tiny_model.lm_head.weight)


def test_precomputed_image_features_equal_pixel_path(tiny_model):
    ids = image_prompt_ids(tiny_model.config)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        features = tiny_model.encode_images(pixels)
        assert features.shape == (2, 256, 128)
        a = tiny_model(ids, pixel_values=pixels).logits
        b = tiny_model(ids, image_features=features).logits
        c = tiny_model(ids).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3  # the image changes the output


def test_image_features_replace_only_span_slots(tiny_model):
    ids = image_prompt_ids(tiny_model.config, batch=1)
    features = torch.randn(1, 256, 128)
    embeds = tiny_model.transformer.wte(ids)
    injected = tiny_model.transformer.inject_image_features(ids, embeds, features)
    start = int((ids[0] == tiny_model.config.image_start_id).nonzero()[0])
    assert torch.equal(injected[0, start + 1 : start + 257], features[0])
    assert torch.equal(injected[0, : start + 1], embeds[0, : start + 1])
    assert torch.equal(injected[0, start + 257 :], embeds[0, start + 257 :])
    with pytest.raises(ValueError, match="2 images"):
        tiny_model.transformer.inject_image_features(ids, embeds, torch.randn(2, 256, 128))


def test_sdpa_equals_eager_with_padding(tiny_config):
    torch.manual_seed(1)
    sdpa = QWenLMHeadModel(tiny_config).eval()
    eager_config = copy.deepcopy(tiny_config)
    eager_config._attn_implementation = "eager"
    eager = QWenLMHeadModel(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "eager"
    ids = image_prompt_ids(tiny_config)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = sdpa(ids, attention_mask=attention_mask, pixel_values=pixels).logits
            b = eager(ids, attention_mask=attention_mask, pixel_values=pixels).logits
            keep = (attention_mask if attention_mask is not None else torch.ones_like(ids)).bool()
            assert (a - b)[keep].abs().max() < 1e-5


def test_left_padding_keeps_real_token_logits(tiny_model):
    ids = image_prompt_ids(tiny_model.config, batch=1)
    pad = torch.full((1, 5), 7)
    padded = torch.cat([pad, ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a = tiny_model(ids, pixel_values=pixels).logits
        b = tiny_model(padded, attention_mask=mask, pixel_values=pixels).logits[:, 5:]
    assert (a - b).abs().max() < 1e-4
    assert torch.isfinite(tiny_model(padded, attention_mask=mask, pixel_values=pixels).logits).all()


def test_gradient_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(2)
    model = QWenLMHeadModel(tiny_config).train()
    ids = image_prompt_ids(tiny_config)
    pixels = torch.randn(2, 3, 56, 56)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(ids, pixel_values=pixels, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.transformer.h[0].gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert len(plain) == len(list(model.parameters())) - 1  # all but the frozen resampler pos_embed
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_cached_generation_equals_uncached(tiny_model):
    ids = image_prompt_ids(tiny_model.config, batch=1)
    pixels = torch.randn(1, 3, 56, 56)
    generated = tiny_model.generate(ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, pad_token_id=0)
    sequence = ids
    with torch.no_grad():
        for _ in range(6):
            logits = tiny_model(sequence, pixel_values=pixels, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_bf16_forward_close_to_fp32(tiny_model):
    ids = image_prompt_ids(tiny_model.config, batch=1)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = tiny_model(ids, pixel_values=pixels).logits
        low = tiny_model.to(torch.bfloat16)(ids, pixel_values=pixels).logits.float()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    rel = (low - ref).norm() / ref.norm()
    assert rel < 3e-2


def test_dynamic_ntk_alpha_values():
    assert ntk_alpha_for_length(10, 2048) == 1
    assert ntk_alpha_for_length(2048, 2048) == 1
    assert ntk_alpha_for_length(2049, 2048) == 3
    assert ntk_alpha_for_length(4096, 2048) == 3
    assert ntk_alpha_for_length(4097, 2048) == 7
    assert ntk_alpha_for_length(8192, 2048) == 7


def test_long_context_rules_only_beyond_seq_length(tiny_config):
    torch.manual_seed(3)
    short = QWenLMHeadModel(QWenConfig(**{**tiny_config.to_diff_dict(), "seq_length": 64})).eval()
    plain = QWenLMHeadModel(
        QWenConfig(**{**tiny_config.to_diff_dict(), "seq_length": 64, "use_dynamic_ntk": False, "use_logn_attn": False})
    ).eval()
    plain.load_state_dict(short.state_dict())
    ids = torch.randint(0, 900, (1, 100))
    with torch.no_grad():
        assert torch.equal(short(ids[:, :64]).logits, plain(ids[:, :64]).logits)  # exact no-op up to seq_length
        long_diff = (short(ids).logits - plain(ids).logits).abs().max()
        assert long_diff > 1e-4  # NTK + logn change long inputs, inside the first 64 positions too
        assert short.transformer.rotary_emb.ntk_alpha == 3
    short.train()
    with torch.no_grad():
        assert torch.equal(short(ids, use_cache=False).logits, plain.train()(ids, use_cache=False).logits)


def test_corrupt_and_truncated_checkpoints_name_the_file(tiny_model, tmp_path):
    folder = tmp_path / "ckpt"
    tiny_model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        QWenLMHeadModel.from_pretrained(folder)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        QWenLMHeadModel.from_pretrained(folder)
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        QWenLMHeadModel.from_pretrained(folder)


def test_missing_weights_are_refused(tiny_model, tmp_path):
    folder = tmp_path / "partial"
    tiny_model.config.save_pretrained(folder)
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("lm_head")}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        QWenLMHeadModel.from_pretrained(folder)


def test_weights_a_config_has_no_place_for_are_refused(tiny_model, tmp_path):
    """A config.json with fewer layers than the weights would silently drop the extra layers."""
    import json

    folder = tmp_path / "fewer-layers"
    tiny_model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (folder / "config.json").write_text(json.dumps(config))
    last = config["num_hidden_layers"]
    unused = rf"checkpoint weights the model has no place for .*transformer\.h\.{last}\."
    with pytest.raises(CheckpointError, match=unused):
        QWenLMHeadModel.from_pretrained(folder)


def test_offline_hub_id_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Qwen/Qwen-VL-Chat"):
        QWenLMHeadModel.from_pretrained("Qwen/Qwen-VL-Chat")


def test_bf16_checkpoint_load_encodes_images(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = QWenLMHeadModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    features = loaded.encode_images(torch.randn(1, 3, 56, 56))
    assert features.dtype == torch.bfloat16 and features.shape == (1, 256, 128)


def test_resampler_attention_equals_torch_multihead_attention():
    from torch import nn

    from silkie.models.qwen_vl.visual import ResamplerAttention

    torch.manual_seed(4)
    reference = nn.MultiheadAttention(256, 2, batch_first=True)
    ours = ResamplerAttention(256, 2)
    ours.load_state_dict(reference.state_dict())  # same parameter names: in_proj_weight/bias, out_proj.*
    q, k, v = torch.randn(3, 16, 256), torch.randn(3, 9, 256), torch.randn(3, 9, 256)
    expected, _ = reference(q, k, v, need_weights=False)
    assert (ours(q, k, v) - expected).abs().max() < 1e-5


def test_flex_attention_equals_sdpa_with_padding_and_packed_masks(tiny_config):
    from silkie.dpo.step import StepOptions, score_answers

    from .dpo_fixtures import random_pair_batch

    torch.manual_seed(5)
    sdpa = QWenLMHeadModel(tiny_config).eval()
    flex_config = copy.deepcopy(tiny_config)
    flex_config._attn_implementation = "flex_attention"
    flex = QWenLMHeadModel(flex_config).eval()
    flex.load_state_dict(sdpa.state_dict())
    ids = image_prompt_ids(tiny_config)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a = sdpa(ids, attention_mask=mask, pixel_values=pixels).logits
        b = flex(ids, attention_mask=mask, pixel_values=pixels).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-4
    # packed shared-prompt rows (4-D block mask); flex has no backward on CPU, so gradients are checked on CUDA
    batch = random_pair_batch(tiny_config, [(5, 7, 4), (9, 3, 6)], [True, False], seed=2)
    results = [score_answers(model, batch, StepOptions(), 0, no_grad=True) for model in (sdpa, flex)]
    assert torch.allclose(results[0].chosen_logps, results[1].chosen_logps, atol=1e-4)
    assert torch.allclose(results[0].rejected_logps, results[1].rejected_logps, atol=1e-4)
