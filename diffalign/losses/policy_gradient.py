"""PPO-style clipped policy loss and KL to the reference for Flow-GRPO / DDPO (docs/methods/grpo.md).

Per trained timestep ``j`` the trainer re-scores the stored transition ``x_j -> x_{j+1}`` under the current
policy (the kernels of :mod:`diffalign.samplers.steps` with ``prev_sample=``), then calls

    policy_loss, info = clipped_policy_loss(log_probs, old_log_probs, advantages, clip_range, adv_clip_max=5)
    kl = kl_to_reference(out.mean, ref_out.mean, out.std, step_size=sigma - sigma_next).mean()
    loss = policy_loss + beta * kl

Log-probs are means over the non-batch dims (every reference does so, docs/methods/grpo.md#log-probabilities), so
ratios stay within ~1e-4 of 1 and the clip ranges are 1e-4 (1e-5 for Flow-GRPO-Fast / CPS), not PPO's 0.2.
"""

from typing import Literal

import torch
from torch import Tensor


__all__ = [
    "clipped_policy_loss",
    "grpo_guard_log_ratio",
    "kl_to_reference",
    "noise_aware_weights",
    "recentred_log_ratio",
]


def clipped_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_range: float,
    adv_clip_max: float | None = None,
    *,
    log_ratio: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7) as Flow-GRPO and DDPO compute it.

    See docs/methods/grpo.md#clipped-policy-loss.

    ``ratio = exp(log_probs - old_log_probs)`` and
    ``loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)))``.

    Args:
        log_probs: ``[B]`` log-probs of the stored transitions under the current policy (with gradients).
        old_log_probs: ``[B]`` log-probs recorded at sampling time (detached here).
        advantages: ``[B]`` advantages (detached here).
        clip_range: PPO ``epsilon`` (flow_grpo / ddpo 1e-4; Flow-GRPO-Fast and CPS 1e-5).
        adv_clip_max: clamp advantages to ``[-adv_clip_max, adv_clip_max]`` first (5 in every reference);
            ``None`` leaves them as they are.
        log_ratio: ``[B]`` the log-ratio the surrogate exponentiates when a ratio guard transforms it
            (:func:`recentred_log_ratio`, :func:`grpo_guard_log_ratio`); default ``log_probs - old_log_probs``.
        weights: ``[B]`` per-element loss weights (detached here; GRPO-Guard's ``1 / |dt|``); the loss is then
            ``mean(weights * max(...))``. Default 1.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached 0-d tensors ``policy_loss``, ``clipfrac``
        (``|ratio - 1| > clip_range``), ``clipfrac_gt_one`` (``ratio - 1 > clip_range``), ``clipfrac_lt_one``
        (``1 - ratio > clip_range``), ``ratio_mean`` (of the ratio used in the loss) and ``approx_kl``
        ``= 0.5 * mean((log_probs - old_log_probs)^2)`` (of the raw log-ratio). ``policy_loss`` includes the
        weights.
    """
    if log_probs.shape != old_log_probs.shape or log_probs.shape != advantages.shape:
        raise ValueError(
            f"shapes differ: log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    advantages = advantages.detach()
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    raw_log_ratio = log_probs - old_log_probs.detach()
    used = raw_log_ratio if log_ratio is None else log_ratio
    for name, value in (("log_ratio", used), ("weights", weights)):
        if value is not None and value.shape != raw_log_ratio.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(raw_log_ratio.shape)}")
    ratio = torch.exp(used)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_element = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_element = per_element * weights.detach().to(per_element.dtype)
    loss = per_element.mean()
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "clipfrac_gt_one": (ratio - 1.0 > clip_range).float().mean(),
            "clipfrac_lt_one": (1.0 - ratio > clip_range).float().mean(),
            "approx_kl": 0.5 * (raw_log_ratio**2).mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, metrics


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A float, 0-d, ``[B]`` or broadcastable ``[B, 1, ...]`` value as fp32 broadcasting against ``like``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 1 and like.ndim > 1:
        value = value.view(-1, *([1] * (like.ndim - 1)))
    return value


def kl_to_reference(
    mean: Tensor,
    ref_mean: Tensor,
    std: Tensor | float,
    convention: Literal["flow_grpo", "true_kl"] = "flow_grpo",
    step_size: Tensor | float | None = None,
) -> Tensor:
    """KL between the policy's and the reference's Gaussian transitions of the same step.

    See docs/methods/grpo.md#kl-to-the-reference.

    Both transitions share the std, so ``KL(N(mu, s^2) || N(mu_ref, s^2)) = (mu - mu_ref)^2 / (2 s^2)``
    per element, reduced by the mean over the non-batch dims (as the log-probs are).

    **Conventions — beta values do not carry over between them:**

    - ``"true_kl"``: divides by ``2 * std^2`` with ``std`` the transition std (``StepOutput.std``), the actual
      Gaussian KL of the step (Flow-GRPO paper; flow_grpo's early code with ``beta=0.004``; use it for DDPO).
    - ``"flow_grpo"`` (default; the code behind flow_grpo's ``beta=0.04`` at T=10, 0.01 for PickScore): divides
      by ``2 * std_dev_t^2`` where ``std = std_dev_t * sqrt(step_size)``, i.e. it is the true KL times
      ``|dt| = sigma - sigma_next``. This up-weights late, small-``dt`` steps relative to the true KL
      (maintainer, flow_grpo issue #22; issue #78). The ``|dt|`` of a schedule sum to 1, so at T=10 this KL is
      ~10x smaller than the true KL on average, hence beta 0.04 here vs 0.004 there.

    Args:
        mean: ``[B, ...]`` policy transition mean (with gradients).
        ref_mean: ``[B, ...]`` reference transition mean (base model, LoRA disabled; detached here).
        std: transition std of the step, ``StepOutput.std``: a float, 0-d, ``[B]`` or ``[B, 1, ...]``; > 0.
        convention: ``"flow_grpo"`` or ``"true_kl"`` (see above).
        step_size: ``sigma - sigma_next`` (> 0) of the step, float / 0-d / ``[B]``; required for ``"flow_grpo"``.

    Returns:
        ``[B]`` fp32 KL per sample; the trainer averages it over the batch and multiplies by ``beta``.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} != ref_mean shape {tuple(ref_mean.shape)}")
    variance = _per_sample(std, mean) ** 2
    if not bool((variance > 0).all()):
        raise ValueError("std must be > 0: a deterministic (zero-noise) step has no KL")
    if convention == "flow_grpo":
        if step_size is None:
            raise ValueError("convention='flow_grpo' needs step_size = sigma - sigma_next")
        variance = variance / _per_sample(step_size, mean)  # std_dev_t^2
    elif convention != "true_kl":
        raise ValueError(f"convention must be 'flow_grpo' or 'true_kl', got {convention!r}")
    kl = (mean.float() - ref_mean.detach().float()) ** 2 / (2 * variance)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def recentred_log_ratio(log_ratio: Tensor) -> Tensor:
    """The log-ratio of one step re-centred over the batch (``train.ratio_guard: recenter``; docs/methods/grpo.md,
    "Ratio guards").

    Subtracts the batch mean, detached: the ratios of the batch then have geometric mean 1, and the gradient of each
    sample's log-prob is unchanged (a constant shift). A simple stand-in for GRPO-Guard's per-sample correction
    (:func:`grpo_guard_log_ratio`) that needs no stored means.

    Args:
        log_ratio: ``[B]`` ``log_probs - old_log_probs`` of one timestep, or ``[B, k]`` of ``k`` timesteps, each
            column re-centred on its own (do not mix steps in a column).

    Returns:
        The re-centred log-ratio, shaped as ``log_ratio``.
    """
    return log_ratio - log_ratio.detach().mean(dim=0, keepdim=True)


def grpo_guard_log_ratio(
    log_probs: Tensor, old_log_probs: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor | float
) -> Tensor:
    """GRPO-Guard's normalised log-ratio (Wang et al. 2025, arXiv 2510.22319; docs/methods/grpo.md, "Ratio guards").

    With the stored sample ``x' = mu_old + s * xi`` of a Gaussian step of std ``s`` (the rollout's mean ``mu_old``,
    ``xi ~ N(0, I)``) and the current mean ``mu``, the Gaussian log-ratio is
    ``mean(xi * (mu - mu_old)) / s - mean((mu - mu_old)^2) / (2 s^2)`` (means over the non-batch dims): its
    expectation is negative and grows as ``s`` shrinks. GRPO-Guard adds the bias term back (with its gradient
    through ``mu``) and multiplies by ``s``:

        ``s * (log_probs - old_log_probs + mean((mu - mu_old)^2) / (2 s^2)) = mean(xi * (mu - mu_old))``,

    centred at 0 for every sample and step, with a spread that no longer carries the ``1 / s`` factor (so its clip
    range is far smaller than Flow-GRPO's; verl-omni's example uses 2e-6).

    Args:
        log_probs: ``[B]`` Gaussian log-probs of the stored transitions under the current policy (mean over dims).
        old_log_probs: ``[B]`` the same at sampling time (detached here).
        mean: ``[B, ...]`` the current transition means ``mu`` (with gradients).
        old_mean: ``[B, ...]`` the transition means recorded at sampling time (detached here).
        std: the transitions' std ``s``: a float, 0-d, ``[B]`` or ``[B, 1, ...]``; > 0.

    Returns:
        ``[B]`` normalised log-ratio (exponentiate for the ratio).
    """
    if mean.shape != old_mean.shape or mean.shape[0] != log_probs.shape[0]:
        raise ValueError(f"mean {tuple(mean.shape)}, old_mean {tuple(old_mean.shape)}, log_probs {log_probs.shape}")
    scale = torch.as_tensor(std, dtype=torch.float32, device=log_probs.device).reshape(-1)
    if not bool((scale > 0).all()):
        raise ValueError("std must be > 0: a deterministic step has no ratio")
    drift = (mean.float() - old_mean.detach().float()) ** 2
    bias = drift.mean(dim=tuple(range(1, drift.ndim))) / (2 * scale**2)
    return scale * (log_probs - old_log_probs.detach() + bias)


def noise_aware_weights(step_stds: Tensor) -> Tensor:
    """TempFlow-GRPO's noise-aware weights of the trained steps (docs/methods/grpo.md#tempflow-grpo).

    Each step's policy loss is scaled by its transition std (``sigma_t sqrt(dt)`` of the SDE kernel): steps with more
    noise explore more and weigh more. TempFlow-GRPO's code multiplies the std by a hand-set constant (2.25 for SD3.5,
    1.73 for FLUX) which is, for its schedules, one over the mean std of the trained steps; here the constant is that
    mean, so the weights average 1 for any schedule and the learning rate keeps its meaning.

    Args:
        step_stds: ``[S]`` transition std of each trained step (a schedule quantity, no gradient).

    Returns:
        ``[S]`` weights ``std_j / mean_j std``.
    """
    stds = step_stds.detach().to(torch.float32)
    if stds.ndim != 1 or stds.numel() == 0 or not bool((stds > 0).all()):
        raise ValueError(f"step_stds must be a non-empty [S] tensor of positive stds, got {step_stds}")
    return stds / stds.mean()
