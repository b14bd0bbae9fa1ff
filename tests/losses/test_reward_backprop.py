"""Reward-backprop math: reward losses, AlignProp's truncation draw, ReFL's late step
(docs/methods/reward-backprop.md)."""

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
