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


__all__ = ["clipped_policy_loss", "kl_to_reference", "ratio_normalization"]


def clipped_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_range: float,
    adv_clip_max: float | None = None,
    *,
    ratio_norm: bool = False,
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
        ratio_norm: re-centre the log-ratio over the batch first (:func:`ratio_normalization`, GRPO-Guard).

    Returns:
        ``(loss, metrics)``: the scalar loss and detached 0-d tensors ``policy_loss``, ``clipfrac``
        (``|ratio - 1| > clip_range``), ``clipfrac_gt_one`` (``ratio - 1 > clip_range``), ``clipfrac_lt_one``
        (``1 - ratio > clip_range``), ``ratio_mean`` (of the ratio used in the loss) and ``approx_kl``
        ``= 0.5 * mean((log_probs - old_log_probs)^2)`` (of the raw log-ratio).
    """
    if log_probs.shape != old_log_probs.shape or log_probs.shape != advantages.shape:
        raise ValueError(
            f"shapes differ: log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    advantages = advantages.detach()
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_probs - old_log_probs.detach()
    used = ratio_normalization(log_ratio) if ratio_norm else log_ratio
    ratio = torch.exp(used)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "clipfrac_gt_one": (ratio - 1.0 > clip_range).float().mean(),
            "clipfrac_lt_one": (1.0 - ratio > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
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


def ratio_normalization(log_ratio: Tensor, target_std: float | None = None, eps: float = 1e-12) -> Tensor:
    """GRPO-Guard's RatioNorm, as a documented simple version (docs/methods/grpo.md#rationorm; follows the paper's
    description, not its code, which was not read).

    Why: with ``x' ~ N(mu_old, s^2)`` the expected log-ratio is ``-||mu - mu_old||^2 / (2 s^2) < 0`` (a KL), so
    the ratio distribution of a step is shifted below 1, most at low-noise steps; one-sided PPO clipping then
    stops bounding positive-advantage updates. Here the log-ratio of one step is re-centred over the batch so
    that its batch mean is 0 (geometric-mean ratio 1); the subtracted mean is detached (a constant shift, like a
    baseline), so the gradient of each sample's log-prob is unchanged. With ``target_std`` the centred log-ratio
    is also rescaled to that (detached) batch std, so that one ``clip_range`` means the same at every step.
    GRPO-Guard's second part, per-step gradient reweighting, is not implemented.

    Args:
        log_ratio: ``[B]`` ``log_probs - old_log_probs`` of one timestep (do not mix steps in one call).
        target_std: optional std to give the centred log-ratio (e.g. ``clip_range``); ``None`` only re-centres.
        eps: floor of the batch std when rescaling.

    Returns:
        ``[B]`` normalised log-ratio (exponentiate for the ratio).
    """
    centred = log_ratio - log_ratio.detach().mean()
    if target_std is None:
        return centred
    if log_ratio.numel() < 2:
        raise ValueError("rescaling the log-ratio needs a batch of at least 2")
    return centred * (target_std / centred.detach().std(correction=0).clamp_min(eps))
