"""TR-DPO (`dpo.sync_ref_model`): the reference moves toward the policy every `ref_model_sync_steps` steps, under
LoRA (a snapshot of the adapters) and full fine-tuning (the frozen copy); its state is in every checkpoint and a
resumed run goes on from it; the combinations it cannot serve are refused naming the keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from silkie.config import load_recipe
from silkie.errors import InputError, RecipeError
from silkie.run_dir import REFERENCE_SYNC_NAME
from silkie.train.reference_sync import AdapterSnapshotReference, ReferenceSync, mix_toward

from .train_fixtures import DEMO_RECIPE, FAST, asset_overrides, read_metrics, run_in_process

# every step logged and saved, no warm-up (a first step at learning rate 0 would leave the policy where it began)
STEPS = FAST + ["data.max_prompts=16", "training.warmup_ratio=0.0", "training.save_steps=1",
                "training.save_total_limit=null"]  # fmt: skip


def step_rewards(working) -> dict[int, float]:
    return {r["step"]: r["rewards/chosen"] for r in read_metrics(working) if "loss" in r and "train_runtime" not in r}


def test_mix_toward_is_the_tr_dpo_update():
    target = torch.tensor([0.0, 2.0, -1.0])
    mix_toward(target, torch.tensor([1.0, 1.0, 1.0]), 0.6)
    assert torch.allclose(target, torch.tensor([0.6, 1.4, 0.2]))
    mix_toward(target, torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64), 1.0)  # alpha 1: the hard update
    assert torch.equal(target, torch.tensor([5.0, 6.0, 7.0]))


def test_the_snapshot_is_swapped_in_and_the_policy_gets_its_exact_values_back(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model[1].requires_grad_(False)  # frozen: not part of the snapshot
    reference = AdapterSnapshotReference(model)
    assert sorted(reference.snapshot) == ["0.bias", "0.weight"]
    start = model[0].weight.detach().clone()
    with torch.no_grad():  # an optimizer step
        model[0].weight.add_(1.0)
    sync = ReferenceSync(reference, alpha=0.5, every=3)
    assert [sync.due(step) for step in (0, 1, 3, 4, 6)] == [False, False, True, False, True]
    sync.update(model)
    assert torch.allclose(reference.snapshot["0.weight"], start + 0.5)
    policy_weight = model[0].weight.detach().clone()
    loss = (model[1](model[0](torch.ones(1, 3))) ** 2).sum()  # the policy's forward: autograd saves its tensors
    with reference.swapped_in(model):  # then the reference pass, without dropout
        assert torch.allclose(model[0].weight, start + 0.5) and not torch.allclose(model[0].weight, policy_weight)
        assert not model.training and not model[2].training
    assert torch.equal(model[0].weight, policy_weight) and model.training and model[2].training
    loss.backward()  # the swap left the saved tensors' versions, and values, as the forward saw them
    hidden = model[0](torch.ones(1, 3)).detach()
    expected = 2 * (model[1](hidden) @ model[1].weight) * 1.0  # d/dW0 of sum((W1 (W0 x + b0) + b1)^2)
    assert torch.allclose(model[0].weight.grad, expected.T @ torch.ones(1, 3))
    sync.save(tmp_path)  # a saved reference goes back only into a model of the same shapes
    other = ReferenceSync(AdapterSnapshotReference(torch.nn.Sequential(torch.nn.Linear(4, 2))), 0.5, 3)
    with pytest.raises(InputError, match=r"the saved TR-DPO reference has shape \(2, 3\) for 0.weight \(expected "
                                         r"shape \(2, 4\)\)"):  # fmt: skip
        other.load(tmp_path)
    reference.snapshot["0.weight"].zero_()
    sync.load(tmp_path)
    assert torch.allclose(reference.snapshot["0.weight"], start + 0.5)


@pytest.mark.parametrize("lora, dtype", [("true", "fp32"), ("false", "fp32"), ("true", "bf16")])
def test_a_hard_update_makes_the_next_step_s_rewards_zero(lora, dtype, assets, tmp_path):
    # rewards are beta x (policy - reference) before the step's update: 0 at step 1 (both start alike); with
    # alpha 1 every 2 steps the reference becomes the policy after steps 2 and 4, so steps 3 and 5 score 0 too.
    # bf16: the step runs under autocast, whose cached bf16 copies of the adapters must not leak between passes
    common = asset_overrides(assets) + STEPS + [f"lora.enabled={lora}", "training.max_steps=5", f"model.dtype={dtype}"]
    if lora == "false":
        common.append("training.learning_rate=1e-4")
    run_in_process(tmp_path / "plain", common)
    synced = ["dpo.sync_ref_model=true", "dpo.ref_model_sync_steps=2", "dpo.ref_model_mixup_alpha=1.0"]
    run_in_process(tmp_path / "tr", common + synced)
    plain, moving = step_rewards(tmp_path / "plain"), step_rewards(tmp_path / "tr")
    assert plain[1] == pytest.approx(0.0, abs=1e-6) and moving[1] == pytest.approx(0.0, abs=1e-6)
    assert moving[2] == pytest.approx(plain[2], rel=1e-5) and abs(moving[2]) > 1e-4  # before the first update
    for step in (3, 5):
        assert abs(plain[step]) > 1e-4 and moving[step] == pytest.approx(0.0, abs=1e-6), step
    assert abs(moving[4]) > 1e-4
    saved = load_file(tmp_path / "tr" / "checkpoint-4" / REFERENCE_SYNC_NAME)
    assert saved and all(torch.isfinite(tensor).all() for tensor in saved.values())
    assert not (tmp_path / "plain" / "checkpoint-4" / REFERENCE_SYNC_NAME).exists()
    if dtype == "bf16":
        return
    card = (tmp_path / "tr" / "adapter" / "README.md").read_text()
    assert "; TR-DPO (reference moved every 2 steps, alpha 1.0) |" in card


def test_a_soft_update_mixes_the_adapters_and_a_resume_goes_on_from_the_saved_reference(assets, tmp_path):
    alpha = 0.6
    synced = ["dpo.sync_ref_model=true", "dpo.ref_model_sync_steps=1", f"dpo.ref_model_mixup_alpha={alpha}"]
    overrides = asset_overrides(assets) + STEPS + ["training.max_steps=4", *synced]
    straight = tmp_path / "straight"
    run_in_process(straight, overrides)

    def reference(step: int) -> dict[str, torch.Tensor]:
        return load_file(straight / f"checkpoint-{step}" / REFERENCE_SYNC_NAME)

    def adapter(step: int) -> dict[str, torch.Tensor]:  # the snapshot's names carry peft's adapter name
        saved = load_file(straight / f"checkpoint-{step}" / "adapter_model.safetensors")
        return {name.replace(".weight", ".default.weight"): tensor for name, tensor in saved.items()}

    first, second, policy_1, policy_2 = reference(1), reference(2), adapter(1), adapter(2)
    assert set(first) == set(policy_1) and any("lora_B" in name for name in first)
    for name, tensor in first.items():
        if "lora_B" in name:  # B starts at zero: after one update the reference's B is alpha x the policy's
            assert torch.allclose(tensor, alpha * policy_1[name], atol=1e-7), name
        assert torch.allclose(second[name], alpha * policy_2[name] + (1 - alpha) * tensor, atol=1e-7), name

    resumed = tmp_path / "resumed"  # as if killed after checkpoint-2 was saved
    shutil.copytree(straight, resumed)
    for name in ("checkpoint-3", "checkpoint-4", "adapter"):
        shutil.rmtree(resumed / name)
    for name in ("FINISHED", "final_metrics.json", "training_curves.png"):
        (resumed / name).unlink()
    result = run_in_process(resumed, overrides)
    assert result["resumed_at_step"] == 2
    again = load_file(resumed / "checkpoint-4" / REFERENCE_SYNC_NAME)
    for name, tensor in load_file(straight / "checkpoint-4" / REFERENCE_SYNC_NAME).items():
        assert torch.allclose(again[name], tensor, atol=1e-6), name
    rewards, rewards_again = step_rewards(straight), step_rewards(resumed)
    for step in (3, 4):
        assert rewards_again[step] == pytest.approx(rewards[step], abs=1e-5), step

    (resumed / "checkpoint-4" / REFERENCE_SYNC_NAME).unlink()  # a checkpoint without it cannot go on
    from silkie.train.build import build_trainer

    built = build_trainer(load_recipe(DEMO_RECIPE, overrides), tmp_path / "scratch", bookkeeping=False)
    with pytest.raises(InputError, match=rf"resumed/checkpoint-4/{REFERENCE_SYNC_NAME} is missing: the checkpoint"):
        built.trainer.reference_sync.load(resumed / "checkpoint-4")


def test_what_tr_dpo_cannot_serve_is_refused_naming_the_keys(assets, tmp_path):
    common = asset_overrides(assets) + FAST + ["dpo.sync_ref_model=true"]
    refusals = {
        "dpo.precompute_ref_log_probs=true": "set dpo.precompute_ref_log_probs=false",
        "dpo.loss_type=simpo": "dpo.sync_ref_model: the loss 'simpo' reads no reference model",
        f"model.ref_model={assets['model']}": "cannot start from model.ref_model",
        "dpo.ref_model_mixup_alpha=0": r"dpo.ref_model_mixup_alpha = 0 is not allowed; expected a number in \(0, 1\]",
        "dpo.ref_model_sync_steps=0": "dpo.ref_model_sync_steps = 0 is not allowed",
    }
    for override, message in refusals.items():
        with pytest.raises(RecipeError, match=message):
            load_recipe(DEMO_RECIPE, [*common, override, "dpo.beta=2"])
    with pytest.raises(RecipeError, match=r"'dpo.ref_model_sync_step' \(did you mean 'ref_model_sync_steps'"):
        load_recipe(DEMO_RECIPE, [*common, "dpo.ref_model_sync_step=4"])
    with pytest.raises(RecipeError, match=r"training.sync_ref_model.*did you mean 'dpo.sync_ref_model'"):
        load_recipe(DEMO_RECIPE, [*common, "training.sync_ref_model=true"])
    recipe = load_recipe(DEMO_RECIPE, [*asset_overrides(assets), "dpo.ref_model_sync_steps=64"])
    note = "dpo.ref_model_sync_steps is set, but only dpo.sync_ref_model: true (TR-DPO) reads it"
    assert recipe.dpo.notes() == [note]
    # a finished policy (silkie evaluate) is scored against the model it started from: no moving reference
    from silkie.models.loading import build_policy
    from silkie.train.build import build_trainer

    recipe = load_recipe(DEMO_RECIPE, [*common, "training.max_steps=1", "data.max_prompts=8"])
    policy = build_policy(recipe.model, recipe.lora)
    assert build_trainer(recipe, tmp_path / "scored", bookkeeping=False, policy=policy).trainer.reference_sync is None
    assert build_trainer(recipe, tmp_path / "trained", bookkeeping=False).trainer.reference_sync is not None


def test_under_zero3_on_two_processes_the_adapter_snapshot_is_gathered_and_spread_back(assets, tmp_path):
    """ZeRO-3 partitions the adapters: the swap writes the snapshot through a gather on rank 0 (spread back to both
    ranks' partitions) and restores it after the reference pass; a hard update every 2 steps gives steps 3 and 5
    rewards 0, and the saved snapshot's B is the policy's after step 2."""
    import subprocess
    import sys

    from silkie.config.cluster import DeepSpeedSection
    from silkie.train.arguments import deepspeed_config

    from .conftest import REPO_ROOT
    from .train_fixtures import subprocess_env

    config = deepspeed_config(DeepSpeedSection(stage=3))
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the tiny adapters partitioned too
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    working = tmp_path / "zero3"
    overrides = asset_overrides(assets) + STEPS + [
        f"deepspeed.config={tmp_path / 'zero3.json'}", "training.max_steps=5",
        "training.per_device_train_batch_size=4", "data.max_prompts=32",
        "dpo.sync_ref_model=true", "dpo.ref_model_sync_steps=2", "dpo.ref_model_mixup_alpha=1.0",
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "train_dpo.py"), "--config", str(DEMO_RECIPE), "--working", str(working),
               *overrides]  # fmt: skip
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rewards = step_rewards(working)
    assert [abs(rewards[step]) > 1e-4 for step in (2, 4)] == [True, True]
    assert [rewards[step] for step in (1, 3, 5)] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    snapshot = load_file(working / "checkpoint-3" / REFERENCE_SYNC_NAME)
    policy = load_file(working / "checkpoint-2" / "adapter_model.safetensors")
    assert len(snapshot) == len(policy) > 0
    for name, tensor in policy.items():
        assert torch.equal(snapshot[name.replace(".weight", ".default.weight")], tensor), name
