"""Training end to end with the transformers-native families: loss goes down, adapter saved and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from silkie.config import load_recipe
from silkie.config.names import MOE_FAMILIES
from silkie.dev.tiny_builders import TINY_FOLDERS
from silkie.dpo.step import StepOptions, score_answers
from silkie.train import run_training

from .conftest import REPO_ROOT
from .hf_fixtures import BUILDERS, family_batch

FOLDERS = {family: TINY_FOLDERS[family] for family in BUILDERS}
RECIPES = {"qwen2_vl": "demo_qwen2_vl", "qwen2_5_vl": "demo_qwen2_vl", "qwen3_vl": "demo_qwen3_vl"}
RECIPES["qwen3_vl_moe"] = "demo_qwen3_vl_moe"  # LoRA on the experts too; the routers' load-balancing loss
RECIPES["llava"] = "demo_llava"
RECIPES["internvl"] = "demo_internvl"
RECIPES["gemma3"] = "demo_gemma3"
RECIPES["gemma4"] = "demo_gemma4"
RECIPES["qwen3_5"] = "demo_qwen3_5"
RECIPES["qwen3_5_moe"] = "demo_qwen3_5_moe"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from silkie.dev.synthetic import write_synthetic_vlfeedback

    root = tmp_path_factory.mktemp("vlfeedback")
    write_synthetic_vlfeedback(root, n=200, seed=0)
    return root


def train(family: str, model_dir: Path, data: Path, working: Path, extra: list[str]) -> dict:
    overrides = [
        f"model.path={model_dir}",
        f"model.family={family}",
        f"data.path={data / 'vlfeedback_80k.jsonl'}",
        f"data.images={data / 'merged_images.zip'}",
        "data.eval_fraction=0.0",
        "training.eval_strategy=no",
        "training.logging_steps=1",
        "training.report_to=none",
        "training.lr_scheduler_type=constant",
        "training.warmup_ratio=0.0",
        "training.learning_rate=2e-3",
        *extra,
    ]
    return run_training(load_recipe(REPO_ROOT / "dpo_config" / f"{RECIPES[family]}.yaml", overrides), working)


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_training_lowers_the_loss_and_the_adapter_reloads(family, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model_dir = BUILDERS[family](tmp_path / FOLDERS[family])
    working = tmp_path / "run"
    result = train(family, model_dir, data, working, ["training.max_steps=40", "data.max_prompts=6"])
    assert result["step"] == 40
    records = [r for r in map(json.loads, (working / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    losses = [r["loss"] for r in records]
    assert len(losses) == 40
    balance = 0.001 * records[0]["aux_loss"] if family in MOE_FAMILIES else 0.0  # the checkpoint's weight, as TRL
    assert (family in MOE_FAMILIES) == ("aux_loss" in records[0]) and balance < 0.01
    assert losses[0] == pytest.approx(0.6931 + balance, abs=1e-4)  # LoRA B starts at 0: policy = reference, ln 2
    assert sum(losses[-8:]) / 8 < 0.4, losses  # a few prompts seen again and again get fitted

    adapter = working / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and "language_model" in json.dumps(config["target_modules"])
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if family in MOE_FAMILIES else None
    assert config.get("target_parameters") == experts
    base = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    batch, pad = family_batch(model_dir, family, base)
    with torch.no_grad():
        before = score_answers(base, batch, StepOptions(), pad, no_grad=True)
        tuned = PeftModel.from_pretrained(base, adapter).eval()
        after = score_answers(tuned, batch, StepOptions(), pad, no_grad=True)
        with tuned.disable_adapter():
            disabled = score_answers(tuned, batch, StepOptions(), pad, no_grad=True)
    assert (after.chosen_logps - before.chosen_logps).abs().max() > 1e-2
    torch.testing.assert_close(disabled.chosen_logps, before.chosen_logps)


def test_qwen2_vl_under_deepspeed_zero3_on_two_cpu_processes(data, tmp_path):
    """ZeRO-3 partitions the HF model (vision tower included); images once and packed M-RoPE rows still train."""
    import subprocess
    import sys

    from .train_fixtures import subprocess_env

    model_dir = BUILDERS["qwen2_vl"](tmp_path / "tiny-qwen2-vl")
    working = tmp_path / "zero3"
    overrides = [
        f"model.path={model_dir}",
        f"data.path={data / 'vlfeedback_80k.jsonl'}",
        f"data.images={data / 'merged_images.zip'}",
        "deepspeed.stage=3",
        "data.eval_fraction=0.0",
        "data.max_prompts=8",
        "training.eval_strategy=no",
        "training.logging_steps=1",
        "training.report_to=none",
        "training.max_steps=8",
        "training.per_device_train_batch_size=4",
        "training.learning_rate=5e-3",
        "training.lr_scheduler_type=constant",
        "training.warmup_ratio=0.0",
        "training.gradient_checkpointing=true",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "train_dpo.py"), "--config", str(REPO_ROOT / "dpo_config" / "demo_qwen2_vl.yaml"),
               "--working", str(working), *overrides]  # fmt: skip
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, (working / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 8 and losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    assert (working / "adapter" / "adapter_model.safetensors").is_file() and (working / "FINISHED").is_file()


def test_qwen2_vl_adapter_merges_and_evaluates_like_the_trainer(data, tmp_path):
    """merge_lora and evaluate_pairs serve the transformers-native families: the merged folder scores like base +
    adapter, and the held-out summary equals the trainer's own final evaluation."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from silkie.tools.evaluate import evaluate_run
    from silkie.tools.merge import merge_adapter

    model_dir = BUILDERS["qwen2_vl"](tmp_path / "tiny-qwen2-vl")
    working = tmp_path / "run"
    extra = ["training.max_steps=10", "data.eval_fraction=0.2", "training.eval_strategy=steps"]
    extra.append("training.eval_steps=10")
    final = train("qwen2_vl", model_dir, data, working, extra)
    result = evaluate_run(working, device="cpu")
    assert result["split_size"] == result["summary"]["n_pairs"] > 0
    assert result["summary"]["rewards/accuracies"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert result["summary"]["rewards/chosen"] == pytest.approx(final["eval_rewards/chosen"], abs=1e-5)

    merged = merge_adapter(model_dir, working / "adapter", tmp_path / "merged", dtype=torch.float32)
    assert merged.shards and (merged.out_dir / "tokenizer.json").is_file()
    base = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    batch, pad = family_batch(model_dir, "qwen2_vl", base)
    with torch.no_grad():
        tuned = score_answers(PeftModel.from_pretrained(base, working / "adapter").eval(), batch, StepOptions(), pad)
        folded = AutoModelForImageTextToText.from_pretrained(merged.out_dir).eval()
        direct = score_answers(folded, batch, StepOptions(), pad)
    torch.testing.assert_close(direct.chosen_logps, tuned.chosen_logps, atol=1e-4, rtol=0)
    # chat streams the same greedy answer as generate() on the same inputs, for the base and the DPO model
    from PIL import Image

    from silkie.tools.chat import GenerationOptions, chat_once
    from silkie.tools.chat_inputs import family_inputs

    image = tmp_path / "red.png"
    Image.new("RGB", (60, 80), "red").save(image)
    pieces: list[str] = []
    options = GenerationOptions(max_new_tokens=6)
    question = "What colour is it?"
    adapter = working / "adapter"
    answers = chat_once(model_dir, image, question, adapter, options, True, device="cpu", write=pieces.append)
    assert set(answers) == {"base", "dpo"} and answers["dpo"] in "".join(pieces)
    tokenizer, ids, images = family_inputs(model_dir, working / "adapter", base.config, [image], [], question)
    dpo = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), working / "adapter").eval()
    with torch.no_grad():
        out = dpo.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **images, max_new_tokens=6,
                           do_sample=False, eos_token_id=[tokenizer.eos_token_id])  # fmt: skip
    assert answers["dpo"] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
