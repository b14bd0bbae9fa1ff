"""Inversion of clean latents to a noise level: the noising of InPO and SmPO (docs/methods/dpo.md#inversion).

Diffusion-DPO noises each image with fresh Gaussian noise. DDIM-InPO (Lu et al., CVPR 2025) and SmPO (Lu et al., ICML
2025) instead run the model's own ODE *backwards* from the clean latent to the training noise level, so the noisy
latent is one the model itself would denoise into that image, and train on the noise that latent implies.

Every family's forward process is linear in the clean latent and the noise, and so is its regression target::

    x_t = a(t) x0 + b(t) eps          (add_noise)
    y_t = c(t) x0 + d(t) eps          (training_target: epsilon, v or velocity)

so a model output ``y`` at ``x_t`` determines the pair ``(x0_hat, eps_hat)`` by a 2x2 solve
(:func:`split_prediction`), and one inverse step re-combines that pair at the next, noisier level
(``a(s) x0_hat + b(s) eps_hat``). This is DDIM's inverse step for epsilon and v models and the Euler step for flow
models, from the adapter's own ``add_noise`` / ``training_target`` alone. The first step starts from the clean
latent (``a = 1, b = 0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor


Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(a, b, c, d)``, each ``[B, 1, ..., 1]``: ``x_t = a x0 + b eps`` and ``target = c x0 + d eps``."""


def forward_coefficients(adapter: Any, timesteps: Tensor, like: Tensor) -> Coefficients:
    """The linear coefficients of ``adapter``'s forward process and regression target at ``timesteps``.

    Read off the adapter's own ``add_noise`` and ``training_target`` at unit inputs, so every family (epsilon, v,
    flow) is covered without restating its schedule.

    Args:
        adapter: a :class:`~diffalign.adapters.base.DiffusionAdapter`.
        timesteps: ``[B]`` timesteps on the scheduler's scale.
        like: a ``[B, ...]`` tensor whose rank, device and dtype the coefficients take.

    Returns:
        ``(a, b, c, d)``, each ``[B, 1, ..., 1]`` float32.
    """
    shape = (timesteps.shape[0],) + (1,) * (like.ndim - 1)
    one = torch.ones(shape, device=like.device, dtype=torch.float32)
    zero = torch.zeros_like(one)
    timesteps = timesteps.to(like.device)
    a, b = adapter.add_noise(one, zero, timesteps), adapter.add_noise(zero, one, timesteps)
    c, d = adapter.training_target(one, zero, timesteps), adapter.training_target(zero, one, timesteps)
    return tuple(v.float().reshape(shape) for v in (a, b, c, d))  # type: ignore[return-value]


def split_prediction(output: Tensor, sample: Tensor, coefficients: Coefficients) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` implied by the model ``output`` at ``sample`` (both ``[B, ...]``), float32.

    Solves ``sample = a x0 + b eps``, ``output = c x0 + d eps`` (determinant ``a d - b c``: 1 for flow, ``sqrt(alpha
    bar)`` for epsilon, 1 for v).
    """
    a, b, c, d = coefficients
    sample, output = sample.float(), output.float()
    det = a * d - b * c
    return (d * sample - b * output) / det, (a * output - c * sample) / det


def implied_noise(x0: Tensor, sample: Tensor, coefficients: Coefficients, fallback: Tensor | None = None) -> Tensor:
    """``eps_hat = (x_t - a x0) / b``: the noise that puts ``x0`` at ``sample`` by the forward process; ``[B, ...]``.

    Training on ``(add_noise(x0, eps_hat, t), training_target(x0, eps_hat, t))`` is then training on the inverted
    latent itself. Where ``b = 0`` (a flow model's clean level) every noise puts ``x0`` there: ``fallback`` (e.g.
    fresh Gaussian noise) is taken, or 0.
    """
    a, b, _, _ = coefficients
    clean = b == 0
    noise = (sample.float() - a * x0.float()) / torch.where(clean, torch.ones_like(b), b)
    if not bool(clean.any()):
        return noise
    return torch.where(clean, fallback.float() if fallback is not None else torch.zeros_like(noise), noise)


def inversion_path(timesteps: Tensor, num_steps: int, num_train_timesteps: int) -> Tensor:
    """The levels each sample's inversion visits: ``[B, num_steps + 1]``.

    Row ``i`` is ``0``, then the points ``k * T / num_steps`` (``k = 1, 2, ...``) strictly below ``timesteps[i]``,
    then ``timesteps[i]`` itself, padded with ``timesteps[i]`` (a step from a level to itself is the identity), so
    the batch walks one shared number of steps. InPO's and SmPO's code stop at the last grid point below ``t`` and
    train there as if at ``t``; the last partial step makes the latent sit at the level the model is told.

    Args:
        timesteps: ``[B]`` target levels (integers for epsilon / v models, floats for flow).
        num_steps: grid steps over the whole range (InPO 10; SmPO 5 for SD1.5, 10 for SDXL).
        num_train_timesteps: ``T``, the scheduler's range (1000).
    """
    grid = torch.arange(num_steps + 1, device=timesteps.device, dtype=torch.float64) * num_train_timesteps / num_steps
    target = timesteps.to(torch.float64)[:, None]  # [B, 1]
    below = grid[None, :num_steps].expand(target.shape[0], num_steps)  # [B, num_steps]: 0, T/n, ...
    levels = torch.where(below < target, below, target)
    levels[:, 0] = 0.0
    path = torch.cat([levels, target], dim=1)  # [B, num_steps + 1]
    if not timesteps.is_floating_point():
        path = path.round().long()
    return path.to(timesteps.dtype)


def ddim_posterior_std(source: Coefficients, target: Coefficients) -> Tensor:
    """DDIM's ``eta = 1`` step std between two levels, ``(b_s / b_t) sqrt(1 - (a_t / a_s)^2)`` with ``s`` the less
    noisy level; ``[B, 1, ..., 1]``, 0 from the clean level and on identity steps."""
    a_s, b_s, _, _ = source
    a_t, b_t, _, _ = target
    ratio = (b_s / b_t.clamp(min=1e-12)) * torch.sqrt((1 - (a_t / a_s) ** 2).clamp(min=0))
    return torch.where(b_t > 0, ratio, torch.zeros_like(ratio))


@torch.no_grad()
def invert(
    predict: Callable[[Tensor, Tensor], Tensor],
    adapter: Any,
    x0: Tensor,
    timesteps: Tensor,
    num_steps: int,
    renoise: bool = False,
    eta: float = 0.0,
    draw_noise: Callable[[torch.Size], Tensor] | None = None,
    at: Literal["destination", "source"] = "destination",
) -> Tensor:
    """Run the model's ODE backwards from clean latents ``x0`` to ``timesteps``; the inverted ``x_t``, float32.

    Args:
        predict: ``predict(x, t) -> output`` of the model (``[B, ...]`` and ``[B]``), e.g. the policy on the
            captions without CFG.
        adapter: supplies the forward process (:func:`forward_coefficients`) and ``scheduler.config``.
        x0: ``[B, ...]`` clean latents.
        timesteps: ``[B]`` the levels to reach.
        num_steps: grid steps over the whole range (:func:`inversion_path`).
        renoise: ReNoise (Garibi et al. 2024, as SmPO): predict, take a trial step, predict again at the trial
            point, and step from the current latent with the mean of the two predictions (two calls per step).
        eta: InPO's stochastic term: after each step add ``eta * z * std``, ``std`` the DDIM posterior std between
            the two levels (:func:`ddim_posterior_std`; InPO uses 0.1). Needs ``draw_noise``.
        draw_noise: ``draw_noise(shape) -> [B, ...]`` standard normal noise (the caller's generators).
        at: the level each step's (first) prediction is made at: ``"destination"``, the usual DDIM-inversion
            approximation of the published codes, or ``"source"``, the level the latent is at (explicit Euler; the
            ReNoise trial prediction is then at the destination, a Heun-like average).

    Returns:
        ``[B, ...]`` the latent at ``timesteps``.
    """
    if eta and draw_noise is None:
        raise ValueError("inversion with eta > 0 needs draw_noise")
    path = inversion_path(timesteps, num_steps, adapter.scheduler.config.num_train_timesteps)
    sample = x0.float()
    for k in range(num_steps):
        source, target = path[:, k], path[:, k + 1]
        src = forward_coefficients(adapter, source, sample)
        if k == 0:  # the walk starts from the clean latent itself
            a, b, c, d = src
            src = (torch.ones_like(a), torch.zeros_like(b), c, d)
        dst = forward_coefficients(adapter, target, sample)
        # at="destination": the model sees the level the step is heading to (diffusers' DDIMInverseScheduler, InPO's
        # and SmPO's code); at="source": the level the latent is at (the explicit Euler step of the ODE).
        output = predict(sample, target if at == "destination" else source).float()
        if renoise:
            trial = step_to(output, sample, src, dst)
            output = 0.5 * (output + predict(trial, target).float())
        sample = step_to(output, sample, src, dst)
        if eta:
            sample = sample + eta * ddim_posterior_std(src, dst) * draw_noise(sample.shape).to(sample)
    return sample


def step_to(output: Tensor, sample: Tensor, source: Coefficients, target: Coefficients) -> Tensor:
    """The deterministic step of a model ``output`` at ``sample`` (level ``source``) to the level ``target``: the
    output's ``(x0_hat, eps_hat)`` recombined there (DDIM for epsilon / v models, Euler for flow); ``[B, ...]``."""
    return _recombine(split_prediction(output, sample, source), target)


def _recombine(pair: tuple[Tensor, Tensor], coefficients: Coefficients) -> Tensor:
    a, b, _, _ = coefficients
    x0_hat, eps_hat = pair
    return a * x0_hat + b * eps_hat
