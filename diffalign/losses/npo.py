"""Self-NPO's truncated diffusion fine-tuning as pure functions (docs/methods/self-npo.md).

Self-NPO (Wang et al. 2025, "Self-NPO: Data-Free Diffusion Model Enhancement via Truncated Diffusion Fine-Tuning")
trains a *negative* model from the model's own outputs: an EMA teacher walks a few DDIM steps from a noised data
latent under anti-guidance, its clean-image prediction at the point reached is the target, and the student learns
to predict that target from the point re-noised to a random higher level. The pieces are written on the
``(a, b)`` coefficients of the forward process ``x_t = a x0 + b eps`` (:mod:`diffalign.samplers.inversion`), so
they hold for epsilon, v and flow models alike.
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncation_grid(num_grid_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """``[num_grid_steps]`` start levels ``(k + 1) T / N - 1`` (Self-NPO's DDIM grid: 39, 79, ..., 999 for N = 25)."""
    step = num_train_timesteps // num_grid_steps
    return torch.arange(1, num_grid_steps + 1) * step - 1


def previous_level(level: Tensor, num_grid_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """One grid step down from ``level`` (``[B]``), clamped at 0: the clean end, where further steps stay."""
    return (level - num_train_timesteps // num_grid_steps).clamp(min=0)


def guided_output(text: Tensor, uncond: Tensor | None, weight: float) -> Tensor:
    """Self-NPO's teacher guidance ``text + w (text - uncond)``, applied to the model output (the same as to its
    x0 and noise predictions, which are linear in it at one ``(x_t, t)``). ``w = -1`` is the unconditional output
    alone (SD1.5's setting; ``uncond`` may then be the only one computed and ``text`` ignored); SDXL uses -5."""
    if weight == -1.0:
        return uncond
    if uncond is None:
        raise ValueError(f"teacher guidance {weight} needs the unconditional output")
    return text + weight * (text - uncond)


def renoise(sample: Tensor, source: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor], noise: Tensor) -> Tensor:
    """The forward transition from level ``e`` to the noisier level ``s``: ``a_s (x_e / a_e + sqrt(nsr_s^2 - nsr_e^2)
    z)`` with ``nsr = b / a`` (Self-NPO's re-noising, exact for the variance-preserving and the flow process).

    Args:
        sample: ``[B, ...]`` latents at ``e``.
        source: ``(a_e, b_e)``, each ``[B, 1, ..., 1]``.
        target: ``(a_s, b_s)``.
        noise: ``[B, ...]`` standard normal ``z``.
    """
    (a_e, b_e), (a_s, b_s) = source, target
    extra = ((b_s / a_s) ** 2 - (b_e / a_e) ** 2).clamp(min=0).sqrt()
    return a_s * (sample.float() / a_e + extra * noise.float())


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """``mean(sqrt((pred - target)^2 + c^2) - c)`` over every element (Self-NPO's ``huber`` loss, ``c = 0.001``)."""
    diff = pred.float() - target.float()
    return (torch.sqrt(diff**2 + c**2) - c).mean()
