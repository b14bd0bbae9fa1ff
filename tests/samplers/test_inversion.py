"""Inversion to a noise level (InPO / SmPO noising, docs/methods/dpo.md#inversion) on closed-form cases."""

import math

import pytest
import torch

from diffalign.adapters import load_adapter
from diffalign.samplers.inversion import (
    ddim_posterior_std,
    forward_coefficients,
    implied_noise,
    inversion_path,
    invert,
    split_prediction,
)


# epsilon, v and flow: the three forward processes
PREDICTIONS = {"sd15": "epsilon", "sd2v": "v_prediction", "sd3": "flow"}


@pytest.fixture(scope="module")
def adapters(tiny_pipeline_dir):
    return {family: load_adapter(tiny_pipeline_dir(family)) for family in PREDICTIONS}


def _levels(family):
    # integer train timesteps for epsilon / v models, 1000 sigma for flow
    return torch.tensor([0, 1, 99, 100, 101, 555, 999]) if family != "sd3" else torch.tensor([0.5, 99.9, 250.0, 998.0])


def test_inversion_path_walks_the_grid_below_each_level_then_the_level():
    path = inversion_path(torch.tensor([0, 150, 300, 999]), num_steps=4, num_train_timesteps=1000)
    assert path.tolist() == [
        [0, 0, 0, 0, 0],  # the clean level itself: identity steps
        [0, 150, 150, 150, 150],
        [0, 250, 300, 300, 300],  # 250 < 300, then 300; padded
        [0, 250, 500, 750, 999],
    ]
    assert path.dtype == torch.long
    flow = inversion_path(torch.tensor([612.5]), num_steps=2, num_train_timesteps=1000)
    assert flow.dtype == torch.float32 and flow.tolist() == [[0.0, 500.0, 612.5]]


@pytest.mark.parametrize("family", list(PREDICTIONS))
def test_coefficients_and_split_recover_the_pair_that_made_the_sample(adapters, family):
    adapter = adapters[family]
    assert adapter.prediction_type == PREDICTIONS[family]
    timesteps = _levels(family)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(len(timesteps), 4, 3, 3, generator=generator), torch.randn(len(timesteps), 4, 3, 3)
    sample = adapter.add_noise(x0, eps, timesteps)
    target = adapter.training_target(x0, eps, timesteps)
    coefficients = forward_coefficients(adapter, timesteps, x0)
    x0_hat, eps_hat = split_prediction(target, sample, coefficients)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)
    positive = timesteps > 0.5
    torch.testing.assert_close(implied_noise(x0, sample, coefficients)[positive], eps[positive], atol=2e-4, rtol=1e-4)
    a, b, c, d = coefficients
    if family == "sd3":  # flow: x = (1 - s) x0 + s eps, target eps - x0
        sigma = (timesteps / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close((a, b, c, d), (1 - sigma, sigma, -torch.ones_like(a), torch.ones_like(d)))


@pytest.mark.parametrize(
    ("family", "renoise", "at"),
    [
        ("sd15", False, "destination"),
        ("sd15", True, "destination"),
        ("sd3", False, "destination"),
        ("sd3", True, "source"),
        ("sd2v", False, "source"),
    ],
)
def test_inversion_is_exact_for_a_model_that_knows_the_noise(adapters, family, renoise, at):
    """A model whose output is always the target of one fixed (x0, eps) lies on the straight line of that pair: every
    inverse step lands on ``add_noise(x0, eps, s)``, so inversion ends at the forward-noised latent and implies eps.
    That holds for epsilon and flow targets at either level; a v target depends on the level it is predicted at, so
    v models invert exactly only when called at the latent's own level (``at="source"``)."""
    adapter = adapters[family]
    timesteps = _levels(family)[1:]
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(len(timesteps), 4, 3, 3, generator=generator), torch.randn(len(timesteps), 4, 3, 3)
    calls = []

    def predict(sample, levels):
        calls.append(levels.clone())
        return adapter.training_target(x0, eps, levels)

    inverted = invert(predict, adapter, x0, timesteps, num_steps=10, renoise=renoise, at=at)
    torch.testing.assert_close(inverted, adapter.add_noise(x0, eps, timesteps), atol=5e-4, rtol=1e-4)
    noise = implied_noise(x0, inverted, forward_coefficients(adapter, timesteps, x0))
    torch.testing.assert_close(noise, eps, atol=5e-3, rtol=1e-3)
    assert len(calls) == 10 * (2 if renoise else 1)
    first = inversion_path(timesteps, 10, 1000)[:, 1 if at == "destination" else 0]
    assert torch.equal(calls[0], first)  # the first call: at the first destination, or at the clean level


def test_inversion_of_a_real_model_differs_from_forward_noise_and_is_deterministic(adapters):
    adapter = adapters["sd15"]
    cond = adapter.encode_prompt(["a red circle", "a cat"], with_negative=False)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([400, 900])

    def predict(sample, levels):
        return adapter.predict(sample, levels, cond)

    first = invert(predict, adapter, x0, timesteps, num_steps=5)
    assert torch.equal(first, invert(predict, adapter, x0, timesteps, num_steps=5))
    assert not torch.allclose(first, invert(predict, adapter, x0, timesteps, num_steps=5, renoise=True))
    noise = implied_noise(x0, first, forward_coefficients(adapter, timesteps, x0))
    assert noise.isfinite().all() and 0.1 < noise.std() < 10


def test_eta_adds_the_ddim_posterior_std_of_noise(adapters):
    """One grid step from the clean level has zero posterior std; the step after adds eta * std * z exactly."""
    adapter = adapters["sd15"]
    x0 = torch.zeros(1, 4, 3, 3)
    eps = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(3))

    def predict(sample, levels):
        return adapter.training_target(x0, eps, levels)

    timesteps = torch.tensor([700])  # path 0 -> 500 -> 700 with two grid steps
    plain = invert(predict, adapter, x0, timesteps, num_steps=2)
    noisy = invert(predict, adapter, x0, timesteps, num_steps=2, eta=0.1, draw_noise=lambda shape: z)
    alphas = adapter.scheduler.alphas_cumprod
    a_s, a_t = alphas[500].sqrt(), alphas[700].sqrt()
    std = ((1 - a_s**2) / (1 - a_t**2)).sqrt() * (1 - (a_t / a_s) ** 2).sqrt()
    torch.testing.assert_close(noisy - plain, 0.1 * std * z, atol=1e-5, rtol=1e-4)
    # the formula itself: 0 from the clean level, 0 on an identity step
    levels = torch.tensor([0, 500])
    clean, mid = forward_coefficients(adapter, levels[:1], x0), forward_coefficients(adapter, levels[1:], x0)
    clean = (torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), clean[2], clean[3])
    assert ddim_posterior_std(clean, mid).item() == 0.0
    assert ddim_posterior_std(mid, mid).item() == 0.0
    with pytest.raises(ValueError, match="draw_noise"):
        invert(predict, adapter, x0, timesteps, num_steps=2, eta=0.1)
    assert math.isfinite(std.item())


def test_the_clean_flow_level_takes_the_fallback_noise(adapters):
    """At flow sigma 0 every noise puts x0 at x0 (b = 0): the implied noise is the fallback, not a division by 0."""
    adapter = adapters["sd3"]
    timesteps = torch.tensor([0.0, 500.0])
    x0, fallback = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    eps = torch.randn(2, 4, 3, 3)
    sample = adapter.add_noise(x0, eps, timesteps)
    noise = implied_noise(x0, sample, forward_coefficients(adapter, timesteps, x0), fallback)
    assert noise.isfinite().all()
    torch.testing.assert_close(noise[0], fallback[0])
    torch.testing.assert_close(noise[1], eps[1], atol=1e-5, rtol=1e-5)
