"""Rewards as the trainers and evaluation use them: built from a config value or taken as given, scored by part.

The ``rewards`` package does the work (its registry, protocol checks and weighted sums); this module is the one
place where diffalign turns what a user passes into a reward object, so every trainer accepts the same things.
A reward mapping's terms (``{pickscore: {weight: 1.0, scale: 0.038461538461538464, dtype: bf16}}``) are
:class:`rewards.Term` objects, checked by :func:`rewards.parse_term` both here and, earlier, by the config layer
(docs/rewards.md#weighted-sums).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import rewards


RewardLike = str | Mapping[str, float | Mapping[str, Any]] | rewards.Reward | Callable[..., Any]
"""What a trainer accepts as its reward: a registered name (``"pickscore"``), a ``module:fn`` / ``file.py:fn``
spec, a mapping of those to weights or to term options (``{"pickscore": 1.0}``,
``{"pickscore": {"weight": 1.0, "scale": 1 / 26, "path": "/models/PickScore_v1", "device": "cuda:1"}}``), a
:class:`rewards.Reward`, or a scoring function ``fn(images, prompts) -> Tensor[B]`` (``fn(images, prompts,
metadata)`` to receive per-prompt metadata)."""


def build_reward(reward: RewardLike, device: torch.device | str | None = None, **options: Any) -> rewards.Reward:
    """A :class:`rewards.Reward` from anything in :data:`RewardLike` (a ``Reward`` is returned as is).

    A mapping becomes a :class:`rewards.WeightedSum`, even with one entry, so that a single reward's ``scale`` and
    ``shift`` apply and its raw score is still reported as a part. ``device`` is the default of every reward whose
    term names none. Names of installed packages' entry points (diffalign's own ``"shapes"``) resolve through the
    ``rewards`` registry without this module importing them.

    Raises:
        rewards.RewardSpecError: a malformed term (a ``ValueError`` naming its key, e.g. ``pickscore.scale``).
        rewards.UnknownRewardError, TypeError, ImportError: as :func:`rewards.load`.
    """
    return rewards.load(dict(reward) if isinstance(reward, Mapping) else reward, device=device, **options)


def score_with_parts(
    reward: rewards.Reward,
    images: Tensor,
    prompts: list[str],
    metadata: Sequence[Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """``{"reward": total [B], <part>: [B], ...}`` without gradients, float32 on the CPU.

    The parts are :meth:`rewards.Reward.score_parts`'s, less the one that is the total itself (a plain reward
    reports itself): a weighted sum's terms (raw, before weight, scale and shift), a verifier's ``"strict"`` flag,
    nothing more for a plain reward. A part that happens to be named ``"reward"`` is listed as ``"reward_part"``, so
    the total is never overwritten.

    Args:
        reward: the reward.
        images: ``[B, 3, H, W]`` float in [0, 1].
        prompts: ``B`` prompts.
        metadata: ``B`` dicts aligned with the images (a JSONL prompt record's fields), passed only to a reward
            that takes metadata (``reward.takes_metadata``; for a sum, to its parts that do); ``None`` = none.
        batch_size: score at most this many images per reward call, concatenating the scores (a reward model's
            memory bound); ``None`` = all in one call.
    """
    if batch_size is not None and len(prompts) > batch_size:
        chunks = [
            score_with_parts(
                reward,
                images[i : i + batch_size],
                prompts[i : i + batch_size],
                None if metadata is None else metadata[i : i + batch_size],
            )
            for i in range(0, len(prompts), batch_size)
        ]
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
    with torch.no_grad():
        total, parts = reward.score_parts(images, prompts, **rewards.metadata_kwargs(reward, metadata))
    scores = {"reward": total}
    for name, value in parts.items():
        if value is not total:
            scores["reward_part" if name == "reward" else name] = value
    return {name: value.detach().float().cpu() for name, value in scores.items()}
