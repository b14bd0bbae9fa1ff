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

import dataclasses
import random
from typing import Literal

import torch
from torch import Tensor


__all__ = [
    "ALIGNPROP_AESTHETIC_TARGET",
    "REFL_HINGE_TARGET",
    "SRPO_NEGATIVE_WORDS",
    "SRPO_POSITIVE_WORDS",
    "DirectAlignLevels",
    "diffusion_regulariser",
    "direct_align_grid",
    "direct_align_levels",
    "direct_align_recover",
    "direct_align_recover_vp",
    "image_refl_loss",
    "interpolate_alphas_cumprod",
    "is_plain_refl_batch",
    "refl_step_range",
    "relative_preference",
    "reward_loss",
    "sample_direct_align_index",
    "sample_refl_step",
    "sample_truncation_steps",
    "srp_captions",
    "srp_discount",
    "switch_timestep",
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


# ---------------------------------------------------------------------------------------------------------------------
# Direct-Align and SRPO (Shen et al., arXiv 2509.06942; code Tencent-Hunyuan/SRPO, fastvideo/SRPO.py @ 81e5898)
# ---------------------------------------------------------------------------------------------------------------------

SRPO_POSITIVE_WORDS: tuple[str, ...] = ("Natural-lighting", "Detail", "Detailed", "Real")
"""SRPO's positive control words (its realism adjectives), cycled with the optimizer step."""

SRPO_NEGATIVE_WORDS: tuple[str, ...] = ("Concept art", "Painting", "Anime", "Flat", "Oil")
"""SRPO's negative control words (its "CG / oily" adjectives), cycled with the optimizer step."""

DIRECT_ALIGN_EDGE = 5
"""The fine-grid index ``m`` is drawn from ``[5, L - 5]`` (SRPO ``random.randint(5, timestep_length - 5)``)."""

Branch = Literal["denoise", "inversion"]


@dataclasses.dataclass(frozen=True)
class DirectAlignLevels:
    """Where one Direct-Align branch injects and recovers on the fine grid (docs/methods/reward-backprop.md#srpo).

    Attributes:
        inject: grid position of the injection level (the denoiser sees ``x`` there).
        recover: grid position of the recovery level (the Euler step lands there).
        discount_index: the index into the ``k_t`` ramp of this branch.
    """

    inject: int
    recover: int
    discount_index: int


def sample_direct_align_index(grid_size: int = 1000, generator: RandomSource = None) -> int:
    """Direct-Align's fine-grid draw ``m``, uniform on ``[5, grid_size - 5]`` (one per optimizer step in SRPO; the
    larger ``m``, the noisier the recovery level)."""
    if grid_size < 2 * DIRECT_ALIGN_EDGE:
        raise ValueError(f"grid_size must be >= {2 * DIRECT_ALIGN_EDGE}, got {grid_size}")
    return _uniform_int(DIRECT_ALIGN_EDGE, grid_size - DIRECT_ALIGN_EDGE, generator)


def direct_align_levels(m: int, offset: int, grid_size: int, branch: Branch) -> DirectAlignLevels:
    """Grid positions of one branch for the draw ``m`` (SRPO's index arithmetic; position 0 is the noisiest level).

    The offset is clipped to ``k = min(offset, grid_size - m, m)``. The denoise branch injects ``k`` positions above
    the recovery level ``L - m`` and steps down; the inversion branch injects ``k`` positions below it (at ``L -
    max(m - k, 1)``) and steps up to ``L - min(max(m - k, 1) + k, L)``, which is ``L - m`` unless ``m = k``.

    Args:
        m: the draw of :func:`sample_direct_align_index`.
        offset: SRPO's ``int((1 - groundtruth_ratio) * L) + 1`` (100 for ratio 0.9 and ``L = 1000``).
        grid_size: ``L``, the fine grid's length.
        branch: ``"denoise"`` or ``"inversion"``.
    """
    if not 1 <= m < grid_size or offset < 1:
        raise ValueError(f"need 1 <= m < grid_size and offset >= 1, got m={m}, offset={offset}, grid={grid_size}")
    k = min(offset, grid_size - m, m)
    if branch == "denoise":
        return DirectAlignLevels(inject=grid_size - m - k, recover=grid_size - m, discount_index=m)
    if branch == "inversion":
        low = max(m - k, 1)
        recover = grid_size - min(low + k, grid_size)
        return DirectAlignLevels(inject=grid_size - low, recover=recover, discount_index=low)
    raise ValueError(f"branch must be 'denoise' or 'inversion', got {branch!r}")


def direct_align_grid(levels: Tensor, step_range: tuple[int, int], grid_size: int = 1000) -> Tensor:
    """The fine grid ``linspace(levels[a], levels[b], grid_size)`` between two steps of a coarse schedule (SRPO:
    the 50-step shifted sigmas, ``(a, b) = train_timestep = (5, 25)``).

    Args:
        levels: ``[S]`` the coarse schedule's noise levels (flow sigmas, or timesteps for epsilon / v models).
        step_range: ``(a, b)`` indices into ``levels``.
        grid_size: points of the fine grid.

    Returns:
        ``[grid_size]`` fp32 levels from ``levels[a]`` to ``levels[b]``.
    """
    first, last = step_range
    if not 0 <= first < last < levels.shape[0]:
        raise ValueError(f"step_range {step_range} must satisfy 0 <= a < b < {levels.shape[0]}")
    return torch.linspace(float(levels[first]), float(levels[last]), grid_size)


def srp_discount(ramp: tuple[float, float], grid_size: int, index: int) -> float:
    """SRPO's timestep discount ``k_t = linspace(ramp[0], ramp[1], grid_size)[index]`` (denoise ``(0.1, 0.25)``,
    inversion ``(0.3, 0.01)`` in the HPS script)."""
    return float(torch.linspace(ramp[0], ramp[1], grid_size, dtype=torch.float64)[index])


def direct_align_recover(
    sample: Tensor, velocity: Tensor, noise: Tensor, sigma_from: float, sigma_to: float
) -> Tensor:
    """Flow Direct-Align: one Euler step from ``sigma_from`` to ``sigma_to``, then the known-noise recovery.

    ``x_t = x_a + (sigma_to - sigma_from) * v`` (down for the denoise branch, up for the inversion branch) and
    ``x0_hat = (x_t - sigma_to * noise) / (1 - sigma_to)``: exact (``x0_hat = x0``) when ``v = noise - x0`` is the
    true velocity of ``x_a = (1 - sigma_from) x0 + sigma_from noise``.

    Args:
        sample: ``[B, ...]`` ``x_a``, the latents the model saw.
        velocity: ``[B, ...]`` the model's velocity at ``x_a``.
        noise: ``[B, ...]`` the injected (known) noise.
        sigma_from: the injection level ``sigma_a``.
        sigma_to: the recovery level ``sigma_t`` (< 1).

    Returns:
        ``[B, ...]`` fp32 ``x0_hat``, differentiable in ``velocity``.
    """
    moved = sample.float() + (sigma_to - sigma_from) * velocity.float()
    return (moved - sigma_to * noise.float()) / (1 - sigma_to)


def direct_align_recover_vp(
    sample: Tensor,
    model_output: Tensor,
    noise: Tensor,
    alpha_from: float,
    alpha_to: float,
    prediction_type: str,
) -> Tensor:
    """Epsilon / v analogue of :func:`direct_align_recover`: a DDIM (eta 0) step from ``alpha_bar = alpha_from`` to
    ``alpha_to``, then the known-noise recovery ``x0_hat = (x_t - sqrt(1 - a_t) noise) / sqrt(a_t)``.

    The DDIM step lands on ``sqrt(a_t) x0_pred + sqrt(1 - a_t) eps_pred``, so ``x0_hat = x0_pred + sqrt((1 - a_t) /
    a_t) (eps_pred - noise)``: exact when the model's ``eps_pred`` is the injected noise.

    Args:
        sample: ``[B, ...]`` ``x_a = sqrt(a_a) x0 + sqrt(1 - a_a) noise``.
        model_output: ``[B, ...]`` epsilon or v at ``x_a``.
        noise: ``[B, ...]`` the injected noise.
        alpha_from: ``alpha_bar`` at the injection level.
        alpha_to: ``alpha_bar`` at the recovery level.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
    """
    x, output = sample.float(), model_output.float()
    a_from, a_to = torch.tensor(alpha_from, dtype=torch.float64), torch.tensor(alpha_to, dtype=torch.float64)
    s_from, c_from = float((1 - a_from).sqrt()), float(a_from.sqrt())
    if prediction_type == "epsilon":
        eps, x0 = output, (x - s_from * output) / c_from
    elif prediction_type == "v_prediction":
        eps, x0 = s_from * x + c_from * output, c_from * x - s_from * output
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    moved = float(a_to.sqrt()) * x0 + float((1 - a_to).sqrt()) * eps
    return (moved - float((1 - a_to).sqrt()) * noise.float()) / float(a_to.sqrt())


def interpolate_alphas_cumprod(alphas_cumprod: Tensor, timestep: float) -> float:
    """``alpha_bar`` at a continuous timestep: linear interpolation of the training table ``[N]`` (timestep ``i``
    has ``alphas_cumprod[i]``), for Direct-Align's off-schedule levels on epsilon / v models."""
    if not 0 <= timestep <= alphas_cumprod.shape[0] - 1:
        raise ValueError(f"timestep {timestep} lies outside [0, {alphas_cumprod.shape[0] - 1}]")
    low = int(timestep)
    high = min(low + 1, alphas_cumprod.shape[0] - 1)
    frac = timestep - low
    return float((1 - frac) * alphas_cumprod[low].double() + frac * alphas_cumprod[high].double())


def srp_captions(
    prompts: list[str], step: int, positive_words: tuple[str, ...], negative_words: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """SRPO's control-word prompts of an optimizer step: ``"<word>. <prompt>"`` with the positive word
    ``positive_words[step % len]`` and the negative word ``negative_words[step % len]`` (reward side only)."""
    positive, negative = positive_words[step % len(positive_words)], negative_words[step % len(negative_words)]
    return [f"{positive}. {p}" for p in prompts], [f"{negative}. {p}" for p in prompts]


def relative_preference(preferred: Tensor, rejected: Tensor, discount: float) -> Tensor:
    """Semantic Relative Preference ``(1 + k) s(x, c_preferred) - s(x, c_rejected)`` ``[B]``.

    The denoise branch prefers the positive-word prompt, the inversion branch the negative one (SRPO swaps them
    there, since its step runs against the model's estimate). SRPO's code form; its comment notes that the paper's
    ``(1 - k) neg + k pos`` trained less stably.
    """
    return (1 + discount) * preferred - rejected


# ---------------------------------------------------------------------------------------------------------------------
# ImageReFL (Sorokin et al., arXiv 2505.22569; code ControlGenAI/ImageReFL @ 398f730)
# ---------------------------------------------------------------------------------------------------------------------


def switch_timestep(timesteps: Tensor, switch_step: int) -> float:
    """The ``lora_max_timestep`` of a combined generation switching to the LoRA at step ``switch_step``.

    The base model runs steps ``0 .. s - 1`` and the LoRA steps ``s .. T - 1`` (ImageReFL's
    ``CombinedGenerationInferencer``): the LoRA acts at timesteps at or below ``timesteps[s]``. ``s = T`` (base model
    throughout) gives ``-1``, below every timestep.

    Args:
        timesteps: ``[T]`` the sampling schedule's timesteps, decreasing.
        switch_step: ``s`` in ``[0, T]``.
    """
    count = timesteps.shape[0]
    if not 0 <= switch_step <= count:
        raise ValueError(f"switch_step must be in [0, {count}], got {switch_step}")
    return -1.0 if switch_step == count else float(timesteps[switch_step])


def diffusion_regulariser(prediction: Tensor, target: Tensor) -> Tensor:
    """ImageReFL's diffusion loss on the real image: ``mean((prediction - target)^2)`` over every element (torch's
    ``mse_loss``), fp32; the target is the family's regression target (epsilon for SD1.5, ``noise - x0`` for flows)."""
    return (prediction.float() - target.float()).pow(2).mean()


def image_refl_loss(
    reward_term: Tensor, regulariser: Tensor, weight: float = 1e-3, mse_weight: float = 0.01
) -> Tensor:
    """ImageReFL's total ``weight * (L_R + mse_weight * L_D)`` (published ``loss_scale`` 1e-3, ``mse_loss_scale``
    0.01), with ``L_R`` the unweighted reward loss (``-mean r`` for HPS)."""
    return weight * (reward_term + mse_weight * regulariser)


def is_plain_refl_batch(batch_index: int, every: int | None) -> bool:
    """Whether batch ``batch_index`` (0-based) of an ImageReFL run is a plain ReFL batch (from noise): every
    ``every``-th one, ImageReFL's ``state_del`` counter (batches ``every - 1``, ``2 every - 1``, ...); never when
    ``every`` is None."""
    if every is None:
        return False
    if every < 1:
        raise ValueError(f"every must be >= 1 or None, got {every}")
    return (batch_index + 1) % every == 0
