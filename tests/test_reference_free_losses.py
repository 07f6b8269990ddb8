"""The reference-free losses (cpo, simpo, orpo) equal TRL 1.16's CPOTrainer and ORPOTrainer on the same log-probs,
read no reference, and train without a reference pass or a frozen copy."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from silkie.config import DPOSection, RecipeError
from silkie.config.objective import uses_reference
from silkie.dpo.losses import DPOObjective

from .train_fixtures import FAST, asset_overrides, read_metrics, run_in_process

PC, PR = torch.tensor([-10.0, -20.0, -3.0]), torch.tensor([-12.0, -15.0, -9.0])
RC, RR = torch.tensor([-11.0, -19.0, -4.0]), torch.tensor([-11.0, -16.0, -2.0])
LC, LR = torch.tensor([4.0, 10.0, 2.0]), torch.tensor([6.0, 5.0, 3.0])
NLL = torch.tensor(1.25)
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def trl_trainer(loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5):
    """The attributes TRL's `cpo_loss` / `odds_ratio_loss` read, without building a trainer."""
    return SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                           simpo_gamma=gamma, accelerator=SimpleNamespace(device="cpu"))  # fmt: skip


def objective(loss_type, **kwargs):
    return DPOObjective(loss_type=loss_type, **kwargs)(PC, PR, RC, RR, chosen_lengths=LC, rejected_lengths=LR,
                                                      chosen_nll=NLL)  # fmt: skip


def test_cpo_and_simpo_are_trls_cpo_trainer_losses():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    ours = objective("cpo", beta=0.2, label_smoothing=0.1)
    losses, chosen, rejected = CPOTrainer.cpo_loss(trl_trainer("sigmoid", 0.2, 0.1), PC, PR)
    assert ours.per_pair.tolist() == pytest.approx(losses.tolist(), rel=1e-6)
    assert ours.chosen_rewards.tolist() == pytest.approx(chosen.tolist())
    assert chosen.tolist() == pytest.approx((0.2 * PC).tolist())
    assert ours.rejected_rewards.tolist() == pytest.approx(rejected.tolist())
    ours = objective("simpo", beta=2.0, simpo_gamma=1.0)
    losses, chosen, rejected = CPOTrainer.cpo_loss(trl_trainer("simpo", 2.0, 0.0, 1.0), PC / LC, PR / LR)
    assert ours.per_pair.tolist() == pytest.approx(losses.tolist(), rel=1e-6)  # TRL averages log-probs for simpo
    assert ours.chosen_rewards.tolist() == pytest.approx(chosen.tolist())
    assert ours.rejected_rewards.tolist() == pytest.approx(rejected.tolist())
    for loss_type, trl_type, beta in (("cpo", "sigmoid", 0.2), ("simpo", "simpo", 2.0)):  # TRL's cpo_alpha 1.0
        ours = objective([loss_type, "sft"], beta=beta)
        scale = (LC, LR) if loss_type == "simpo" else (1.0, 1.0)
        losses, _, _ = CPOTrainer.cpo_loss(trl_trainer(trl_type, beta), PC / scale[0], PR / scale[1])
        assert ours.loss.item() == pytest.approx((losses.mean() + 1.0 * NLL).item(), rel=1e-6)
        assert ours.terms["nll_loss"].tolist() == pytest.approx([NLL.item()] * 3)


def test_orpo_is_trls_orpo_trainer_loss_with_its_nll():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    ours = objective("orpo", beta=0.1)
    ratio_losses, chosen, rejected, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trl_trainer(beta=0.1), PC / LC,
                                                                                  PR / LR)  # fmt: skip
    # TRL: loss = policy_nll_loss - losses.mean(), with losses = beta * logsigmoid(log odds ratio)
    assert ours.per_pair.tolist() == pytest.approx((NLL - ratio_losses).tolist(), rel=1e-6)
    assert ours.loss.item() == pytest.approx((NLL - ratio_losses.mean()).item(), rel=1e-6)
    assert ours.chosen_rewards.tolist() == pytest.approx(chosen.tolist())
    assert ours.rejected_rewards.tolist() == pytest.approx(rejected.tolist())
    assert ours.terms["log_odds_chosen"].mean().item() == pytest.approx(log_odds.item(), rel=1e-6)  # TRL's metrics
    assert ours.terms["log_odds_ratio"].mean().item() == pytest.approx(ratio.item(), rel=1e-6)
    for answers in ([0.0, -5.0], [-5.0, 0.0], [0.0, 0.0]):  # probability 1 in fp32: log_softmax gives exactly 0
        chosen, rejected = (torch.tensor([value], requires_grad=True) for value in answers)
        out = DPOObjective(loss_type="orpo")(chosen, rejected, RC[:1], RR[:1], chosen_lengths=LC[:1],
                                             rejected_lengths=LR[:1], chosen_nll=NLL)  # fmt: skip
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_the_reference_is_not_read_and_only_they_go_without_one():
    for loss_type in ("cpo", "simpo", "orpo", ["cpo", "sft"]):
        first = DPOObjective(loss_type=loss_type)(PC, PR, RC, RR, chosen_lengths=LC, rejected_lengths=LR,
                                                  chosen_nll=NLL)  # fmt: skip
        other = DPOObjective(loss_type=loss_type)(PC, PR, RC * 3, RR - 7, chosen_lengths=LC, rejected_lengths=LR,
                                                  chosen_nll=NLL)  # fmt: skip
        assert torch.equal(first.per_pair, other.per_pair) and torch.equal(first.chosen_rewards, other.chosen_rewards)
        assert not uses_reference(loss_type)
    assert uses_reference("sft") and uses_reference(["sigmoid", "simpo"]) and uses_reference("sigmoid")


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"loss_type": "simpo", "precompute_ref_log_probs": True}, "reads no reference model, so there is nothing"),
     ({"loss_type": ["cpo", "sft"], "precompute_ref_log_probs": True}, "reads no reference model"),
     ({"loss_type": "simpo", "simpo_gamma": -1.0}, "dpo.simpo_gamma = -1.0"),
     ({"loss_type": "simpo", "simpo_gamma": math.inf}, "expected a finite number >= 0"),
     ({"loss_type": "orpo", "label_smoothing": 0.1}, "expected 0 with loss types ['orpo'] (it acts on sigmoid"),
     ({"loss_type": "simpo", "ld_alpha": 0.5}, "simpo and orpo average them per token"),
     ({"loss_type": "orpo", "use_weighting": True}, "would also scale orpo's batch-level NLL")],
)  # fmt: skip
def test_the_recipe_refuses_what_they_do_not_read(settings, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        DPOSection(**settings).check()


def test_simpo_settings_that_look_wrong_are_said():
    assert DPOSection(loss_type=["orpo"], label_smoothing=0.0).notes() == []
    assert DPOSection(loss_type="simpo", beta=2.0).notes() == []
    assert "margin gamma/beta is 5 nats per answer token" in DPOSection(loss_type="simpo").notes()[0]
    assert DPOSection(simpo_gamma=1.0).notes() == ["dpo.simpo_gamma = 1.0 is set, but only dpo.loss_type simpo "
                                                   "reads it"]  # fmt: skip


def test_imageless_rewards_and_logged_log_probs_are_averaged_as_the_rewards():
    from silkie.dpo.objective import BatchScores, CorruptedScores, batch_metrics, imageless_rewards
    from silkie.dpo.step import AnswerScores

    zeros = torch.zeros(3)
    policy = AnswerScores(PC, PR, zeros, zeros, NLL, LC, LR)
    again = CorruptedScores(AnswerScores(PC - 1, PR - 2, zeros, zeros, NLL, LC, LR), zeros, zeros)
    out = objective("simpo", beta=2.0)
    chosen, rejected = imageless_rewards(BatchScores(policy, zeros, zeros, out, None, again, 2.0, True))
    assert chosen.tolist() == pytest.approx((2.0 * (PC - 1) / LC).tolist())
    assert rejected.tolist() == pytest.approx((2.0 * (PR - 2) / LR).tolist())
    # TRL's CPOTrainer (simpo) and ORPOTrainer log the averaged log-probs their rewards are beta x of
    metrics = batch_metrics(BatchScores(policy, zeros, zeros, out, None, again, 2.0, True))
    assert metrics["logps/chosen"].tolist() == pytest.approx((PC / LC).tolist())
    assert metrics["rewards/chosen"].tolist() == pytest.approx((2.0 * metrics["logps/chosen"]).tolist())
    assert metrics["logps/chosen_image_gain"].tolist() == pytest.approx([1.0] * 3)  # the gain stays a sum
    cpo = batch_metrics(BatchScores(policy, zeros, zeros, objective("cpo", beta=2.0), None, again, 2.0, False))
    assert cpo["logps/rejected"].tolist() == PR.tolist()  # cpo's (and DPO's) are sums, as TRL's


def test_simpo_trains_without_a_reference_pass_and_orpo_full_fine_tuning_without_a_copy(assets, tmp_path, monkeypatch):
    import silkie.models.loading
    from silkie.train.trainer import SilkieDPOTrainer

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss asked for the reference")

    monkeypatch.setattr(SilkieDPOTrainer, "reference_scores", no_reference)
    monkeypatch.setattr(silkie.models.loading, "build_frozen_reference", no_reference)
    common = asset_overrides(assets) + FAST + ["training.max_steps=12", "data.max_prompts=4",  # 2 batches, overfit
                                               "training.lr_scheduler_type=constant", "training.warmup_ratio=0.0"]
    held_out = ["data.eval_fraction=0.25", "training.eval_strategy=steps", "training.eval_steps=12"]
    for name, extra in (("simpo", ["dpo.loss_type=simpo", "dpo.beta=2.0", "training.learning_rate=5e-3", *held_out]),
                        ("orpo", ["dpo.loss_type=orpo", "lora.enabled=false", "training.learning_rate=2e-4"]),
                        ("cpo", ["dpo.loss_type=cpo", "dpo.beta=0.1", "training.learning_rate=2e-3",
                                 "training.max_steps=2"])):  # fmt: skip
        result = run_in_process(tmp_path / name, common + extra)
        records = [r for r in read_metrics(tmp_path / name) if "loss" in r and "train_runtime" not in r]
        assert result["step"] == len(records) and all(r["loss"] == r["loss"] for r in records)  # finite
        if name != "cpo":
            assert sum(r["loss"] for r in records[-3:]) / 3 < records[0]["loss"] - 0.02, (name, records)
        # rewards are beta x the policy's log-probs: summed (TRL's CPO), averaged per token (its SimPO, ORPO)
        beta = {"simpo": 2.0, "orpo": 0.1, "cpo": 0.1}[name]
        assert records[0]["rewards/chosen"] == pytest.approx(beta * records[0]["logps/chosen"], rel=1e-5)
    from silkie.tools.evaluate import evaluate_run

    result = evaluate_run(tmp_path / "simpo", device="cpu")  # scored as the trainer did, with no reference columns
    final = [r for r in read_metrics(tmp_path / "simpo") if "eval_loss" in r][-1]
    assert result["summary"]["rewards/accuracies"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert result["summary"]["rewards/chosen"] == pytest.approx(final["eval_rewards/chosen"], rel=1e-4)
    assert result["summary"]["logps/chosen"] == pytest.approx(final["eval_logps/chosen"], rel=1e-4)
    assert "ref_logps/chosen" not in result["pairs"][0] and "rewards/chosen" in result["pairs"][0]
