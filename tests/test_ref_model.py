"""`model.ref_model`: another checkpoint as the frozen reference (TRL's, LLaMA-Factory's and ms-swift's `ref_model`),
under LoRA as under full fine-tuning; one that cannot score the policy's token ids is refused naming it."""

from __future__ import annotations

import shutil

import pytest

from silkie.config import load_recipe
from silkie.errors import InputError, RecipeError

from .train_fixtures import DEMO_RECIPE, FAST, asset_overrides, read_metrics, run_in_process


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A tiny Qwen-VL of the demo's vocabulary with other weights (seed 1)."""
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("reference") / "tiny-qwen-vl-seed1", seed=1)


def first_rewards(working) -> float:
    records = [r for r in read_metrics(working) if "loss" in r and "train_runtime" not in r]
    return records[0]["rewards/chosen"]


@pytest.mark.parametrize("lora", ["true", "false"])
def test_the_reference_is_the_named_checkpoint(lora, assets, other_checkpoint, tmp_path):
    # the first step's rewards are beta x (policy - reference) before any update: 0 when the reference holds the
    # policy's starting weights (LoRA's zero update, or a copy of the folder), not 0 for another checkpoint's
    common = asset_overrides(assets) + FAST + ["training.max_steps=1", "data.max_prompts=8", f"lora.enabled={lora}"]
    same = tmp_path / "same-weights"
    shutil.copytree(assets["model"], same)
    run_in_process(tmp_path / "same", [*common, f"model.ref_model={same}"])
    assert first_rewards(tmp_path / "same") == pytest.approx(0.0, abs=1e-6)
    run_in_process(tmp_path / "other", [*common, f"model.ref_model={other_checkpoint}",
                                        "dpo.precompute_ref_log_probs=true"])  # fmt: skip
    assert abs(first_rewards(tmp_path / "other")) > 1e-3
    import torch

    table = torch.load(tmp_path / "other" / "reference_logps" / "train.pt", weights_only=True)
    assert torch.isfinite(table["logps"]).all() and table["logps"].shape[1] == 2
    if lora == "true":  # silkie evaluate scores against the run's reference, or says where it went
        from silkie.tools.cli import ToolError
        from silkie.tools.evaluate import evaluate_run

        moved = same.rename(tmp_path / "moved")
        with pytest.raises(ToolError, match=r"model.ref_model: .*same-weights does not exist.*pass --ref-model"):
            evaluate_run(tmp_path / "same", split="train", max_pairs=4, device="cpu")
        result = evaluate_run(tmp_path / "same", split="train", max_pairs=4, device="cpu", ref_model_dir=moved)
        assert result["summary"]["n_pairs"] == 4 and "ref_logps/chosen" in result["pairs"][0]


def test_a_reference_that_cannot_score_the_policy_s_ids_is_refused(assets, tmp_path):
    from silkie.dev.tiny_hf_vlm import build_tiny_qwen2_vl
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint
    from silkie.launch.preflight import missing_inputs
    from silkie.train.build import build_trainer

    common = asset_overrides(assets) + FAST + ["training.max_steps=1"]
    smaller = build_tiny_checkpoint(tmp_path / "small", corpus=["red circle blue square"] * 3)  # fewer merges
    with pytest.raises(InputError, match=r"model.ref_model: .*small has 512 token embeddings, model.path 640"):
        build_trainer(load_recipe(DEMO_RECIPE, [*common, f"model.ref_model={smaller}"]), tmp_path / "run")
    renumbered = tmp_path / "renumbered"  # as many embeddings, but a token's id means another token
    shutil.copytree(assets["model"], renumbered)
    ranks = (renumbered / "qwen.tiktoken").read_text().splitlines()
    (renumbered / "qwen.tiktoken").write_text("\n".join([ranks[1].split()[0] + " 0", ranks[0].split()[0] + " 1",
                                                         *ranks[2:]]) + "\n")  # fmt: skip
    with pytest.raises(InputError, match="renumbered's tokenizer has another vocabulary than model.path's"):
        build_trainer(load_recipe(DEMO_RECIPE, [*common, f"model.ref_model={renumbered}"]), tmp_path / "run2")
    qwen2 = build_tiny_qwen2_vl(tmp_path / "qwen2")
    recipe = load_recipe(DEMO_RECIPE, [*common, f"model.ref_model={qwen2}"])
    assert any(f"model.ref_model: {qwen2} holds a 'qwen2_vl' checkpoint" in line for line in missing_inputs(recipe))
    recipe = load_recipe(DEMO_RECIPE, [*common, "model.ref_model=nowhere/at-all-x"])
    assert any(line.startswith("model.ref_model: nowhere/at-all-x") for line in missing_inputs(recipe))
    with pytest.raises(RecipeError, match="model.ref_model = .* is set, but dpo.loss_type simpo reads no reference"):
        load_recipe(DEMO_RECIPE, [*common, f"model.ref_model={smaller}", "dpo.loss_type=simpo", "dpo.beta=2"])
