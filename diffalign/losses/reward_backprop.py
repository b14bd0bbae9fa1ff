"""Pure math of reward backpropagation: AlignProp, DRaFT-K / DRaFT-LV, ReFL (docs/methods/reward-backprop.md).

What lives here is what does not touch a model: the loss on differentiable rewards, the draw of the truncation
length K, the step indices that keep their graph, and ReFL's random late step. The family-specific parts stay
in the adapter and the samplers: re-noising ``x0`` (``adapter.add_noise``), the single-step ``x0`` prediction
(:func:`diffalign.samplers.steps.predict_x0` for flows, ``x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)`` for
epsilon models) and the sampling loop (``rollout(..., grad=GradientPath(truncated_grad_steps(T, K)))``).

Recipes (docs/methods/reward-backprop.md):

- AlignProp: K drawn once per trajectory (:func:`sample_truncation_steps`, default ``"gaussian"``); loss
  ``|r - 10|`` (aesthetic, ``mode="target"``) or ``-r`` / HPS ``1 - r`` (``mode="negative"``), times
  ``grad_scale=1`` and ``loss_coeff=0.01`` (``weight=0.01``).
- DRaFT-K: ``mode="fixed"`` with K (K=1 works well); K = T is full DRaFT.
- DRaFT-LV: sample ``x0`` without grad, re-noise it ``n`` times (paper n=2) to the lowest noise level with
  ``adapter.add_noise`` and take one denoising step with grad per copy. The paper's gradient is the *sum* over
  the ``n`` copies; :func:`reward_loss` averages over the ``n * B`` images, i.e. ``1/n`` of it: use
  ``weight=n`` to match the paper.
- ReFL: steps ``0..mid-1`` without grad, ``mid`` from :func:`sample_refl_step` (one of the last 10 of 40),
  then one model call with grad at ``x_mid`` and its ``x0`` prediction; loss ``relu(2 - r) * 1e-3``
  (``mode="hinge", target=2.0, weight=1e-3``).
"""

import random
from typing import Literal

import torch
from torch import Tensor


__all__ = [
    "ALIGNPROP_AESTHETIC_TARGET",
    "REFL_HINGE_TARGET",
    "refl_step_range",
    "reward_loss",
    "sample_refl_step",
    "sample_truncation_steps",
    "truncated_grad_steps",
]

ALIGNPROP_AESTHETIC_TARGET = 10.0
"""AlignProp's ``aesthetic_target`` (``mode="target"``): the LAION aesthetic score scale tops out near 10."""

REFL_HINGE_TARGET = 2.0
"""ReFL's hinge margin on ImageReward (``relu(2 - r)``, ``ImageReward/ReFL.py``)."""

RandomSource = random.Random | torch.Generator | None


def reward_loss(
    rewards: Tensor,
    mode: Literal["negative", "hinge", "target"] = "negative",
    weight: float = 1.0,
    target: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss to minimise on differentiable rewards (docs/methods/reward-backprop.md#loss-forms).

    - ``"negative"``: ``-weight * mean(r)`` (AlignProp with ``aesthetic_target=None``, DRaFT). AlignProp's HPS
      loss ``1 - r`` and TRL's ``10 - mean(r)`` differ from it by a constant only (same gradients).
    - ``"hinge"``: ``weight * mean(relu(target - r))`` (ReFL, ``target=2``, ``weight=1e-3``); a sample whose
      reward exceeds ``target`` gets no gradient.
    - ``"target"``: ``weight * mean(|target - r|)`` (AlignProp aesthetic, ``target=10``): L1 pull towards
      ``target``, which pushes rewards above it back down.

    Args:
        rewards: ``[B]`` rewards, differentiable w.r.t. the images.
        mode: one of the above.
        weight: overall scale (AlignProp ``grad_scale * loss_coeff`` = 0.01, ReFL ``grad_scale`` = 1e-3).
        target: the margin (``"hinge"``) or target (``"target"``); required there, unused by ``"negative"``.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached 0-d tensors ``loss``, ``reward_mean``,
        ``reward_std`` (population std), and for ``"hinge"`` ``hinge_active_frac`` (share of samples below
        ``target``, the ones still receiving gradient).
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if mode != "negative" and target is None:
        raise ValueError(f"mode={mode!r} needs a target")
    if mode == "negative":
        loss = -weight * rewards.mean()
    elif mode == "hinge":
        loss = weight * torch.relu(target - rewards).mean()
    elif mode == "target":
        loss = weight * (target - rewards).abs().mean()
    else:
        raise ValueError(f"mode must be 'negative', 'hinge' or 'target', got {mode!r}")
    with torch.no_grad():
        r = rewards.detach().float()
        metrics = {"loss": loss.detach(), "reward_mean": r.mean(), "reward_std": r.std(correction=0)}
        if mode == "hinge":
            metrics["hinge_active_frac"] = (r < target).float().mean()
    return loss, metrics


def _uniform_int(low: int, high: int, generator: RandomSource) -> int:
    """Uniform integer in ``[low, high]`` inclusive."""
    if isinstance(generator, torch.Generator):
        return int(torch.randint(low, high + 1, (), generator=generator))
    return (generator or random.Random()).randint(low, high)


def _normal(mean: float, std: float, generator: RandomSource) -> float:
    if isinstance(generator, torch.Generator):
        return mean + std * float(torch.randn((), generator=generator))
    return (generator or random.Random()).gauss(mean, std)


def sample_truncation_steps(
    num_steps: int,
    mode: Literal["fixed", "uniform", "gaussian"] = "fixed",
    k: int = 1,
    generator: RandomSource = None,
    *,
    gaussian_mean: float = 8.0,
    gaussian_std: float = 5.0,
    uniform_range: tuple[int, int] = (1, 49),
    max_tries: int = 10_000,
) -> int:
    """Number ``K`` of final denoising steps whose model calls keep gradients (AlignProp, DRaFT-K).

    Draw it once per trajectory (the paper and the original repo), not per step (TRL's quirk; see
    docs/methods/reward-backprop.md#truncation). AlignProp draws the first step with gradients, ``b``, and rejects
    it until ``1 <= b < num_steps``; ``K = num_steps - b``. Expressed in K, for any ``num_steps``:

    - ``"fixed"``: ``K = k`` (DRaFT-K; AlignProp ``fixed`` ``value=49`` at 50 steps is ``k=1``); ``1 <= k <=
      num_steps``, ``k = num_steps`` being full DRaFT.
    - ``"uniform"``: ``K`` uniform on ``uniform_range`` (inclusive) intersected with ``[1, num_steps - 1]``.
      Default ``(1, 49)`` = AlignProp's ``uniform`` ``{min: 0, max: 50}`` at 50 steps (``b = torch.randint(0,
      50)`` redrawn until ``1 <= b < 50``, ``K = 50 - b``; AlignProp ``config/alignprop_config.py`` at b22918a).
    - ``"gaussian"``: ``b = int(N(num_steps - gaussian_mean, gaussian_std))`` until ``1 <= b < num_steps``;
      defaults (8, 5) = AlignProp's ``{mean: 42, std: 5}`` at 50 steps (E[K] ~ 8.5: ``int`` truncates).

    Args:
        num_steps: ``T``, denoising steps of the sampler.
        mode: ``"fixed"``, ``"uniform"`` or ``"gaussian"``.
        k: K for ``"fixed"``.
        generator: ``torch.Generator`` or ``random.Random`` (``None``: a fresh ``random.Random``).
        gaussian_mean: mean of K for ``"gaussian"``.
        gaussian_std: std for ``"gaussian"``.
        uniform_range: inclusive K range for ``"uniform"``.
        max_tries: rejection-sampling bound for ``"gaussian"``.

    Returns:
        ``K``; the trainer keeps the graph of steps ``truncated_grad_steps(num_steps, K)``.
    """
    if mode == "fixed":
        if not 1 <= k <= num_steps:
            raise ValueError(f"k must be in [1, {num_steps}], got {k}")
        return k
    if num_steps < 2:
        raise ValueError(f"random truncation needs num_steps >= 2, got {num_steps}")
    if mode == "uniform":
        low, high = max(uniform_range[0], 1), min(uniform_range[1], num_steps - 1)
        if low > high:
            raise ValueError(f"uniform_range {uniform_range} has no K in [1, {num_steps - 1}]")
        return _uniform_int(low, high, generator)
    if mode == "gaussian":
        for _ in range(max_tries):
            first = int(_normal(num_steps - gaussian_mean, gaussian_std, generator))
            if 1 <= first < num_steps:
                return num_steps - first
        raise ValueError(f"no K in [1, {num_steps - 1}] after {max_tries} draws; check gaussian_mean/std")
    raise ValueError(f"mode must be 'fixed', 'uniform' or 'gaussian', got {mode!r}")


def truncated_grad_steps(num_steps: int, num_grad_steps: int) -> tuple[int, ...]:
    """Indices of the last ``num_grad_steps`` of ``num_steps`` steps: those whose denoiser call keeps its graph.

    Earlier steps run without gradients (AlignProp detaches their model output; DRaFT-K stops the gradient at
    ``x_K``); nothing before them depends on the parameters, so both are the same truncation.
    """
    if not 0 <= num_grad_steps <= num_steps:
        raise ValueError(f"num_grad_steps must be in [0, {num_steps}], got {num_grad_steps}")
    return tuple(range(num_steps - num_grad_steps, num_steps))


def refl_step_range(num_steps: int = 40, last_fraction: float = 0.25) -> tuple[int, int]:
    """Inclusive range of ReFL's gradient step index: the last ``last_fraction`` of the steps.

    See docs/methods/reward-backprop.md#refl.

    ReFL samples 40 DDPM steps and draws ``mid = randint(30, 39)``: one of the last 10 (``last_fraction=0.25``).

    Returns:
        ``(low, high)`` with ``high = num_steps - 1`` and ``num_steps - low = max(1, round(num_steps *
        last_fraction))``; ``(30, 39)`` for 40 steps.
    """
    if num_steps < 1 or not 0 < last_fraction <= 1:
        raise ValueError(f"need num_steps >= 1 and 0 < last_fraction <= 1, got {num_steps}, {last_fraction}")
    return num_steps - max(1, round(num_steps * last_fraction)), num_steps - 1


def sample_refl_step(
    num_steps: int = 40, generator: RandomSource = None, step_range: tuple[int, int] | None = None
) -> int:
    """ReFL's random late step ``mid``, uniform on ``step_range`` (default :func:`refl_step_range`).

    See docs/methods/reward-backprop.md#refl.

    The trainer runs steps ``0..mid-1`` without gradients (``rollout(..., stop_after=mid)`` leaves ``x_mid``),
    calls the model once *with* gradients at ``x_mid`` and the timestep of step ``mid``, predicts ``x0`` in a
    single step and decodes it for the reward. The reference uses no CFG in this path.

    Args:
        num_steps: sampler steps (ReFL: 40).
        generator: ``torch.Generator`` or ``random.Random``.
        step_range: inclusive ``(low, high)`` override, ``0 <= low <= high < num_steps``.

    Returns:
        The step index ``mid``.
    """
    low, high = refl_step_range(num_steps) if step_range is None else step_range
    if not 0 <= low <= high < num_steps:
        raise ValueError(f"step_range {(low, high)} must satisfy 0 <= low <= high < {num_steps}")
    return _uniform_int(low, high, generator)
