"""PPO-clip loss, KL to the reference and RatioNorm against closed forms (docs/methods/grpo.md#clipped-policy-loss)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffalign.losses import clipped_policy_loss, kl_to_reference, ratio_normalization
from diffalign.samplers.steps import flow_sde_step


def test_trl_closed_form():
    """TRL's DDPO test: advantage -1 at ratio 1 gives loss 1."""
    zero = torch.zeros(1)
    loss, m = clipped_policy_loss(zero, zero, torch.tensor([-1.0]), clip_range=1e-4)
    assert loss.item() == pytest.approx(1.0)
    assert m["clipfrac"].item() == 0.0


def test_on_policy_ratio_one():
    logp = torch.tensor([-1.3, 0.2, 4.0])
    adv = torch.tensor([1.0, -2.0, 3.0])
    loss, m = clipped_policy_loss(logp, logp.clone(), adv, clip_range=1e-4)
    assert loss.item() == pytest.approx(-2 / 3)
    assert m["clipfrac"].item() == 0.0 and m["approx_kl"].item() == 0.0
    assert m["ratio_mean"].item() == pytest.approx(1.0)


def test_clipping_on_both_sides():
    eps = 0.1
    old = torch.zeros(4)
    ratios = [1.5, 0.5, 1.5, 0.5]
    logp = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # max(-A r, -A clip(r)): (-1.1 | clipped), (-0.5 | unclipped), (1.5 | unclipped), (0.9 | clipped)
    loss, m = clipped_policy_loss(logp, old, adv, clip_range=eps)
    assert loss.item() == pytest.approx((-1.1 - 0.5 + 1.5 + 0.9) / 4, rel=1e-6)
    assert m["clipfrac"].item() == 1.0
    assert m["clipfrac_gt_one"].item() == 0.5 and m["clipfrac_lt_one"].item() == 0.5
    assert m["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp of -A * r = -A * r, divided by the batch; the clipped branches pass no gradient.
    assert logp.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 1.5 / 4, 0.0], abs=1e-7)


def test_advantage_clipping():
    zero = torch.zeros(2)
    loss, _ = clipped_policy_loss(zero, zero, torch.tensor([10.0, -3.0]), 1e-4, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(5.0 - 3.0) / 2)


def test_old_log_probs_and_advantages_get_no_gradient():
    logp = torch.tensor([0.1, -0.1], requires_grad=True)
    old = torch.zeros(2, requires_grad=True)
    adv = torch.ones(2, requires_grad=True)
    clipped_policy_loss(logp, old, adv, 0.2)[0].backward()
    assert logp.grad is not None and old.grad is None and adv.grad is None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes"):
        clipped_policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), 1e-4)


def test_ratio_normalization_recentres_and_keeps_gradients():
    log_ratio = torch.tensor([-0.3, -0.1, -0.2], requires_grad=True)
    out = ratio_normalization(log_ratio)
    assert out.detach().tolist() == pytest.approx([-0.1, 0.1, 0.0], abs=1e-7)
    weights = torch.tensor([1.0, 2.0, 3.0])
    (weights * out).sum().backward()
    assert log_ratio.grad.tolist() == weights.tolist()  # the subtracted mean is a constant

    scaled = ratio_normalization(torch.tensor([1.0, 3.0, 5.0, 7.0]), target_std=1e-4)
    assert scaled.std(correction=0).item() == pytest.approx(1e-4, rel=1e-5)
    assert scaled.mean().item() == pytest.approx(0.0, abs=1e-9)


def test_ratio_norm_in_the_loss():
    # A uniform shift of the log-ratio (the mean < 1 bias) is removed: ratio 1, loss -mean(A), nothing clipped.
    logp = torch.full((3,), -0.01)
    adv = torch.tensor([1.0, -1.0, 3.0])
    loss, m = clipped_policy_loss(logp, torch.zeros(3), adv, 1e-4, ratio_norm=True)
    assert loss.item() == pytest.approx(-1.0)
    assert m["clipfrac"].item() == 0.0
    assert m["approx_kl"].item() == pytest.approx(0.5 * 1e-4)  # of the raw log-ratio


# --- KL --------------------------------------------------------------------------------------------------------


def _means(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)


def test_kl_zero_for_equal_means():
    mean, _ = _means()
    for convention, step in (("true_kl", None), ("flow_grpo", 0.1)):
        kl = kl_to_reference(mean, mean.clone(), 0.3, convention=convention, step_size=step)
        assert kl.shape == (3,) and kl.abs().max().item() == 0.0


def test_true_kl_matches_torch_gaussian_kl():
    mean, ref = _means()
    std = torch.tensor([0.2, 0.5, 1.3]).view(3, 1, 1, 1)
    expected = kl_divergence(Normal(mean, std), Normal(ref, std)).mean(dim=(1, 2, 3))
    kl = kl_to_reference(mean, ref, std, convention="true_kl")
    assert torch.allclose(kl, expected, rtol=1e-5)
    # a [B] std broadcasts the same way
    assert torch.allclose(kl_to_reference(mean, ref, std.view(3), convention="true_kl"), expected, rtol=1e-5)


def test_flow_grpo_convention_is_true_kl_times_step_size():
    mean, ref = _means()
    std, step = torch.tensor([0.2, 0.5, 1.3]), torch.tensor([0.05, 0.1, 0.2])
    true_kl = kl_to_reference(mean, ref, std, convention="true_kl")
    flow = kl_to_reference(mean, ref, std, convention="flow_grpo", step_size=step)
    assert torch.allclose(flow, true_kl * step, rtol=1e-6)


def test_flow_grpo_convention_matches_the_reference_formula_on_the_kernel():
    """flow_grpo: mean((mu - mu_ref)^2) / (2 std_dev_t^2), std_dev_t = a sqrt(sigma / (1 - sigma))."""
    g = torch.Generator().manual_seed(3)
    x, v, v_ref, x_next = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    out = flow_sde_step(v, x, sigma, sigma_next, a, prev_sample=x_next)
    ref = flow_sde_step(v_ref, x, sigma, sigma_next, a, prev_sample=x_next)
    std_dev_t = a * math.sqrt(sigma / (1 - sigma))
    expected = ((out.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
    kl = kl_to_reference(out.mean, ref.mean, out.std, step_size=sigma - sigma_next)
    assert torch.allclose(kl, expected, rtol=1e-5)


def test_kl_gradient_reaches_the_policy_mean_only():
    mean, ref = (t.requires_grad_(True) for t in _means())
    kl_to_reference(mean, ref, 0.5, convention="true_kl").sum().backward()
    assert torch.allclose(mean.grad, (mean - ref).detach() / 0.25 / 32)
    assert ref.grad is None


def test_kl_validates():
    mean, ref = _means()
    with pytest.raises(ValueError, match="step_size"):
        kl_to_reference(mean, ref, 0.5)
    with pytest.raises(ValueError, match="std"):
        kl_to_reference(mean, ref, 0.0, convention="true_kl")
    with pytest.raises(ValueError, match="convention"):
        kl_to_reference(mean, ref, 0.5, convention="paper")
