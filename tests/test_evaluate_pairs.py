"""scripts/evaluate_pairs.py on a real (tiny) trained run: rewards and losses per pair, as the trainer saw them."""

from __future__ import annotations

import json

import pytest

from tests.script_fixtures import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- evaluate_pairs ---------------------------------------------------------------------------------------------


def test_evaluate_pairs_matches_hand_computed_rewards(trained, tmp_path):
    from silkie.config import load_recipe
    from silkie.data.build import build_pairs, prepare_data
    from silkie.data.collator import PairCollator
    from silkie.dpo.losses import DPOObjective
    from silkie.dpo.step import StepOptions, score_answers
    from silkie.models.qwen_vl import QWenTokenizer, QWenVLImageProcessor
    from silkie.tools.common import load_model

    out = tmp_path / "eval.json"
    argv = ["--run", str(trained.run_dir), "--batch-size", "5", "--out", str(out), "--per-pair", "--device", "cpu"]
    assert load_script("evaluate_pairs").main(argv) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]

    recipe = load_recipe(trained.run_dir / "config.yaml")
    _, eval_pairs, _, _ = build_pairs(recipe.data)
    assert result["split_size"] == summary["n_pairs"] == len(eval_pairs) == len(result["pairs"]) > 5
    assert 0.0 <= summary["rewards/accuracies"] <= 1.0
    assert result["beta"] == recipe.dpo.beta

    # two batches by hand, with the plain (unpacked, full-logits) scoring path
    tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    data = prepare_data(recipe.data, tokenizer, recipe.dpo.max_length, tmp_path / "cache")
    collator = PairCollator(data.image_store, QWenVLImageProcessor(56), tokenizer.pad_token_id)
    model = load_model(trained.model_dir, trained.adapter_dir)
    plain = StepOptions(image_once=False, share_prompt=False, chunked_logps=False)
    by_index = {row["pair_index"]: row for row in result["pairs"]}
    for start in (0, 5):
        batch = collator([data.eval[i] for i in range(start, start + 5)])
        policy = score_answers(model, batch, plain, tokenizer.pad_token_id, no_grad=True)
        with model.disable_adapter():
            ref = score_answers(model, batch, plain, tokenizer.pad_token_id, no_grad=True)
        loss = DPOObjective(beta=0.1)(policy.chosen_logps, policy.rejected_logps, ref.chosen_logps, ref.rejected_logps)
        for k, index in enumerate(batch["pair_index"].tolist()):
            row = by_index[index]
            assert row["rewards/chosen"] == pytest.approx(loss.chosen_rewards[k].item(), abs=1e-5)
            assert row["rewards/rejected"] == pytest.approx(loss.rejected_rewards[k].item(), abs=1e-5)
            assert row["logps/chosen"] == pytest.approx(policy.chosen_logps[k].item(), abs=1e-3)
            assert row["loss"] == pytest.approx(loss.per_pair[k].item(), abs=1e-5)

    margins = [row["rewards/chosen"] - row["rewards/rejected"] for row in result["pairs"]]
    assert summary["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-9)
    assert summary["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    # the trainer's final evaluation (batches of 5 pairs, the last one partial) saw the same numbers
    assert len(margins) % 5 != 0
    records = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    final_eval = [record for record in records if "eval_loss" in record][-1]
    assert summary["rewards/accuracies"] == pytest.approx(final_eval["eval_rewards/accuracies"], abs=1e-6)
    assert summary["rewards/chosen"] == pytest.approx(final_eval["eval_rewards/chosen"], abs=1e-5)
    assert summary["loss"] == pytest.approx(final_eval["eval_loss"], abs=1e-5)


def test_evaluate_pairs_leaves_per_pair_loss_empty_for_batch_level_losses(trained, tmp_path):
    """aot's per-pair values are ranks within a batch: the per-pair table leaves `loss` empty, the summary keeps the
    mean over pairs (the trainer's eval_loss)."""
    from silkie.config import load_recipe, save_recipe
    from silkie.tools.evaluate import evaluate_run

    run = tmp_path / "aot_run"
    run.mkdir()
    save_recipe(load_recipe(trained.run_dir / "config.yaml", ["dpo.loss_type=aot"]), run / "config.yaml")
    result = evaluate_run(run, adapter_dir=trained.run_dir / "adapter", batch_size=4, device="cpu", max_pairs=8)
    assert len(result["pairs"]) == 8 and all(row["loss"] is None for row in result["pairs"])
    assert all(isinstance(row["rewards/chosen"], float) for row in result["pairs"])
    assert 0.0 < result["summary"]["loss"] < 5.0


def test_evaluate_pairs_scores_ld_dpo_and_wpo_as_the_trainer(trained, tmp_path):
    """With `ld_alpha` and `use_weighting` the per-pair log-probs are LD-weighted (policy and reference) and the
    loss is WPO-weighted, as in training: checked against the plain scoring path by hand."""

    from silkie.config import load_recipe, save_recipe
    from silkie.data.build import prepare_data
    from silkie.data.collator import PairCollator
    from silkie.dpo.losses import DPOObjective
    from silkie.dpo.objective import loss_from_scores
    from silkie.dpo.step import StepOptions, score_answers
    from silkie.models.qwen_vl import QWenTokenizer, QWenVLImageProcessor
    from silkie.tools.common import load_model
    from silkie.tools.evaluate import evaluate_run

    run = tmp_path / "ld_wpo_run"
    run.mkdir()
    recipe = load_recipe(trained.run_dir / "config.yaml", ["dpo.ld_alpha=0.3", "dpo.use_weighting=true"])
    save_recipe(recipe, run / "config.yaml")
    result = evaluate_run(run, adapter_dir=trained.run_dir / "adapter", batch_size=3, device="cpu", max_pairs=6)
    plain_result = evaluate_run(
        trained.run_dir, adapter_dir=trained.run_dir / "adapter", batch_size=3, device="cpu", max_pairs=6
    )

    tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    data = prepare_data(recipe.data, tokenizer, recipe.dpo.max_length, tmp_path / "cache")
    collator = PairCollator(data.image_store, QWenVLImageProcessor(56), tokenizer.pad_token_id)
    model = load_model(trained.model_dir, trained.adapter_dir)
    plain = StepOptions(image_once=False, share_prompt=False, chunked_logps=False, ld_alpha=0.3, wpo_weights=True)
    batch = collator([data.eval[i] for i in range(6)])
    policy = score_answers(model, batch, plain, tokenizer.pad_token_id, no_grad=True, policy=True)
    with model.disable_adapter():
        ref = score_answers(model, batch, plain, tokenizer.pad_token_id, no_grad=True)
    loss = loss_from_scores(
        policy, ref.chosen_logps, ref.rejected_logps, DPOObjective.from_section(recipe.dpo), batch["pair_weight"]
    )
    assert policy.wpo_weight is not None and (policy.wpo_weight != 1.0).all()
    rows = {row["pair_index"]: row for row in result["pairs"]}
    plain_rows = {row["pair_index"]: row for row in plain_result["pairs"]}
    longer = 0
    for k, index in enumerate(batch["pair_index"].tolist()):
        row = rows[index]
        assert row["logps/chosen"] == pytest.approx(policy.chosen_logps[k].item(), abs=1e-3)
        assert row["ref_logps/rejected"] == pytest.approx(ref.rejected_logps[k].item(), abs=1e-3)
        assert row["loss"] == pytest.approx(loss.per_pair[k].item(), abs=1e-5)
        # only the longer answer's tail is down-weighted (its log-prob rises towards 0)
        gains = [row[key] - plain_rows[index][key] for key in ("logps/chosen", "logps/rejected")]
        assert min(gains) == pytest.approx(0.0, abs=1e-4)
        longer += max(gains) > 1e-3
    assert longer >= 2


def test_an_unfinished_run_points_to_its_last_checkpoint(trained, tmp_path):
    import shutil

    from silkie.tools.cli import ToolError
    from silkie.tools.evaluate import evaluate_run

    run = tmp_path / "interrupted"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-12").mkdir()
    shutil.copy(trained.run_dir / "config.yaml", run / "config.yaml")
    with pytest.raises(ToolError, match=rf"adapter folder not found: {run / 'adapter'}; the run has not finished: "
                       rf"score its last checkpoint with --adapter {run / 'checkpoint-12'}$"):  # fmt: skip
        evaluate_run(run, device="cpu")


def test_the_imageless_summary_leaves_text_only_pairs_out():
    from silkie.tools.evaluate import PairTable, summarize

    table = PairTable(pair_index=[0, 1, 2], prompt_id=["a", "b", "c"])
    table.columns = {
        "rewards/chosen": [1.0, 1.0, 1.0], "rewards/rejected": [0.0, 0.0, 0.0], "loss": [0.3] * 3,
        "logps/chosen": [-1.0] * 3, "logps/rejected": [-2.0] * 3,
        # pair 1 is text only: its "imageless" preference is its real one, which says nothing about the picture
        "imageless_rewards/chosen": [0.0, 1.0, 2.0], "imageless_rewards/rejected": [1.0, 0.0, 1.0],
        "logps/chosen_image_gain": [0.5, 0.0, 1.5], "with_media": [1.0, 0.0, 1.0],
    }  # fmt: skip
    summary = summarize(table)
    assert summary["n_pairs"] == 3 and summary["n_pairs_with_media"] == 2
    assert summary["rewards/imageless_accuracies"] == 0.5 and summary["logps/chosen_image_gain"] == 1.0


def test_an_unwritable_out_is_refused_before_the_scoring_and_a_failed_write_keeps_the_table(
    trained, tmp_path, capsys, monkeypatch
):
    import silkie.tools.evaluate as evaluate

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before --out was checked")

    cli = load_script("evaluate_pairs")
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "evaluate_run", no_scoring)
        assert cli.main(["--run", str(trained.run_dir), "--out", str(tmp_path)]) == 2
        assert capsys.readouterr().err.strip() == f"error: --out {tmp_path} is a folder; expected a file"
        (tmp_path / "file").write_text("")
        assert cli.main(["--run", str(trained.run_dir), "--tasks", "mme", "--out", str(tmp_path / "file")]) == 2
        assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'file'} is a file; expected a folder"

    def full_disk(result, path, per_pair=False):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "write_json", full_disk)
    out = tmp_path / "scores.json"
    assert cli.main(["--run", str(trained.run_dir), "--out", str(out), "--max-pairs", "2", "--device", "cpu"]) == 2
    printed = capsys.readouterr()
    assert "reward accuracy" in printed.out.lower()  # the scores were shown before the write failed
    assert printed.err.strip() == f"error: {out}: No space left on device"
