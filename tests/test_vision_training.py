"""mDPO and the image diagnostics in real (tiny) runs: the corrupted view's reference log-probs are cached with the
others, the held-out metrics say whether the preference needs the picture, evaluate_pairs reports it too."""

from __future__ import annotations

import math

import pytest
import torch

from .train_fixtures import FAST, asset_overrides, read_metrics, run_in_process

SHORT = FAST + ["data.max_prompts=16", "training.max_steps=4", "training.per_device_train_batch_size=4"]
WITH_EVAL = ["data.eval_fraction=0.25", "training.eval_strategy=steps", "training.eval_steps=4"]


def test_mdpo_with_the_cached_reference_trains_as_with_the_reference_on_the_fly(assets, tmp_path):
    overrides = asset_overrides(assets) + SHORT + ["dpo.loss_type=mdpo"]
    run_in_process(tmp_path / "fly", overrides)
    run_in_process(tmp_path / "cached", overrides + ["dpo.precompute_ref_log_probs=true"])
    fly = {r["step"]: r for r in read_metrics(tmp_path / "fly") if "loss" in r}
    cached = {r["step"]: r for r in read_metrics(tmp_path / "cached") if "loss" in r}
    assert sorted(fly) == sorted(cached) == [1, 2, 3, 4]
    for step in fly:
        assert cached[step]["loss"] == pytest.approx(fly[step]["loss"], abs=1e-5)
        assert cached[step]["logps/chosen_image_gain"] == pytest.approx(fly[step]["logps/chosen_image_gain"], abs=1e-4)
    table = torch.load(tmp_path / "cached" / "reference_logps" / "train.pt", weights_only=True)["logps"]
    assert table.shape[1] == 4 and not torch.isnan(table).any()  # (chosen, rejected) with and without the picture
    assert (table[:, 0] != table[:, 2]).all()  # the corrupted picture changes the reference's log-probs
    assert fly[1]["loss"] > 3 * 0.69  # three terms at the start (policy = reference): 3 log 2 plus the DPO term's
    # each part logged on its own; at step 1 (policy = reference) every part is log 2, and they add up to the loss
    parts = [fly[1][f"loss/{name}"] for name in ("dpo", "image_conditional", "anchor")]
    assert parts == pytest.approx([math.log(2)] * 3, abs=1e-3) and sum(parts) == pytest.approx(fly[1]["loss"], abs=1e-3)


def test_every_loss_type_reports_the_imageless_accuracy_on_held_out_pairs(assets, tmp_path):
    run_in_process(tmp_path / "sigmoid", asset_overrides(assets) + SHORT + WITH_EVAL)
    records = read_metrics(tmp_path / "sigmoid")
    evaluation = [r for r in records if "eval_loss" in r][-1]
    assert 0.0 <= evaluation["eval_rewards/imageless_accuracies"] <= 1.0
    assert evaluation["eval_logps/chosen_image_gain"] != 0.0
    assert not any("rewards/imageless_accuracies" in r for r in records if "loss" in r)  # sigmoid: eval only
    run_in_process(tmp_path / "off", asset_overrides(assets) + SHORT + WITH_EVAL + ["dpo.image_diagnostics=false"])
    assert not any("eval_rewards/imageless_accuracies" in r for r in read_metrics(tmp_path / "off"))


def test_evaluate_pairs_reports_the_imageless_accuracy(trained):
    from silkie.tools.evaluate import evaluate_run, format_table

    result = evaluate_run(trained.run_dir, batch_size=4, device="cpu", max_pairs=8)
    summary = result["summary"]
    assert 0.0 <= summary["rewards/imageless_accuracies"] <= 1.0 and summary["logps/chosen_image_gain"] != 0.0
    rows = result["pairs"]
    wins = sum(r["imageless_rewards/chosen"] > r["imageless_rewards/rejected"] for r in rows) / len(rows)
    assert summary["rewards/imageless_accuracies"] == pytest.approx(wins)
    assert "imageless accuracy" in format_table(result)
    assert f"under the crop corruption, over the {len(rows)} pairs with an image" in format_table(result)
    # another corruption than the recipe's: the same pairs and real scores, other imageless ones
    blank = evaluate_run(trained.run_dir, batch_size=4, device="cpu", max_pairs=8, image_corruption="blank")
    assert blank["image_corruption"] == "blank" and "under the blank corruption" in format_table(blank)
    assert [r["logps/chosen"] for r in blank["pairs"]] == pytest.approx([r["logps/chosen"] for r in rows], abs=1e-5)
    assert blank["summary"]["logps/chosen_image_gain"] != pytest.approx(summary["logps/chosen_image_gain"], abs=1e-3)


def test_vision_keys_that_nothing_reads_are_named():
    from silkie.config import load_recipe
    from silkie.train.build import unused_vision_settings

    from .conftest import REPO_ROOT

    demo = REPO_ROOT / "dpo_config" / "demo.yaml"
    keys = ["dpo.mdpo_anchor_weight=0.5", "data.image_corruption=blank"]
    recipe = load_recipe(demo, keys)
    assert unused_vision_settings(recipe, vision_loss=False) == ["dpo.mdpo_anchor_weight = 0.5"]  # diagnostics on
    off = load_recipe(demo, [*keys, "dpo.image_diagnostics=false"])
    unused = ["dpo.mdpo_anchor_weight = 0.5", "data.image_corruption = blank"]
    assert unused_vision_settings(off, vision_loss=False) == unused
    mdpo = load_recipe(demo, ["dpo.loss_type=mdpo", "dpo.mdpo_anchor_weight=0.5"])
    assert unused_vision_settings(mdpo, vision_loss=True) == []
