"""PPO-clip loss, KL to the reference and the ratio guards against closed forms (docs/methods/grpo.md)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffalign.losses import clipped_policy_loss, grpo_guard_log_ratio, kl_to_reference, recentred_log_ratio
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


def test_recentred_log_ratio_keeps_gradients():
    log_ratio = torch.tensor([-0.3, -0.1, -0.2], requires_grad=True)
    out = recentred_log_ratio(log_ratio)
    assert out.detach().tolist() == pytest.approx([-0.1, 0.1, 0.0], abs=1e-7)
    weights = torch.tensor([1.0, 2.0, 3.0])
    (weights * out).sum().backward()
    assert log_ratio.grad.tolist() == weights.tolist()  # the subtracted mean is a constant


def test_recentred_ratio_in_the_loss():
    # A uniform shift of the log-ratio (the mean < 1 bias) is removed: ratio 1, loss -mean(A), nothing clipped.
    logp = torch.full((3,), -0.01)
    adv = torch.tensor([1.0, -1.0, 3.0])
    loss, m = clipped_policy_loss(logp, torch.zeros(3), adv, 1e-4, log_ratio=recentred_log_ratio(logp))
    assert loss.item() == pytest.approx(-1.0)
    assert m["clipfrac"].item() == 0.0
    assert m["approx_kl"].item() == pytest.approx(0.5 * 1e-4)  # of the raw log-ratio


def _guard_case(seed=0, std=(0.3, 0.05, 0.12)):
    """Stored Gaussian transitions x' = mu_old + s xi and a current mean mu (leaf), float64."""
    g = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    xi = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    stored = old_mean + s.view(-1, 1, 1, 1) * xi
    mean = (old_mean + 0.02 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()

    def log_prob(mu):  # the Gaussian log-density of the stored sample, mean over the non-batch dims
        return Normal(mu, s.view(-1, 1, 1, 1)).log_prob(stored).mean(dim=(1, 2, 3))

    return old_mean, xi, s, mean, log_prob


def test_grpo_guard_log_ratio_hand_computed():
    old_mean, xi, s, mean, log_prob = _guard_case()
    guarded = grpo_guard_log_ratio(log_prob(mean), log_prob(old_mean), mean, old_mean, s)
    # The anchor's closed form: s * (log ratio + mean(dmu^2) / (2 s^2)) = mean(xi * dmu), per sample.
    expected = (xi * (mean - old_mean)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(guarded.double(), expected.detach(), atol=1e-6, rtol=0)
    # Its gradient through mu is xi / D (the bias term's gradient cancels the raw ratio's pull-back term).
    guarded.sum().backward()
    torch.testing.assert_close(mean.grad, xi / xi[0].numel(), atol=1e-6, rtol=0)
    # The raw log-ratio is biased below 0, more at the small-std sample; the guarded one is not scaled by 1 / s.
    raw = (log_prob(mean) - log_prob(old_mean)).detach()
    bias = ((mean - old_mean) ** 2).mean(dim=(1, 2, 3)).detach() / (2 * s**2)
    torch.testing.assert_close(raw, expected.detach() / s - bias, atol=1e-9, rtol=0)


def test_grpo_guard_on_policy_ratio_one():
    old_mean, _, s, _, log_prob = _guard_case(seed=1)
    same = old_mean.clone().requires_grad_()
    guarded = grpo_guard_log_ratio(log_prob(same), log_prob(old_mean), same, old_mean, s)
    assert guarded.abs().max().item() == 0.0
    _, m = clipped_policy_loss(log_prob(same), log_prob(old_mean), torch.ones(3), 1e-6, log_ratio=guarded)
    assert m["ratio_mean"].item() == 1.0 and m["clipfrac"].item() == 0.0


def test_grpo_guard_loss_matches_the_published_form():
    """verl-omni's GRPOGuardLoss for one step: mean(max(-A r, -A clip(r))) / |dt| with r = exp(guarded ratio)."""
    old_mean, _, s, mean, log_prob = _guard_case(seed=2, std=(0.2, 0.2, 0.2))
    dt = 0.0625
    adv = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    clip = 2e-6
    guarded = grpo_guard_log_ratio(log_prob(mean), log_prob(old_mean), mean, old_mean, s)
    loss, _ = clipped_policy_loss(
        log_prob(mean), log_prob(old_mean), adv, clip, log_ratio=guarded, weights=torch.full((3,), 1 / dt)
    )
    r = [math.exp(v) for v in guarded.tolist()]
    a = adv.tolist()
    per = [max(-a[i] * r[i], -a[i] * min(max(r[i], 1 - clip), 1 + clip)) for i in range(3)]
    assert loss.item() == pytest.approx(sum(per) / 3 / dt, rel=1e-9)


def test_weights_scale_each_element():
    logp = torch.tensor([0.0, 0.0])
    loss, m = clipped_policy_loss(logp, logp, torch.tensor([1.0, 2.0]), 1e-4, weights=torch.tensor([3.0, 0.5]))
    assert loss.item() == pytest.approx(-(3.0 * 1 + 0.5 * 2) / 2)
    assert m["policy_loss"].item() == pytest.approx(loss.item())


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
