"""Reward-backprop math: reward losses, AlignProp's truncation draw, ReFL's late step, Direct-Align / SRPO's one-step
recovery, level draw and relative reward, ImageReFL's switch and losses (docs/methods/reward-backprop.md)."""

import math
import random

import pytest
import torch

from diffalign.losses import (
    refl_step_range,
    reward_loss,
    sample_refl_step,
    sample_truncation_steps,
    truncated_grad_steps,
)
from diffalign.losses.reward_backprop import (
    SRPO_NEGATIVE_WORDS,
    SRPO_POSITIVE_WORDS,
    DirectAlignLevels,
    diffusion_regulariser,
    direct_align_grid,
    direct_align_levels,
    direct_align_recover,
    direct_align_recover_vp,
    image_refl_loss,
    interpolate_alphas_cumprod,
    is_plain_refl_batch,
    relative_preference,
    sample_direct_align_index,
    srp_captions,
    srp_discount,
    switch_timestep,
)


def test_negative_mode():
    r = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss, m = reward_loss(r, weight=0.5)
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert r.grad.tolist() == pytest.approx([-0.5 / 3] * 3)
    assert m["reward_mean"].item() == pytest.approx(2.0)
    assert m["reward_std"].item() == pytest.approx(math.sqrt(2 / 3))


def test_hinge_mode_refl():
    r = torch.tensor([1.0, 2.5, 3.0, 0.0], requires_grad=True)
    loss, m = reward_loss(r, mode="hinge", weight=1e-3, target=2.0)
    assert loss.item() == pytest.approx(1e-3 * (1.0 + 0 + 0 + 2.0) / 4)
    loss.backward()
    assert r.grad.tolist() == pytest.approx([-1e-3 / 4, 0.0, 0.0, -1e-3 / 4])
    assert m["hinge_active_frac"].item() == 0.5


def test_target_mode_alignprop():
    r = torch.tensor([9.0, 11.5], requires_grad=True)
    loss, _ = reward_loss(r, mode="target", weight=0.01, target=10.0)
    assert loss.item() == pytest.approx(0.01 * (1.0 + 1.5) / 2)
    loss.backward()
    assert r.grad.tolist() == pytest.approx([-0.005, 0.005])  # pulled towards the target from both sides


def test_reward_loss_validates():
    with pytest.raises(ValueError, match="target"):
        reward_loss(torch.ones(2), mode="hinge")
    with pytest.raises(ValueError, match="mode"):
        reward_loss(torch.ones(2), mode="square", target=1.0)
    with pytest.raises(ValueError):
        reward_loss(torch.ones(2, 1))


def test_fixed_truncation():
    assert sample_truncation_steps(50, "fixed", k=1) == 1
    assert sample_truncation_steps(50, "fixed", k=50) == 50  # full DRaFT
    for k in (0, 51):
        with pytest.raises(ValueError):
            sample_truncation_steps(50, "fixed", k=k)


def test_uniform_truncation_covers_its_range():
    g = torch.Generator().manual_seed(0)
    draws = [sample_truncation_steps(50, "uniform", generator=g) for _ in range(3000)]
    assert set(draws) == set(range(1, 50))  # AlignProp: first grad step b in [1, 50) at 50 steps, K = 50 - b
    short = {sample_truncation_steps(10, "uniform", generator=random.Random(i)) for i in range(300)}
    assert short == set(range(1, 10))  # clipped to [1, num_steps - 1]
    with pytest.raises(ValueError):
        sample_truncation_steps(10, "uniform", uniform_range=(12, 20))


def test_gaussian_truncation_matches_alignprop_distribution():
    """AlignProp: b = int(N(42, 5)) redrawn until 1 <= b < 50, K = 50 - b."""

    def normal_cdf(x):
        return 0.5 * (1 + math.erf((x - 42) / (5 * math.sqrt(2))))

    probs = {b: normal_cdf(b + 1) - normal_cdf(b) for b in range(1, 50)}  # int() == floor for b >= 1
    expected_mean = sum((50 - b) * p for b, p in probs.items()) / sum(probs.values())

    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_truncation_steps(50, "gaussian", generator=g) for _ in range(4000)], dtype=float)
    assert draws.min() >= 1 and draws.max() <= 49
    assert draws.mean().item() == pytest.approx(expected_mean, abs=4 * draws.std().item() / math.sqrt(4000))
    # reproducible with the same seed, and random.Random works too
    assert sample_truncation_steps(50, "gaussian", generator=torch.Generator().manual_seed(5)) == (
        sample_truncation_steps(50, "gaussian", generator=torch.Generator().manual_seed(5))
    )
    assert 1 <= sample_truncation_steps(50, "gaussian", generator=random.Random(0)) <= 49


def test_gaussian_truncation_gives_up_on_impossible_settings():
    with pytest.raises(ValueError, match="draws"):
        sample_truncation_steps(10, "gaussian", gaussian_mean=-100.0, gaussian_std=0.1, max_tries=20)


def test_truncated_grad_steps():
    assert truncated_grad_steps(50, 3) == (47, 48, 49)
    assert truncated_grad_steps(5, 0) == ()
    assert truncated_grad_steps(4, 4) == (0, 1, 2, 3)
    with pytest.raises(ValueError):
        truncated_grad_steps(4, 5)


def test_refl_step():
    assert refl_step_range(40) == (30, 39)
    assert refl_step_range(20) == (15, 19)
    assert refl_step_range(2) == (1, 1)
    g = torch.Generator().manual_seed(0)
    assert {sample_refl_step(40, g) for _ in range(400)} == set(range(30, 40))
    assert sample_refl_step(10, random.Random(0), step_range=(4, 4)) == 4
    with pytest.raises(ValueError):
        sample_refl_step(10, step_range=(5, 10))


# --- Direct-Align / SRPO (docs/methods/reward-backprop.md#direct-align-and-srpo) -------------------------------------


def test_direct_align_recovery_is_exact_with_the_true_velocity_on_both_branches():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, generator=generator), torch.randn(3, 4, 5, generator=generator)
    for sigma_from, sigma_to in ((0.9, 0.75), (0.75, 0.9)):  # denoise (step down), inversion (step up)
        sample = (1 - sigma_from) * x0 + sigma_from * noise
        recovered = direct_align_recover(sample, noise - x0, noise, sigma_from, sigma_to)
        torch.testing.assert_close(recovered, x0, atol=1e-5, rtol=1e-5)


def test_direct_align_recovery_of_an_imperfect_velocity_matches_hand_computed_values():
    # x0 = 2, noise = 1, true v = -1; the model says v = -0.5. Denoise 0.5 -> 0.4: x_a = 1.5, x_t = 1.55,
    # x0_hat = (1.55 - 0.4) / 0.6; the paper's interpolation [(1 - s_a) x0 + D (eps - v)] / (1 - s_a + D) agrees.
    x0, noise, v = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([-0.5])
    down = direct_align_recover(0.5 * x0 + 0.5 * noise, v, noise, 0.5, 0.4)
    assert down.item() == pytest.approx(1.15 / 0.6) == pytest.approx((0.5 * 2 + 0.1 * 1.5) / 0.6)
    # Inversion 0.4 -> 0.5: x_a = 1.6, x_t = 1.6 + 0.1 * (-0.5) = 1.55, x0_hat = (1.55 - 0.5) / 0.5 = 2.1.
    up = direct_align_recover(0.6 * x0 + 0.4 * noise, v, noise, 0.4, 0.5)
    assert up.item() == pytest.approx(2.1) == pytest.approx((0.6 * 2 - 0.1 * 1.5) / 0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_direct_align_vp_analogue_is_exact_with_the_true_output(prediction_type):
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)
    for a_from, a_to in ((0.2, 0.5), (0.5, 0.2)):
        sample = a_from**0.5 * x0 + (1 - a_from) ** 0.5 * noise
        output = noise if prediction_type == "epsilon" else a_from**0.5 * noise - (1 - a_from) ** 0.5 * x0
        recovered = direct_align_recover_vp(sample, output, noise, a_from, a_to, prediction_type)
        torch.testing.assert_close(recovered, x0, atol=1e-5, rtol=1e-5)


def test_direct_align_vp_analogue_hand_computed():
    # a_from = 0.25, a_to = 0.64, x0 = 2, noise = 1, eps_pred = 0: x0_pred = x_a / 0.5 = 2 + sqrt(3), and
    # x0_hat = x0_pred + sqrt(0.36 / 0.64) * (0 - 1) = 2 + sqrt(3) - 0.75.
    sample = torch.tensor([0.5 * 2 + math.sqrt(0.75)])
    recovered = direct_align_recover_vp(sample, torch.zeros(1), torch.ones(1), 0.25, 0.64, "epsilon")
    assert recovered.item() == pytest.approx(2 + math.sqrt(3) - 0.75, rel=1e-6)
    assert interpolate_alphas_cumprod(torch.tensor([1.0, 0.8, 0.4]), 1.25) == pytest.approx(0.7)


def test_direct_align_levels_follow_srpo_index_arithmetic():
    # m = 673, offset 100 of 1000: denoise injects at 227 (noisier) and recovers at 327, k_t index m; the inversion
    # branch injects at 1000 - 573 = 427 (less noisy) and steps up to 327, k_t index 573.
    assert direct_align_levels(673, 100, 1000, "denoise") == DirectAlignLevels(227, 327, 673)
    assert direct_align_levels(673, 100, 1000, "inversion") == DirectAlignLevels(427, 327, 573)
    # Near the ends the offset is clipped: m = 50 -> k = 50; the inversion's low end is max(m - k, 1) = 1.
    assert direct_align_levels(50, 100, 1000, "denoise") == DirectAlignLevels(900, 950, 50)
    assert direct_align_levels(50, 100, 1000, "inversion") == DirectAlignLevels(999, 949, 1)
    assert direct_align_levels(950, 100, 1000, "denoise") == DirectAlignLevels(0, 50, 950)
    with pytest.raises(ValueError, match="branch"):
        direct_align_levels(500, 100, 1000, "sideways")


def test_direct_align_grid_and_discount_match_srpo_hps_numbers():
    shifted = torch.linspace(1, 0, 51)
    shifted = 3 * shifted / (1 + 2 * shifted)  # SRPO's sd3_time_shift(3, linspace(1, 0, 51))
    grid = direct_align_grid(shifted, (5, 25), 1000)
    assert grid.shape == (1000,)
    assert grid[0].item() == pytest.approx(2.7 / 2.8) and grid[-1].item() == pytest.approx(0.75)
    assert grid[327].item() == pytest.approx(2.7 / 2.8 - 327 / 999 * (2.7 / 2.8 - 0.75), abs=1e-6)
    assert direct_align_grid(torch.tensor([1.0, 0.9, 0.8, 0.7]), (1, 3), 5).tolist() == pytest.approx(
        [0.9, 0.85, 0.8, 0.75, 0.7]
    )
    assert srp_discount((0.1, 0.25), 1000, 673) == pytest.approx(0.1 + 0.15 * 673 / 999)
    assert srp_discount((0.3, 0.01), 1000, 573) == pytest.approx(0.3 - 0.29 * 573 / 999)
    assert srp_discount((0.1, 0.25), 1000, 0) == pytest.approx(0.1)
    generator = torch.Generator().manual_seed(0)
    assert {sample_direct_align_index(12, generator) for _ in range(200)} == {5, 6, 7}  # [5, L - 5]
    with pytest.raises(ValueError, match="grid_size"):
        sample_direct_align_index(8)


def test_semantic_relative_preference_and_control_words():
    preferred, rejected = torch.tensor([0.3, 0.2]), torch.tensor([0.25, 0.1])
    assert relative_preference(preferred, rejected, 0.2).tolist() == pytest.approx([0.11, 0.14])
    assert relative_preference(rejected, preferred, 0.1).tolist() == pytest.approx([-0.025, -0.09])  # swapped
    positive, negative = srp_captions(["a cat"], 5, SRPO_POSITIVE_WORDS, SRPO_NEGATIVE_WORDS)
    assert positive == ["Detail. a cat"] and negative == ["Concept art. a cat"]  # 5 % 4 = 1, 5 % 5 = 0


# --- ImageReFL (docs/methods/reward-backprop.md#imagerefl) -----------------------------------------------------------


def test_switch_timestep_of_a_switch_step():
    timesteps = torch.tensor([999.0, 750.0, 500.0, 250.0])
    assert [switch_timestep(timesteps, s) for s in range(5)] == [999.0, 750.0, 500.0, 250.0, -1.0]
    with pytest.raises(ValueError, match="switch_step"):
        switch_timestep(timesteps, 5)


def test_image_refl_loss_parts_hand_computed():
    prediction, target = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    assert diffusion_regulariser(prediction, target).item() == pytest.approx(2.5)  # (1 + 4) / 2
    total = image_refl_loss(torch.tensor(-0.5), torch.tensor(2.5), weight=1e-3, mse_weight=0.01)
    assert total.item() == pytest.approx(1e-3 * (-0.5 + 0.025))
    assert [is_plain_refl_batch(i, 3) for i in range(6)] == [False, False, True, False, False, True]
    assert not any(is_plain_refl_batch(i, None) for i in range(6))
