"""The DPO loss function against hand-computed values for every loss type."""

from __future__ import annotations

import math

import pytest
import torch

from silkie.dpo.losses import DPOObjective

PC, PR = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
RC, RR = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -16.0])
# log-ratios: chosen (1, -1), rejected (-1, 1) -> delta (2, -2)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_matches_formula_and_rewards():
    out = DPOObjective(beta=0.1)(PC, PR, RC, RR)
    expected = [-logsigmoid(0.2), -logsigmoid(-0.2)]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])


def test_sigmoid_label_smoothing_is_cdpo():
    out = DPOObjective(beta=0.5, label_smoothing=0.2)(PC, PR, RC, RR)
    expected = [-(0.8 * logsigmoid(1.0)) - 0.2 * logsigmoid(-1.0), -(0.8 * logsigmoid(-1.0)) - 0.2 * logsigmoid(1.0)]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-6)


def test_robust():
    out = DPOObjective(beta=0.5, loss_type="robust", label_smoothing=0.1)(PC, PR, RC, RR)
    expected = [(-0.9 * logsigmoid(d) + 0.1 * logsigmoid(-d)) / 0.8 for d in (1.0, -1.0)]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-6)


def test_hinge():
    out = DPOObjective(beta=0.25, loss_type="hinge")(PC, PR, RC, RR)
    assert out.per_pair.tolist() == pytest.approx([max(0, 1 - 0.5), max(0, 1 + 0.5)])


def test_ipo_uses_length_normalised_ratios():
    lengths_c, lengths_r = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])
    out = DPOObjective(beta=0.1, loss_type="ipo")(PC, PR, RC, RR, chosen_lengths=lengths_c, rejected_lengths=lengths_r)
    avg = [1 / 2 - (-1) / 1, -1 / 4 - 1 / 2]
    assert out.per_pair.tolist() == pytest.approx([(a - 5.0) ** 2 for a in avg], rel=1e-6)


def test_sft_term_and_weights():
    nll = torch.tensor(1.5)
    out = DPOObjective(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])(PC, PR, RC, RR, chosen_nll=nll)
    expected = [-logsigmoid(0.2) + 0.75, -logsigmoid(-0.2) + 0.75]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-6)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        DPOObjective(loss_type="kto")(PC, PR, RC, RR)
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2"):
        DPOObjective(loss_type=["sigmoid", "hinge"], loss_weights=[1.0])(PC, PR, RC, RR)
    with pytest.raises(ValueError, match="ipo losses need chosen_lengths and rejected_lengths"):
        DPOObjective(loss_type="ipo")(PC, PR, RC, RR)


def test_gradient_flows_to_policy_only():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    DPOObjective(beta=0.1)(pc, pr, RC, RR).loss.backward()
    # d/dpc of -logsigmoid(b*d)/2 = -b*sigmoid(-b*d)/2
    expected = [-0.1 * (1 / (1 + math.exp(0.2))) / 2, -0.1 * (1 / (1 + math.exp(-0.2))) / 2]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-5)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-5)


def test_pair_weights_leave_pairs_out_of_the_mean():
    full = DPOObjective(beta=0.1)(PC, PR, RC, RR)
    out = DPOObjective(beta=0.1)(PC, PR, RC, RR, pair_weights=torch.tensor([0.0, 1.0]))
    assert out.loss.item() == pytest.approx(full.per_pair[1].item(), rel=1e-6) != full.loss.item()
    policy = PC.clone().requires_grad_(True)
    none = DPOObjective(beta=0.1)(policy, PR, RC, RR, pair_weights=torch.zeros(2))
    none.loss.backward()
    assert none.loss.item() == 0.0 and torch.equal(policy.grad, torch.zeros(2))  # still in the graph: grads 0


def test_aot_sorts_only_the_pairs_that_count():
    """AOT compares sorted policy log-ratio margins with sorted reference margins; a weight-0 pair (failed image)
    stays out of the sort, so the loss equals the loss of the batch without it."""
    pc, pr = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -15.0, -50.0])
    rc, rr = torch.tensor([-11.0, -19.0, -5.0]), torch.tensor([-11.0, -16.0, -5.0])
    out = DPOObjective(beta=0.5, loss_type="aot")(pc, pr, rc, rr, pair_weights=torch.tensor([1.0, 1.0, 0.0]))
    # policy margins (2, -5) sorted (-5, 2); reference margins (0, -3) sorted (-3, 0): deltas (-2, 2)
    assert out.per_pair.tolist() == pytest.approx([-logsigmoid(-1.0), -logsigmoid(1.0), 0.0], rel=1e-6)
    two = DPOObjective(beta=0.5, loss_type="aot")(pc[:2], pr[:2], rc[:2], rr[:2])
    assert out.loss.item() == pytest.approx(two.loss.item(), rel=1e-6)
    assert two.loss.item() == pytest.approx((-logsigmoid(-1.0) - logsigmoid(1.0)) / 2, rel=1e-6)


def test_f_divergence_scores():
    """forward KL: 1 - exp(-t); JS: log 2 + logsigmoid(t); alpha = 1 is the reverse KL (the plain log-ratio)."""
    out = DPOObjective(beta=1.0, f_divergence_type="forward_kl")(PC, PR, RC, RR)
    d = (1 - math.exp(-1.0)) - (1 - math.exp(1.0))  # pair 0: log-ratios chosen 1, rejected -1
    assert out.per_pair[0].item() == pytest.approx(-logsigmoid(d), rel=1e-6)
    same = DPOObjective(beta=1.0, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)(PC, PR, RC, RR)
    assert same.loss.item() == pytest.approx(DPOObjective(beta=1.0)(PC, PR, RC, RR).loss.item())
    with pytest.raises(ValueError, match="f_divergence_type 'forward_kl' needs loss types among"):
        DPOObjective(loss_type="aot", f_divergence_type="forward_kl")(PC, PR, RC, RR)
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        DPOObjective(f_divergence_type="kl")(PC, PR, RC, RR)
    with pytest.raises(ValueError, match="exo_pair loss needs label_smoothing > 0"):
        DPOObjective(loss_type="exo_pair")(PC, PR, RC, RR)


def test_wpo_sequence_weights_scale_each_pairs_loss_without_gradient():
    weights, pc = torch.tensor([0.5, 0.25], requires_grad=True), PC.clone().requires_grad_()
    plain = DPOObjective(beta=0.1, loss_type=["sigmoid", "hinge"])(PC, PR, RC, RR)
    out = DPOObjective(beta=0.1, loss_type=["sigmoid", "hinge"])(pc, PR, RC, RR, sequence_weights=weights)
    torch.testing.assert_close(out.per_pair, plain.per_pair * torch.tensor([0.5, 0.25]))
    assert out.loss.item() == pytest.approx((plain.per_pair * torch.tensor([0.5, 0.25])).mean().item())
    out.loss.backward()
    assert weights.grad is None and pc.grad.abs().sum() > 0  # WPO's weights are constants of the step
    with pytest.raises(ValueError, match="sequence_weights \\(WPO\\) do not apply to aot/aot_unpaired"):
        DPOObjective(loss_type="aot")(PC, PR, RC, RR, sequence_weights=weights)


def test_a_left_out_pair_with_a_placeholder_reference_stays_finite():
    """A pair whose image failed has weight 0 and reference 0 (cached-reference placeholder): its log-ratio of -120
    would overflow forward KL's exp(-ratio) into inf - inf = NaN; it is masked before any non-linearity."""
    pc = torch.tensor([-40.0, -120.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-45.0, -130.0]), torch.tensor([-41.0, 0.0]), torch.tensor([-44.0, 0.0])
    weights = torch.tensor([1.0, 0.0])
    out = DPOObjective(beta=0.1, f_divergence_type="forward_kl")(pc, pr, rc, rr, pair_weights=weights)
    alone = DPOObjective(beta=0.1, f_divergence_type="forward_kl")(pc[:1], pr[:1], rc[:1], rr[:1])
    assert out.loss.item() == pytest.approx(alone.loss.item(), rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(pc.grad).all() and pc.grad[1].item() == 0.0
