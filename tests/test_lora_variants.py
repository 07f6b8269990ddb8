"""peft's LoRA variants as recipe keys: DoRA, rsLoRA, `all-linear` targets and a single target name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from silkie.config import LoraSection, RecipeError, load_recipe
from silkie.models.loading import apply_lora, load_base_model

from .hf_fixtures import BUILDERS, model_section
from .train_fixtures import DEMO_RECIPE, FAST, asset_overrides, read_metrics, run_in_process


def test_all_linear_is_every_language_model_linear_but_the_head_and_one_name_is_a_list(tmp_path):
    path = BUILDERS["qwen2_vl"](tmp_path / "qwen2_vl")
    lora = LoraSection(r=4, target_modules=["all-linear"])
    model = apply_lora(load_base_model(model_section(path, "qwen2_vl")), lora, "qwen2_vl")
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"}  # fmt: skip
    assert len(adapted) == 2 * 7 and not any("lm_head" in n or "visual" in n for n in adapted)
    assert load_recipe(DEMO_RECIPE, ["lora.target_modules=c_attn"]).lora.target_modules == ["c_attn"]
    assert load_recipe(DEMO_RECIPE, ["lora.target_modules=all-linear"]).lora.target_modules == ["all-linear"]
    assert load_recipe(DEMO_RECIPE, ["lora.target_modules=all"]).lora.target_modules == ["all-linear"]  # LLaMA-F.
    assert load_recipe(DEMO_RECIPE, ["lora.target_modules='c_attn, w1'"]).lora.target_modules == ["c_attn", "w1"]
    with pytest.raises(RecipeError, match="lora.target_modules"):
        load_recipe(DEMO_RECIPE, ["lora.target_modules=[all-linear, c_attn]"])


def test_rslora_scales_by_the_root_of_the_rank(tmp_path):
    path = BUILDERS["qwen2_vl"](tmp_path / "qwen2_vl")
    for rs, scale in ((False, 16 / 4), (True, 16 / math.sqrt(4))):
        model = apply_lora(load_base_model(model_section(path, "qwen2_vl")), LoraSection(r=4, alpha=16, use_rslora=rs),
                           "qwen2_vl")  # fmt: skip
        layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling"))
        assert layer.scaling["default"] == pytest.approx(scale)


def test_dora_trains_with_the_adapter_off_as_its_reference(assets, tmp_path):
    """DoRA's magnitude is trained and saved; with the adapter off the model is the base, so step 1's rewards are
    0 exactly as for LoRA (the reference is right)."""
    working = tmp_path / "run"
    result = run_in_process(working, asset_overrides(assets) + FAST + [
        "training.max_steps=3", "data.max_prompts=12", "lora.use_dora=true", "lora.r=4"])  # fmt: skip
    assert result["step"] == 3
    config = json.loads((working / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    saved = load_file(working / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in saved if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 2 * 4  # 2 layers x c_attn c_proj w1 w2
    steps = [r for r in read_metrics(working) if "loss" in r]
    assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/rejected"] == 0.0
    assert steps[-1]["rewards/chosen"] != 0.0
    base = load_base_model(load_recipe(DEMO_RECIPE, asset_overrides(assets)).model)
    norm = base.transformer.h[0].attn.c_attn.weight.detach().float().norm(dim=1)
    trained = saved[next(k for k in magnitudes if ".h.0.attn.c_attn." in k)].float()
    assert trained.shape == norm.shape and not torch.allclose(trained, norm)  # trained away from its init


def test_the_share_of_the_update_a_dtype_keeps_is_not_claimed_for_dora(tmp_path):
    """The measure projects round(W + BA) - W on BA; DoRA also rescales rows by its magnitude, which it misses."""
    from silkie.tools.merge import update_kept

    path = BUILDERS["qwen2_vl"](tmp_path / "qwen2_vl")
    for dora in (False, True):
        model = apply_lora(load_base_model(model_section(path, "qwen2_vl")), LoraSection(r=4, use_dora=dora),
                           "qwen2_vl")  # fmt: skip
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        kept = update_kept(model, torch.bfloat16)
        assert kept is None if dora else 0.9 < kept <= 1.0
