"""Stateless fp32 step kernels: one denoising step, with the Gaussian log-prob of the transition.

Every kernel maps the current sample ``x`` (noise level ``sigma`` or ``alpha_prod_t``) and the model output to
the next, less noisy sample and returns :class:`StepOutput`. Stochastic kernels draw
``x' = mean + std * xi`` with ``xi ~ N(0, I)``; given ``prev_sample`` they draw nothing and score that transition
instead, which is how the PPO ratio of a stored step is computed under new parameters.

Conventions shared by all kernels (docs/samplers.md#conventions):

- Flow matching: ``x_sigma = (1 - sigma) * x0 + sigma * eps`` and the model predicts the velocity
  ``v = eps - x0``; sampling runs sigma from 1 to 0, so ``dt = sigma_next - sigma < 0``. From a velocity,
  ``x0_hat = x - sigma * v`` and ``eps_hat = x + (1 - sigma) * v``.
- Epsilon / v-prediction (DDIM): ``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps`` with ``a_t = alphas_cumprod[t]``.
- ``sigma``, ``sigma_next``, ``alpha_prod_t``, ``alpha_prod_prev`` and the noise scales are Python floats or
  0-d / ``[B]`` tensors; a ``[B]`` tensor is broadcast over the non-batch dims, so the same kernel serves image
  latents ``[B, C, H, W]`` and packed FLUX latents ``[B, L, C]``.
- All math runs in fp32 (bf16 overflows in the mean); ``prev_sample`` is returned in fp32 and the caller casts it
  back to the model dtype.
- ``log_prob`` is the Gaussian log-density of ``prev_sample`` **reduced by the mean over the non-batch dims**
  (not the sum), as in every reference implementation; ratios ``exp(new - old)`` therefore stay close to 1,
  which is why the clip ranges are 1e-4..1e-5. ``prev_sample`` is detached inside the density, so gradients
  reach the parameters only through ``mean``.
- A step whose noise std is zero everywhere (noise scale 0, or a schedule end such as ``sigma_next = 0`` for
  CPS) is the deterministic ODE/DDIM step and returns ``log_prob=None``: its density does not exist.
- ``StepOutput.std`` is the standard deviation of the transition itself (the ``std`` in the density). Flow-GRPO
  calls ``std / sqrt(sigma - sigma_next)`` its ``std_dev_t`` and divides its KL by ``2 * std_dev_t**2``.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


__all__ = [
    "KERNELS",
    "StepOutput",
    "cps_step",
    "ddim_step",
    "dpm_solver_2m_step",
    "flow_sde_const_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "ode_step",
    "predict_x0",
    "widened_step",
]

Scalar = float | Tensor
Generator = torch.Generator | list[torch.Generator] | None

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """The result of one denoising step.

    Attributes:
        prev_sample: The next (less noisy) sample, fp32, same shape as the input sample ``[B, ...]``.
        log_prob: ``[B]`` Gaussian log-density of ``prev_sample``, mean over the non-batch dims; ``None`` for a
            deterministic (zero-noise) step.
        mean: ``[B, ...]`` mean of the transition, fp32 (carries gradients to the model output).
        std: Standard deviation of the transition, broadcastable to ``prev_sample`` (0 for deterministic steps).
    """

    prev_sample: Tensor
    log_prob: Tensor | None
    mean: Tensor
    std: Tensor | float


# --- helpers -------------------------------------------------------------------------------------------------


def _coef(value: Scalar, like: Tensor) -> Tensor:
    """A float, 0-d or ``[B]`` value as an fp32 tensor that broadcasts against ``like`` ``[B, ...]``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 1:
        if value.shape[0] != like.shape[0]:
            raise ValueError(f"per-sample coefficient has {value.shape[0]} entries for a batch of {like.shape[0]}")
        return value.view(-1, *([1] * (like.ndim - 1)))
    if value.ndim != 0:
        raise ValueError(f"expected a float, a 0-d or a [B] tensor, got shape {tuple(value.shape)}")
    return value


def _randn(shape: torch.Size, generator: Generator, device: torch.device) -> Tensor:
    """Standard normal noise in fp32, drawn on the generator's device (as diffusers' ``randn_tensor``)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        # One draw per sample, so a sample's noise does not depend on the batch it was drawn in.
        draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(draws).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of ``N(mean, std^2)`` at ``sample``, reduced by the mean over the non-batch dims.

    Args:
        sample: ``[B, ...]`` point at which the density is evaluated (detached: the policy gradient flows
            through ``mean`` only, as in ddpo-pytorch and flow_grpo).
        mean: ``[B, ...]`` Gaussian mean.
        std: Standard deviation, broadcastable to ``sample``; must be > 0.

    Returns:
        ``[B]`` fp32 tensor ``mean_dims(-(x - mu)^2 / (2 std^2) - log std - log sqrt(2 pi))``.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    log_density = -((sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def _finish(
    mean: Tensor, std: Tensor, prev_sample: Tensor | None, generator: Generator, unnormalized: bool = False
) -> StepOutput:
    """Sample (or score the given ``prev_sample``) from ``N(mean, std^2)``; shared tail of every kernel."""
    is_zero = std == 0
    if bool(is_zero.all()):
        # Deterministic step: no density exists; a given prev_sample is passed through unchanged.
        return StepOutput(mean if prev_sample is None else prev_sample.float(), None, mean, std)
    if bool(is_zero.any()):
        raise ValueError("some samples of the batch have zero noise and others not; split the batch")
    if prev_sample is None:
        prev_sample = mean + std * _randn(mean.shape, generator, mean.device)
    else:
        if generator is not None:
            raise ValueError("pass either prev_sample (to score a transition) or generator (to draw one), not both")
        prev_sample = prev_sample.float()
    if unnormalized:
        delta = (prev_sample.detach() - mean) ** 2
        log_prob = -delta.mean(dim=tuple(range(1, delta.ndim)))
    else:
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample, log_prob, mean, std)


def widened_step(step: StepOutput, scale: Scalar, prev_sample: Tensor | None = None, generator: Generator = None):
    """The transition ``step`` with its std multiplied by ``scale`` and its mean unchanged: draw from (or score
    ``prev_sample`` under) ``N(mean, (scale * std)^2)``.

    BranchGRPO spreads siblings apart at a split by drawing with ``scale`` times the kernel's noise around the kernel's
    own mean (docs/methods/grpo.md#branchgrpo); drawing and scoring with the same widened std keeps the transition a
    sample of the density its ratio uses.

    Args:
        step: a stochastic kernel's output (its ``mean`` and ``std``; its draw is discarded).
        scale: std multiplier, a float or ``[B]`` tensor, > 0.
        prev_sample: score this transition instead of drawing one.
        generator: generator(s) for the draw.
    """
    # The kernel's std is already broadcastable to the sample (0-d or [B, 1, ...]).
    std = torch.as_tensor(step.std, dtype=torch.float32, device=step.mean.device) * _coef(scale, step.mean)
    return _finish(step.mean, std, prev_sample, generator)


# --- flow matching: stochastic kernels ------------------------------------------------------------------------


def flow_sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    prev_sample: Tensor | None = None,
    generator: Generator = None,
) -> StepOutput:
    """Flow-GRPO's ODE-to-SDE step (``sde_type="sde"``, docs/samplers.md#flow-sde-step; Liu et al. 2025, Eq. 8-9).

    Euler-Maruyama step of ``dx = [v + s_t^2 / (2t) * (x + (1 - t) v)] dt + s_t dw`` with
    ``s_t = a * sqrt(t / (1 - t))``, whose marginals equal those of the flow ODE for any ``a``:

        mean = x + dt * (v + s^2 / (2 sigma) * eps_hat),   eps_hat = x + (1 - sigma) * v
        std  = s * sqrt(-dt),                               s = a * sqrt(sigma / (1 - sigma))

    At ``sigma == 1`` the reference replaces ``1 - sigma`` by ``1 - scheduler.sigmas[1]``; ``sigma == 1`` only
    occurs at the first step, where ``scheduler.sigmas[1] == sigma_next``, so ``sigma_next`` is used here.

    Args:
        velocity: ``[B, ...]`` model output ``v_hat`` (the CFG-combined one when guidance is used).
        sample: ``[B, ...]`` current sample ``x`` at ``sigma``.
        sigma: Current noise level in (0, 1].
        sigma_next: Next noise level, ``0 <= sigma_next < sigma``.
        noise_level: ``a`` (0.7 for SD3.5, 0.9 for FLUX in flow_grpo); 0 gives the Euler ODE step.
        prev_sample: Stored next sample to score instead of drawing one.
        generator: Generator(s) for the noise draw; one per sample when a list.

    Returns:
        :class:`StepOutput` with ``std = s * sqrt(sigma - sigma_next)``.
    """
    velocity, sample = velocity.float(), sample.float()
    sigma, sigma_next = _coef(sigma, sample), _coef(sigma_next, sample)
    dt = sigma_next - sigma
    safe_sigma = torch.where(sigma == 1, sigma_next, sigma)
    s_sq = _coef(noise_level, sample) ** 2 * sigma / (1 - safe_sigma)
    eps_hat = sample + (1 - sigma) * velocity
    mean = sample + dt * (velocity + s_sq / (2 * sigma) * eps_hat)
    return _finish(mean, torch.sqrt(s_sq * -dt), prev_sample, generator)


def flow_sde_const_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    eta: Scalar,
    prev_sample: Tensor | None = None,
    generator: Generator = None,
) -> StepOutput:
    """DanceGRPO's SDE step with a time-constant diffusion coefficient (``flux_step``).

    See docs/samplers.md#constant-noise-step.

    The same reverse-time SDE as :func:`flow_sde_step` with ``s_t = eta`` constant:

        mean = x + dt * (v + eta^2 / (2 sigma) * eps_hat)   (score = -eps_hat / sigma)
        std  = eta * sqrt(-dt)

    Args:
        velocity: ``[B, ...]`` model output.
        sample: ``[B, ...]`` current sample at ``sigma``.
        sigma: Current noise level in (0, 1].
        sigma_next: Next noise level, ``0 <= sigma_next < sigma``.
        eta: Diffusion coefficient (0.3 in DanceGRPO's FLUX recipe, 0.7 in MixGRPO); 0 gives the Euler step.
        prev_sample: Stored next sample to score instead of drawing one.
        generator: Generator(s) for the noise draw.

    Returns:
        :class:`StepOutput` with ``std = eta * sqrt(sigma - sigma_next)``.
    """
    velocity, sample = velocity.float(), sample.float()
    sigma, sigma_next, eta = _coef(sigma, sample), _coef(sigma_next, sample), _coef(eta, sample)
    dt = sigma_next - sigma
    eps_hat = sample + (1 - sigma) * velocity
    mean = sample + dt * (velocity + eta**2 / (2 * sigma) * eps_hat)
    return _finish(mean, eta * torch.sqrt(-dt), prev_sample, generator)


def cps_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    prev_sample: Tensor | None = None,
    generator: Generator = None,
    unnormalized_log_prob: bool = False,
) -> StepOutput:
    """Coefficients-preserving sampling (flow_grpo ``sde_type="cps"``, Wang & Yu 2025).

    See docs/samplers.md#cps-step.

    A DDIM-style step in flow coordinates whose noise coefficient stays exactly ``sigma_next``:

        std  = sigma_next * sin(a * pi / 2)
        mean = (1 - sigma_next) * x0_hat + sqrt(sigma_next^2 - std^2) * eps_hat

    The last step (``sigma_next = 0``) has zero noise and returns ``log_prob=None``. With exact ``x0`` this is the
    DDIM posterior; with the posterior-mean ``x0_hat`` every step resamples a fixed fraction ``sin^2(a pi / 2)``
    of the noise from a mean estimate, so the marginals are not those of the ODE (the variance shrinks; see
    tests/samplers/test_marginals.py, which measures it).

    Args:
        velocity: ``[B, ...]`` model output.
        sample: ``[B, ...]`` current sample at ``sigma``.
        sigma: Current noise level in (0, 1].
        sigma_next: Next noise level, ``0 <= sigma_next < sigma``.
        noise_level: ``a`` in [0, 1] (flow_grpo uses 0.8); 0 gives the Euler ODE step.
        prev_sample: Stored next sample to score instead of drawing one.
        generator: Generator(s) for the noise draw.
        unnormalized_log_prob: Return flow_grpo's CPS score ``-mean_dims((x' - mean)^2)`` (constants and the
            ``1 / (2 std^2)`` factor dropped) instead of the Gaussian log-density. Its ratios are not likelihood
            ratios; flow_grpo's CPS recipe (clip range 1e-5) was tuned on it.

    Returns:
        :class:`StepOutput` with ``std = sigma_next * sin(a * pi / 2)``.
    """
    velocity, sample = velocity.float(), sample.float()
    sigma, sigma_next = _coef(sigma, sample), _coef(sigma_next, sample)
    std = sigma_next * torch.sin(_coef(noise_level, sample) * (math.pi / 2))
    x0_hat = sample - sigma * velocity
    eps_hat = sample + (1 - sigma) * velocity
    # clamp: sigma_next^2 - std^2 >= 0 analytically, but may round to a tiny negative number at a = 1.
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp(min=0)) * eps_hat
    return _finish(mean, std, prev_sample, generator, unnormalized=unnormalized_log_prob)


# --- flow matching: deterministic ODE steps ---------------------------------------------------------------------


def predict_x0(velocity: Tensor, sample: Tensor, sigma: Scalar) -> Tensor:
    """Data prediction of a flow model, ``x0_hat = x - sigma * v`` in fp32 (the history of the 2M solver)."""
    sample = sample.float()
    return sample - _coef(sigma, sample) * velocity.float()


def ode_step(velocity: Tensor, sample: Tensor, sigma: Scalar, sigma_next: Scalar) -> StepOutput:
    """Euler step of the flow ODE, ``x' = x + (sigma_next - sigma) * v``.

    Equals ``FlowMatchEulerDiscreteScheduler.step`` (without stochastic sampling) and every stochastic flow
    kernel at zero noise.

    Args:
        velocity: ``[B, ...]`` model output.
        sample: ``[B, ...]`` current sample at ``sigma``.
        sigma: Current noise level.
        sigma_next: Next noise level.

    Returns:
        :class:`StepOutput` with ``log_prob=None`` and ``std=0``.
    """
    velocity, sample = velocity.float(), sample.float()
    prev_sample = sample + (_coef(sigma_next, sample) - _coef(sigma, sample)) * velocity
    return StepOutput(prev_sample, None, prev_sample, 0.0)


def _half_log_snr(sigma: Tensor) -> Tensor:
    """``lambda = log(alpha / sigma) = log((1 - sigma) / sigma)`` for the flow schedule (-inf at sigma = 1)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def dpm_solver_2m_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    prev_x0: Tensor | None = None,
    sigma_prev: Scalar | None = None,
) -> StepOutput:
    """One DPM-Solver++(2M) step (midpoint form) of the flow ODE: second order, one model call per step.

    The solver MixGRPO-Flash uses outside the SDE window (``dpmsolver++``, order 2, ``midpoint``; Lu et al. 2022,
    Alg. 2; docs/samplers.md#dpm-solver-2m-step). With ``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``,
    ``h = lambda_next - lambda`` and the data predictions ``D0 = x0_hat`` (now) and ``x0_prev`` (previous step):

        x' = (sigma_next / sigma) * x - alpha_next * (exp(-h) - 1) * (D0 + 0.5 * D1),
        D1 = (h / h_prev) * (D0 - x0_prev),   h_prev = lambda - lambda_prev

    Without history, or when ``sigma_next == 0`` (``lambda = inf``), ``D1 = 0`` and the step is first order,
    i.e. exactly the Euler step; this matches ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction", solver_order=2)``, which also steps first-order first and last.
    Multistep rather than Heun so that an NFE budget buys twice the steps. After a stochastic step the history
    belongs to a different trajectory: start again without it (MixGRPO-Flash restarts the solver after the
    window).

    Args:
        velocity: ``[B, ...]`` model output at ``(sample, sigma)``.
        sample: ``[B, ...]`` current sample.
        sigma: Current noise level in (0, 1].
        sigma_next: Next noise level, ``0 <= sigma_next < sigma``.
        prev_x0: ``[B, ...]`` :func:`predict_x0` of the previous step, or ``None`` for a first-order step.
        sigma_prev: Noise level of the previous step (required with ``prev_x0``).

    Returns:
        :class:`StepOutput` with ``log_prob=None`` and ``std=0``.
    """
    sample = sample.float()
    sigma, sigma_next = _coef(sigma, sample), _coef(sigma_next, sample)
    x0 = sample - sigma * velocity.float()
    # exp(-h) = (sigma_next / alpha_next) * (alpha / sigma), written without logs so that sigma = 1 and
    # sigma_next = 0 are exact; alpha_next * (exp(-h) - 1) simplifies to the coefficient below.
    x0_coef = (1 - sigma_next) - sigma_next * (1 - sigma) / sigma
    d = x0
    if prev_x0 is not None:
        if sigma_prev is None:
            raise ValueError("prev_x0 needs sigma_prev")
        lam, lam_next = _half_log_snr(sigma), _half_log_snr(sigma_next)
        ratio = (lam_next - lam) / (lam - _half_log_snr(_coef(sigma_prev, sample)))
        # At sigma_next = 0 the ratio is inf: fall back to first order there, as diffusers does.
        ratio = torch.where(sigma_next > 0, ratio, torch.zeros_like(ratio))
        d = x0 + 0.5 * ratio * (x0 - prev_x0.float())
    prev_sample = (sigma_next / sigma) * sample + x0_coef * d
    return StepOutput(prev_sample, None, prev_sample, 0.0)


# --- epsilon / v-prediction: DDIM -------------------------------------------------------------------------------


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Scalar,
    alpha_prod_prev: Scalar,
    eta: Scalar,
    prediction_type: str = "epsilon",
    prev_sample: Tensor | None = None,
    generator: Generator = None,
    clip_sample_range: float | None = None,
) -> StepOutput:
    """DDIM step with noise ``eta`` (DDPO, docs/samplers.md#ddim-step; Song et al. 2021, Eq. 12 and 16).

        x0_hat, eps_hat from the model output (epsilon, v_prediction or sample parameterisation)
        std  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        mean = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps_hat

    ``eta = 0`` is ``DDIMScheduler.step`` (deterministic DDIM), ``eta = 1`` is DDPM's ancestral step. A step
    into ``a_prev = 1`` (diffusers' ``final_alpha_cumprod`` with ``set_alpha_to_one=True``) has zero noise.

    Args:
        model_output: ``[B, ...]`` epsilon, v or x0 prediction (CFG-combined when guidance is used).
        sample: ``[B, ...]`` current sample ``x_t``.
        alpha_prod_t: ``alphas_cumprod[t]``.
        alpha_prod_prev: ``alphas_cumprod`` at the previous timestep
            (:func:`diffalign.adapters.sd.ddim_alpha_prods`).
        eta: Noise scale in [0, 1] (DDPO uses 1.0).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        prev_sample: Stored next sample to score instead of drawing one.
        generator: Generator(s) for the noise draw.
        clip_sample_range: Clamp ``x0_hat`` to ``[-r, r]`` (the scheduler's ``clip_sample``); ``eps_hat`` is
            not recomputed, as diffusers with ``use_clipped_model_output=False``.

    Returns:
        :class:`StepOutput`.
    """
    model_output, sample = model_output.float(), sample.float()
    a_t, a_prev = _coef(alpha_prod_t, sample), _coef(alpha_prod_prev, sample)
    if prediction_type == "epsilon":
        x0_hat = (sample - torch.sqrt(1 - a_t) * model_output) / torch.sqrt(a_t)
        eps_hat = model_output
    elif prediction_type == "v_prediction":
        x0_hat = torch.sqrt(a_t) * sample - torch.sqrt(1 - a_t) * model_output
        eps_hat = torch.sqrt(a_t) * model_output + torch.sqrt(1 - a_t) * sample
    elif prediction_type == "sample":
        x0_hat = model_output
        eps_hat = (sample - torch.sqrt(a_t) * x0_hat) / torch.sqrt(1 - a_t)
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    if clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = _coef(eta, sample) * torch.sqrt(variance)
    # clamp: non-negative for eta <= 1 analytically; guards the rounding at eta = 1.
    mean = torch.sqrt(a_prev) * x0_hat + torch.sqrt((1 - a_prev - std**2).clamp(min=0)) * eps_hat
    return _finish(mean, std, prev_sample, generator)


KERNELS: dict[str, Callable[..., StepOutput]] = {
    "sde": flow_sde_step,
    "const": flow_sde_const_step,
    "cps": cps_step,
    "ddim": ddim_step,
}
"""Stochastic kernels by plan name: the flow kernels take ``(velocity, sample, sigma, sigma_next, noise)``,
``ddim`` takes ``(model_output, sample, alpha_prod_t, alpha_prod_prev, eta, prediction_type)``."""
