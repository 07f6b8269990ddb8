"""Qwen3-VL MoE: the routers' load-balancing loss (TRL's, over TRL's tokens), its weight, and LoRA on the experts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

from silkie.config import LoraSection
from silkie.dpo.router_balance import router_balance_loss
from silkie.dpo.step import StepOptions, router_aux_loss_coef, score_answers
from silkie.errors import InputError
from silkie.models.loading import apply_lora, load_base_model

from .hf_fixtures import BUILDERS, PLAIN, assert_same_step, family_batch, model_section, run_step

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return BUILDERS["qwen3_vl_moe"](tmp_path_factory.mktemp("moe"))


def test_the_balancing_loss_is_transformers_over_the_unpadded_tokens():
    """0/1 weights: transformers' `load_balancing_loss_func` with an attention mask, value and gradient."""
    torch.manual_seed(0)
    mask = torch.ones(3, 7)
    mask[0, 5:], mask[2, 3:] = 0, 0
    logits = [torch.randn(21, 8, requires_grad=True) for _ in range(3)]
    ours = router_balance_loss(logits, mask, top_k=2)
    theirs = load_balancing_loss_func(tuple(logits), 8, 2, mask)
    torch.testing.assert_close(ours, theirs)
    ours_grads = torch.autograd.grad(ours, logits)
    for mine, reference in zip(ours_grads, torch.autograd.grad(theirs, logits)):
        torch.testing.assert_close(mine, reference)
    assert ours_grads[0].abs().max() > 0 and ours_grads[0][5:7].abs().max() == 0  # padding takes no part


def test_a_token_counted_twice_weighs_as_two_rows_holding_it():
    """Weight 2 for a shared prompt token = TRL's two rows (prompt+chosen, prompt+rejected) that both hold it."""
    torch.manual_seed(1)
    prompt, chosen, rejected = torch.randn(4, 6), torch.randn(3, 6), torch.randn(2, 6)
    packed = [torch.cat([prompt, chosen, rejected])]
    weights = torch.tensor([2] * 4 + [1] * 5)
    rows = torch.zeros(2, 7, 6)
    rows[0, :7], rows[1, :6] = torch.cat([prompt, chosen]), torch.cat([prompt, rejected])
    mask = torch.tensor([[1] * 7, [1] * 6 + [0]])
    expected = load_balancing_loss_func((rows.reshape(14, 6),), 6, 2, mask)
    torch.testing.assert_close(router_balance_loss(packed, weights, top_k=2), expected)
    assert (router_balance_loss(packed, torch.ones(9), top_k=2) - expected).abs() > 1e-4  # counted once: differs


def test_the_weight_is_the_checkpoint_s_unless_the_recipe_sets_one(folder, tmp_path):
    moe = load_base_model(model_section(folder, "qwen3_vl_moe"))
    assert router_aux_loss_coef(moe, None) == pytest.approx(0.001)  # Qwen3-VL MoE's config, as TRL reads it
    assert router_aux_loss_coef(moe, 0.0) == 0.0 and router_aux_loss_coef(moe, 0.02) == 0.02
    dense = load_base_model(model_section(BUILDERS["qwen3_vl"](tmp_path / "dense"), "qwen3_vl"))
    assert router_aux_loss_coef(dense, None) == 0.0
    with pytest.raises(InputError, match=r"dpo.router_aux_loss_coef: 0.01 is set, but Qwen3VLForConditionalGeneration"):
        router_aux_loss_coef(dense, 0.01)


def test_only_a_policy_pass_with_a_weight_computes_it_and_no_hook_stays(folder):
    model = load_base_model(model_section(folder, "qwen3_vl_moe"))
    batch, pad = family_batch(folder, "qwen3_vl_moe", model)
    with torch.no_grad():
        weighted = dataclasses.replace(PLAIN, router_aux_loss_coef=0.001)
        assert score_answers(model, batch, weighted, pad, policy=True).aux_loss is not None
        assert score_answers(model, batch, weighted, pad, no_grad=True).aux_loss is None  # a reference pass
        assert score_answers(model, batch, PLAIN, pad, policy=True).aux_loss is None  # weight 0: not computed
    routers = [layer.mlp.gate for layer in model.model.language_model.layers]
    assert len(routers) == 2 and not any(router._forward_hooks for router in routers)


def test_lora_on_the_experts_scores_the_same_on_every_path(folder):
    base = load_base_model(model_section(folder, "qwen3_vl_moe"))
    model = apply_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_parameters=EXPERTS), "qwen3_vl_moe")
    adapted = [name for name, param in model.named_parameters() if param.requires_grad and "experts" in name]
    assert len(adapted) == 2 * 2 * 2  # 2 layers x 2 expert weights x (A, B)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and "experts" in name:  # the experts' adapters alone move the policy
                param.normal_(std=0.3)
    batch, pad = family_batch(folder, "qwen3_vl_moe", model)
    plain = run_step(model.train(), batch, PLAIN, pad)
    fast = run_step(model, batch, StepOptions(chunk_size=4, pairs_per_row=3), pad)
    assert_same_step(fast, plain)
    assert any("experts" in name and grad.abs().max() > 0 for name, grad in plain[3].items())


@pytest.mark.parametrize(
    ("targets", "dropout", "message"),
    [
        (["mlp.experts.up_proj"], 0.0, r"'mlp.experts.up_proj' ends no parameter name of the language model's layers; "
         r"their 3-D \(expert\) parameters are mlp.experts.down_proj, mlp.experts.gate_up_proj"),
        (["weight"], 0.0, r"'weight' also matches model.visual.\S+, outside the language model's layers"),
        (EXPERTS, 0.05, r"take no dropout, and lora.dropout is 0.05 with dpo.disable_dropout: false"),
    ],
)  # fmt: skip
def test_bad_expert_targets_are_one_line_errors(folder, targets, dropout, message):
    base = load_base_model(model_section(folder, "qwen3_vl_moe"))
    with pytest.raises(InputError, match=message):
        apply_lora(base, LoraSection(r=4, dropout=dropout, target_parameters=targets), "qwen3_vl_moe")


def test_a_dense_model_has_no_experts_to_adapt(tmp_path):
    base = load_base_model(model_section(BUILDERS["qwen3_vl"](tmp_path / "dense"), "qwen3_vl"))
    with pytest.raises(InputError, match=r"none \(a dense model: use lora.target_modules\)"):
        apply_lora(base, LoraSection(r=4, dropout=0.0, target_parameters=EXPERTS), "qwen3_vl")


def _disk_shapes(folder) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as handle:
        return {key: handle.get_slice(key).get_shape() for key in handle.keys() if "layers.0.mlp.experts" in key}  # noqa: SIM118


def test_the_stand_in_and_a_merged_model_store_the_experts_as_the_release_does(folder, tmp_path):
    """Releases store gate_up [E, H, 2I] and down [E, I, H]; transformers holds them transposed and its
    save_pretrained writes its own layout: Silkie's folders (the stand-in, a merged model) are written as released."""
    from transformers import AutoModelForImageTextToText

    from silkie.tools.merge import merge_adapter

    release = {"model.language_model.layers.0.mlp.experts.gate_up_proj": [4, 64, 32],
               "model.language_model.layers.0.mlp.experts.down_proj": [4, 16, 64]}  # fmt: skip
    assert _disk_shapes(folder) == release
    base = load_base_model(model_section(folder, "qwen3_vl_moe"))
    experts = base.model.language_model.layers[0].mlp.experts
    assert (tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)) == ((4, 32, 64), (4, 64, 16))
    model = apply_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_parameters=EXPERTS), "qwen3_vl_moe")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    model.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32).out_dir
    assert _disk_shapes(merged_dir) == release
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    ids = torch.tensor([[5, 17, 40, 41, 99, 3]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert (base_logits - expected).abs().max() > 1e-3  # the experts' adapters changed the model


ZERO3_LOAD = """
import os, sys, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
from silkie.config import ModelSection
from silkie.models.loading import load_base_model
deepspeed.init_distributed(dist_backend="gloo")
keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1, "bf16": {"enabled": False}})
model = load_base_model(ModelSection(path=sys.argv[1], family="qwen3_vl_moe", dtype="fp32"))
experts = model.model.language_model.layers[0].mlp.experts
with deepspeed.zero.GatheredParameters([experts.gate_up_proj, experts.down_proj]):
    torch.save({"gate_up_proj": experts.gate_up_proj.detach().clone(), "down_proj": experts.down_proj.detach().clone(),
                "partitioned": hasattr(experts.down_proj, "ds_shape")}, sys.argv[2])
"""


def test_under_zero3_the_experts_load_from_either_layout(folder, tmp_path):
    """ZeRO-3 partitions a parameter before its checkpoint tensor arrives: transformers' shape check saw a [0]
    placeholder and transposed every tensor, so a folder in transformers' own layout failed; both layouts load."""
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    from .train_fixtures import subprocess_env

    plain = AutoModelForImageTextToText.from_pretrained(folder).model.language_model.layers[0].mlp.experts
    own_layout = tmp_path / "own"
    AutoModelForImageTextToText.from_pretrained(folder).save_pretrained(own_layout)
    for item in folder.iterdir():
        if not (own_layout / item.name).exists():
            (own_layout / item.name).write_bytes(item.read_bytes())
    assert _disk_shapes(own_layout)["model.language_model.layers.0.mlp.experts.down_proj"] == [4, 64, 16]
    script = tmp_path / "zero3_load.py"
    script.write_text(ZERO3_LOAD)
    for number, path in enumerate((folder, own_layout)):
        out = tmp_path / f"experts{number}.pt"
        command = [sys.executable, str(script), str(path), str(out), str(29611 + number)]
        result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = torch.load(out)
        assert loaded["partitioned"]
        torch.testing.assert_close(loaded["gate_up_proj"], plain.gate_up_proj.detach())
        torch.testing.assert_close(loaded["down_proj"], plain.down_proj.detach())


def test_a_checkpoint_that_returns_its_router_logits_scores_as_one_that_does_not(folder):
    """`output_router_logits: true` in a config would have transformers balance over the 4-D block mask of packed
    rows (it fails there); the family switches it off for our passes, which compute the loss themselves."""
    model = load_base_model(model_section(folder, "qwen3_vl_moe"))
    batch, pad = family_batch(folder, "qwen3_vl_moe", model)
    options = StepOptions(chunk_size=4, router_aux_loss_coef=0.001)
    with torch.no_grad():
        expected = score_answers(model, batch, options, pad, policy=True)
        model.config.text_config.output_router_logits = True
        scores = score_answers(model, batch, options, pad, policy=True)
    torch.testing.assert_close(scores.chosen_logps, expected.chosen_logps)
    torch.testing.assert_close(scores.aux_loss, expected.aux_loss)


@pytest.mark.parametrize("options", [PLAIN, StepOptions(chunk_size=4, pairs_per_row=3)], ids=["plain", "packed"])
def test_a_pair_left_out_of_the_loss_is_left_out_of_the_balancing_loss(folder, options):
    """A pair whose media failed (weight 0) counts in no mean: the loss is that of the batch without it, and a
    batch of only such pairs adds nothing."""
    from silkie.data.collator import PairCollator
    from silkie.models.family import get_family
    from silkie.models.loading import load_tokenizer

    from .hf_fixtures import MemoryImages, tokenized_rows

    model = load_base_model(model_section(folder, "qwen3_vl_moe"))
    section = model_section(folder, "qwen3_vl_moe")
    codec = load_tokenizer(section)
    collate = PairCollator(MemoryImages(), get_family("qwen3_vl_moe").image_processor(model.config, section),
                           codec.pad_token_id)  # fmt: skip
    rows = tokenized_rows(codec)
    batch, kept = collate(rows), collate([rows[i] for i in (0, 2, 3)])
    options = dataclasses.replace(options, router_aux_loss_coef=0.001)

    def aux(batch: dict) -> torch.Tensor:
        return score_answers(model, batch, options, codec.pad_token_id, policy=True).aux_loss

    with torch.no_grad():
        left_out = aux(batch | {"pair_weight": torch.tensor([1.0, 0.0, 1.0, 1.0])})
        torch.testing.assert_close(left_out, aux(kept), atol=1e-6, rtol=0)
        assert abs(aux(batch) - left_out) > 1e-5
        assert aux(batch | {"pair_weight": torch.zeros(4)}) == 0.0


def test_liger_leaves_experts_with_lora_their_own_forward(folder, monkeypatch):
    """liger's expert kernel reads the experts' weights directly, past peft's parameter adapters: with
    `lora.target_parameters` its SwiGLU patch is left out (its norms and rotary still apply)."""
    import sys
    import types

    from silkie.models.kernels import use_liger

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen3_vl_moe = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    for targets in (None, EXPERTS):
        base = load_base_model(model_section(folder, "qwen3_vl_moe"))
        model = apply_lora(base, LoraSection(r=4, dropout=0.0, target_parameters=targets), "qwen3_vl_moe")
        assert use_liger(model.get_base_model(), "qwen3_vl_moe") == 2
    assert [call["swiglu"] for call in calls] == [True, False] and all(call["rms_norm"] for call in calls)


def test_recipes_that_would_lose_the_experts_or_the_balancing_loss_are_refused():
    from silkie.config import RecipeError, load_recipe

    from .conftest import REPO_ROOT

    demo = REPO_ROOT / "dpo_config" / "demo_qwen3_vl_moe.yaml"
    with pytest.raises(RecipeError, match=r"lora.load_in_4bit with model.family qwen3_vl_moe: bitsandbytes quantizes"):
        load_recipe(demo, ["lora.load_in_4bit=true"])
    with pytest.raises(RecipeError, match=r"model.compile_blocks: a compiled decoder block does not run the hooks"):
        load_recipe(demo, ["model.compile_blocks=true"])
    assert load_recipe(demo, ["model.compile_blocks=true", "dpo.router_aux_loss_coef=0"]).model.compile_blocks


def test_the_release_layout_is_written_once(folder, tmp_path, caplog):
    """A folder already in the release's layout is left as it is (the shapes tell the layouts apart)."""
    import json
    import logging
    import shutil

    from silkie.models.hf_vlm.expert_layout import write_release_layout

    copy = shutil.copytree(folder, tmp_path / "copy")
    assert write_release_layout(copy) == 0 and _disk_shapes(copy) == _disk_shapes(folder)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 32  # 2I = H: gate_up has one shape in both layouts
    (copy / "config.json").write_text(json.dumps(config))
    silkie_logger = logging.getLogger("silkie")  # its own handler, not propagated once a run configured it
    silkie_logger.addHandler(caplog.handler)
    try:
        assert write_release_layout(copy) == 0
    finally:
        silkie_logger.removeHandler(caplog.handler)
    assert "mlp.experts.gate_up_proj square in both layouts; left as saved" in caplog.text


def test_full_fine_tuning_saves_the_model_in_the_release_layout(folder, tmp_path):
    """Without LoRA the run's `adapter` folder holds the whole model: written with the experts as released, and it
    loads back to the trained weights."""
    from transformers import AutoModelForImageTextToText

    from silkie.config import load_recipe
    from silkie.dev.synthetic import write_synthetic_vlfeedback
    from silkie.train import run_training

    from .conftest import REPO_ROOT

    data = tmp_path / "data"
    write_synthetic_vlfeedback(data, n=60, seed=0)
    overrides = [f"model.path={folder}", f"data.path={data / 'vlfeedback_80k.jsonl'}",
                 f"data.images={data / 'merged_images.zip'}", "lora.enabled=false", "data.eval_fraction=0.0",
                 "training.eval_strategy=no", "training.max_steps=2", "training.report_to=none",
                 "training.per_device_train_batch_size=2", "training.learning_rate=1e-2"]  # fmt: skip
    recipe = load_recipe(REPO_ROOT / "dpo_config" / "demo_qwen3_vl_moe.yaml", overrides)
    run_training(recipe, tmp_path / "run")
    saved = tmp_path / "run" / "adapter"
    shapes = _disk_shapes(saved)
    assert shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"] == [4, 64, 32]  # [E, H, 2I]
    trained = AutoModelForImageTextToText.from_pretrained(saved).model.language_model.layers[0].mlp.experts
    initial = AutoModelForImageTextToText.from_pretrained(folder).model.language_model.layers[0].mlp.experts
    assert tuple(trained.gate_up_proj.shape) == (4, 32, 64)
    assert (trained.gate_up_proj - initial.gate_up_proj).abs().max() > 1e-4  # trained, and read back the right way
    torch.testing.assert_close(trained.gate_up_proj, initial.gate_up_proj, atol=0.1, rtol=0)
