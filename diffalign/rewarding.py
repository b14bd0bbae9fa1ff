"""Rewards as the trainers and evaluation use them: built from a config value or taken as given, scored by part.

The ``rewards`` package does the work (its registry, protocol checks and weighted sums); this module is the one
place where diffalign turns what a user passes into a reward object, so every trainer accepts the same things.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

import rewards


RewardLike = str | Mapping[str, float] | rewards.Reward | Callable[..., Any]
"""What a trainer accepts as its reward: a registered name (``"pickscore"``), a ``module:fn`` / ``file.py:fn``
spec, a ``{name: weight}`` mapping, a :class:`rewards.Reward`, or a scoring function
``fn(images, prompts) -> Tensor[B]``."""


def build_reward(reward: RewardLike, device: torch.device | str | None = None, **options: Any) -> rewards.Reward:
    """A :class:`rewards.Reward` from anything in :data:`RewardLike` (a ``Reward`` is returned as is).

    Names of installed packages' entry points (diffalign's own ``"shapes"``) resolve through the ``rewards``
    registry without this module importing them.
    """
    return rewards.load(dict(reward) if isinstance(reward, Mapping) else reward, device=device, **options)


def score_with_parts(reward: rewards.Reward, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """``{"reward": total [B], <part>: [B], ...}`` without gradients, float32 on the CPU.

    The parts are :meth:`rewards.Reward.score_parts`'s, less the one that is the total itself (a plain reward
    reports itself): a weighted sum's terms, a verifier's ``"strict"`` flag, nothing more for a plain reward. A part
    that happens to be named ``"reward"`` is listed as ``"reward_part"``, so the total is never overwritten.
    """
    with torch.no_grad():
        total, parts = reward.score_parts(images, prompts)
    scores = {"reward": total}
    for name, value in parts.items():
        if value is not total:
            scores["reward_part" if name == "reward" else name] = value
    return {name: value.detach().float().cpu() for name, value in scores.items()}
