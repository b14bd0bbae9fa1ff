"""Diffusion-DPO loss against hand-computed values (docs/methods/dpo.md#diffusion-dpo-loss)."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.adapters import ADAPTERS
from diffalign.losses import diffusion_dpo_loss, diffusion_sft_loss, dpo_loss_from_mse


# Two pairs, per-sample tensors of 2 elements. Errors are measured against targets 3 (winners) and -1 (losers):
#   mse_w = [mean(1, 1), mean(0, 4)] = [1, 2]        ref_mse_w = [mean(1, 9), mean(1, 1)] = [5, 1]
#   mse_l = [mean(4, 0), mean(1, 1)] = [2, 1]        ref_mse_l = [mean(0, 0), mean(4, 4)] = [0, 4]
TARGET_W, TARGET_L = 3.0, -1.0
ERR_W = [[1.0, -1.0], [0.0, 2.0]]
ERR_L = [[2.0, 0.0], [1.0, -1.0]]
REF_ERR_W = [[1.0, 3.0], [-1.0, 1.0]]
REF_ERR_L = [[0.0, 0.0], [2.0, -2.0]]


def _pairs():
    def t(err, offset):
        return torch.tensor(err) + offset

    return dict(
        model_pred_w=t(ERR_W, TARGET_W),
        model_pred_l=t(ERR_L, TARGET_L),
        ref_pred_w=t(REF_ERR_W, TARGET_W),
        ref_pred_l=t(REF_ERR_L, TARGET_L),
        target_w=torch.full((2, 2), TARGET_W),
        target_l=torch.full((2, 2), TARGET_L),
    )


def test_hand_computed_value():
    beta = 0.5
    # inside_0 = -0.5 * 0.5 * ((1 - 5) - (2 - 0)) = 1.5;  inside_1 = -0.25 * ((2 - 1) - (1 - 4)) = -1.0
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.0))) / 2
    loss, m = diffusion_dpo_loss(**_pairs(), beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert m["implicit_acc"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx((1.5 - 1.0) / 2)
    assert m["mse_w"].item() == pytest.approx(1.5)
    assert m["mse_l"].item() == pytest.approx(1.5)
    assert m["ref_mse_w"].item() == pytest.approx(3.0)
    assert m["ref_mse_l"].item() == pytest.approx(2.0)
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())


def test_from_mse_matches_the_full_loss():
    loss, _ = dpo_loss_from_mse(
        torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]), torch.tensor([5.0, 1.0]), torch.tensor([0.0, 4.0]), 0.5
    )
    assert loss.item() == pytest.approx(diffusion_dpo_loss(**_pairs(), beta=0.5)[0].item(), rel=1e-6)


def test_policy_equal_to_reference_gives_ln2_and_half_accuracy():
    g = torch.Generator().manual_seed(0)
    pred_w, pred_l, tgt_w, tgt_l = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(4))
    loss, m = diffusion_dpo_loss(pred_w, pred_l, pred_w.clone(), pred_l.clone(), tgt_w, tgt_l, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert m["implicit_acc"].item() == 0.5  # ties count one half
    assert m["reward_margin"].item() == 0.0


def test_gradient_sign_lowering_the_winner_error_lowers_the_loss():
    mse_w = torch.tensor([0.3, 0.2], requires_grad=True)
    mse_l = torch.tensor([0.25, 0.4], requires_grad=True)
    loss, _ = dpo_loss_from_mse(mse_w, mse_l, torch.tensor([0.3, 0.3]), torch.tensor([0.3, 0.3]), beta=10.0)
    loss.backward()
    assert (mse_w.grad > 0).all() and (mse_l.grad < 0).all()

    # The same through the predictions: move the winner prediction towards its target.
    pairs = _pairs()
    before = diffusion_dpo_loss(**pairs, beta=0.5)[0]
    pairs["model_pred_w"] = pairs["target_w"] + 0.9 * (pairs["model_pred_w"] - pairs["target_w"])
    assert diffusion_dpo_loss(**pairs, beta=0.5)[0] < before


def test_reference_gets_no_gradient():
    pairs = {k: v.clone().requires_grad_(True) for k, v in _pairs().items()}
    loss, _ = diffusion_dpo_loss(**pairs, beta=0.5)
    loss.backward()
    assert pairs["model_pred_w"].grad is not None and pairs["model_pred_l"].grad is not None
    assert pairs["ref_pred_w"].grad is None and pairs["ref_pred_l"].grad is None


def test_sft_term_adds_weight_times_winner_error():
    base, _ = diffusion_dpo_loss(**_pairs(), beta=0.5)
    loss, m = diffusion_dpo_loss(**_pairs(), beta=0.5, sft_weight=0.2)
    assert (loss - base).item() == pytest.approx(0.2 * 1.5, rel=1e-6)  # mean(mse_w) = 1.5
    assert m["sft_loss"].item() == pytest.approx(1.5)
    assert m["dpo_loss"].item() == pytest.approx(base.item())


def test_sft_loss_is_plain_mse():
    pred, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert diffusion_sft_loss(pred, target).item() == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-6)


def test_diffusers_beta_convention_is_half():
    """diffusers' research script uses -logsigmoid(b * (ref_diff - model_diff)): our beta = 2 b."""
    mse_w, mse_l, ref_w, ref_l = torch.rand(4, 6).unbind(0)
    b = 1.7
    diffusers = -F.logsigmoid(b * ((ref_w - ref_l) - (mse_w - mse_l))).mean()
    ours, _ = dpo_loss_from_mse(mse_w, mse_l, ref_w, ref_l, beta=2 * b)
    assert ours.item() == pytest.approx(diffusers.item(), rel=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        diffusion_dpo_loss(*(torch.zeros(2, 3),) * 5, torch.zeros(2, 4), beta=1.0)


def test_default_betas():
    betas = {adapter.family: adapter.default_dpo_beta for adapter in ADAPTERS}
    assert betas == {"sd": 5000.0, "sdxl": 5000.0} | dict.fromkeys(
        ["sd3", "flux", "flux_kontext", "flux2", "qwenimage", "zimage", "sana"], 100.0
    )


def test_smoothed_pair_beta_by_hand():
    from diffalign.losses import smoothed_pair_beta

    # p = sigmoid(gap / T): gap 0 -> p 0.5 -> beta 0; gap T -> p = sigmoid(1)
    beta = smoothed_pair_beta(100.0, torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), temperature=2.0, scale=10.0)
    p = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(beta, torch.tensor([0.0, 100.0 * 10 * (2 * p - 1)]))


def test_anchored_loss_by_hand():
    """SePPO: pair 0, the policy fits the winner better than the reference (s = +1: plain DPO against the reference
    sample); pair 1, the reference fits it better (s = -1: the reference sample's term flips; indicator: dropped)."""
    from diffalign.losses import anchored_dpo_loss_from_mse

    mse_w, ref_w = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])  # deltas -1, +1
    mse_r, ref_r = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 3.0])  # deltas +3, -2
    beta = 0.5

    def nll(inside):
        return math.log1p(math.exp(-inside))

    # sign: inside_0 = -0.25 * (-1 - 3) = 1; inside_1 = -0.25 * (1 - (-1)(-2)) = -0.25 * (1 - 2) = 0.25
    loss, metrics = anchored_dpo_loss_from_mse(mse_w, mse_r, ref_w, ref_r, beta)
    assert loss.item() == pytest.approx((nll(1.0) + nll(0.25)) / 2)
    assert metrics["flipped"].item() == 0.5 and metrics["mse_l"].item() == 2.5
    # indicator: inside_1 = -0.25 * (1 - 0) = -0.25
    loss, _ = anchored_dpo_loss_from_mse(mse_w, mse_r, ref_w, ref_r, beta, anchor="indicator")
    assert loss.item() == pytest.approx((nll(1.0) + nll(-0.25)) / 2)
    # with s = +1 everywhere it is Diffusion-DPO
    plain, _ = dpo_loss_from_mse(mse_w[:1], mse_r[:1], ref_w[:1], ref_r[:1], beta)
    assert anchored_dpo_loss_from_mse(mse_w[:1], mse_r[:1], ref_w[:1], ref_r[:1], beta)[0].item() == plain.item()
    # the sign carries no gradient: d loss / d mse_r of the flipped pair is the flipped DPO gradient
    mse_r = mse_r.clone().requires_grad_(True)
    anchored_dpo_loss_from_mse(mse_w, mse_r, ref_w, ref_r, beta)[0].backward()
    assert mse_r.grad[0] < 0 < mse_r.grad[1]  # descent raises the error on r in pair 0, lowers it in pair 1
    with pytest.raises(ValueError, match="anchor"):
        anchored_dpo_loss_from_mse(mse_w, mse_r, ref_w, ref_r, beta, anchor="other")
