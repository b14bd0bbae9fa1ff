"""Weighted sums of rewards (flow_grpo's ``multi_score`` semantics, docs/rewards.md#weighted-sums).

``total = sum_k w_k * (r_k - shift_k) / scale_k`` with ``(shift_k, scale_k) = (0, 1)`` unless a per-reward
normalisation is given, e.g. ``normalize={"pickscore": (0.0, 26.0)}`` for flow_grpo's PickScore/26. The parts are
reported raw, in each reward's own units, so logs stay comparable across weightings.

The sum is differentiable only if every part is. A non-differentiable part (JPEG, a verifier) still adds its value
to the total, as a constant with respect to the images, so trainers that backpropagate through the reward check
``differentiable`` and refuse such a sum rather than silently ignoring a part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, check_images, check_prompts, check_scores


class WeightedSum(Reward):
    """A weighted sum of rewards that also reports each part.

    Args:
        weights: ``{reward: weight}``; a key is a registered name, a custom spec (``"pkg.mod:fn"``) or a built
            :class:`~rewards.base.Reward` (named by its ``name``).
        device: passed to every reward loaded by name.
        dtype: passed to every reward loaded by name.
        options: per-reward load options, ``{"pickscore": {"path": "/models/PickScore_v1"}}``.
        normalize: per-reward affine normalisation ``{name: (shift, scale)}`` applied before weighting.

    Example:
        >>> reward = WeightedSum({"pickscore": 1.0, "aesthetic": 0.5}, device="cuda")
        >>> total, parts = reward.score_parts(images, prompts)   # Tensor[B], {"pickscore": Tensor[B], ...}
    """

    name = "weighted_sum"

    def __init__(
        self,
        weights: Mapping[str | Reward, float],
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        normalize: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        from rewards.registry import load  # the registry builds WeightedSum from mappings: import late

        if not weights:
            raise ValueError("WeightedSum needs at least one reward")
        options = dict(options or {})
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        for key, weight in weights.items():
            if isinstance(key, Reward):
                reward = key
            else:
                reward = load(key, device=device, dtype=dtype, **options.pop(key, {}))
            name = key if isinstance(key, str) else reward.name
            if name in self.rewards:
                raise ValueError(f"WeightedSum: two parts are named {name!r}")
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"WeightedSum: the weight of {name!r} must be a finite number, got {weight!r}")
            self.rewards[name], self.weights[name] = reward, float(weight)
        if options:
            raise ValueError(f"WeightedSum: options given for rewards not in the sum: {sorted(options)}")
        self.normalize = self._check_normalize(normalize or {})
        self.differentiable = all(r.differentiable for r in self.rewards.values())
        self.needs_prompts = any(r.needs_prompts for r in self.rewards.values())

    def _check_normalize(self, normalize: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        unknown = sorted(set(normalize) - set(self.rewards))
        if unknown:
            raise ValueError(f"WeightedSum: normalize names rewards not in the sum: {unknown}")
        checked = {}
        for name, (shift, scale) in normalize.items():
            if not math.isfinite(shift) or not math.isfinite(scale) or scale == 0:
                raise ValueError(f"WeightedSum: normalize[{name!r}] needs a finite shift and a non-zero scale")
            checked[name] = (float(shift), float(scale))
        return checked

    def score_parts(self, images: Tensor, prompts: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Score with every part.

        Args:
            images: ``[B, 3, H, W]`` float in [0, 1].
            prompts: ``B`` strings (optional only if no part needs prompts).

        Returns:
            ``(total, parts)``: the weighted sum ``Tensor[B]`` float32 and ``{name: Tensor[B]}`` raw part scores.
        """
        check_images(images, self.name)
        prompt_list = check_prompts(prompts, images.shape[0], self.name, required=self.needs_prompts)
        total, parts = self._parts(images, prompt_list)
        return check_scores(total, images.shape[0], self.name, device=images.device), parts

    def _parts(self, images: Tensor, prompts: list[str] | None) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: reward.score(images, prompts) for name, reward in self.rewards.items()}
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for name, part in parts.items():
            shift, scale = self.normalize.get(name, (0.0, 1.0))
            total = total + self.weights[name] * (part - shift) / scale
        return total, parts

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self._parts(images, prompts)[0]

    def __repr__(self) -> str:
        terms = ", ".join(f"{name!r}: {weight:g}" for name, weight in self.weights.items())
        return f"WeightedSum({{{terms}}}, differentiable={self.differentiable})"
