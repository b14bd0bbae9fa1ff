"""The shapes world's rewards, registered with the ``rewards`` registry through the ``rewards`` entry-point group
of diffalign's package metadata (``pyproject.toml``), so that ``rewards.load(name)`` and every config with
``reward: <name>`` find them without the runtime importing the shapes world:

- ``"shapes"``: the programmatic verifier (not differentiable); its ``score_parts`` adds the strict all-correct
  flag (``"strict"``);
- ``"shapes_clip"``: the CLIP score of the shipped shapes CLIP (``assets/clip``), differentiable, for reward
  backprop (``rewards.load("clip_score", path=CLIP_DIR)`` under a name a config can hold).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

import rewards
from diffalign.shapes.verifier import ShapesVerifier


CLIP_DIR = Path(__file__).resolve().parent / "assets" / "clip"
"""The shipped shapes CLIP (a ``transformers.CLIPModel`` folder with its tokenizer)."""


class ShapesReward(rewards.Reward):
    """The shapes verifier behind the ``rewards`` protocol (input checks, ``[B]`` float32 scores in [0, 1]).

    ``evaluate(images, prompts) -> (scores, strict)`` also gives the all-correct flag (strict accuracy), which
    :meth:`score_parts` reports as ``"strict"``.
    """

    name = "shapes"
    differentiable = False
    needs_prompts = True

    def __init__(self, device=None, dtype=None, **options: float) -> None:
        self.verifier = ShapesVerifier(device=device, dtype=dtype, **options)

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self.verifier.score(images, prompts)

    def evaluate(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(scores [B], strict [B] bool)`` of images against their prompts."""
        return self.verifier.evaluate(images, list(prompts))

    def score_parts(self, images: Tensor, prompts: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(scores [B], {"shapes": scores, "strict": [B] float 0/1})``, with the protocol's checks on both."""
        rewards.base.check_images(images, self.name)
        prompt_list = rewards.base.check_prompts(prompts, images.shape[0], self.name)
        scores, strict = self.evaluate(images, prompt_list)
        scores = rewards.base.check_scores(scores, images.shape[0], self.name, device=images.device)
        return scores, {self.name: scores, "strict": strict.float()}


def shapes_clip(
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    path: str | os.PathLike = CLIP_DIR,
    scale: float = 100.0,
    clamp: bool = False,
) -> rewards.Reward:
    """The ``"shapes_clip"`` reward: ``scale * cos(text, image)`` of the shipped shapes CLIP, differentiable.

    Args:
        device: where the CLIP runs (``None``: the device of the first batch).
        dtype: the CLIP's dtype; scores are float32.
        path: the CLIP folder (default: the shipped one).
        scale: the weight of the cosine (100, as ``clip_score``).
        clamp: clamp each score at 0.
    """
    from rewards.clip_score import CLIPScore

    reward = CLIPScore(device=device, dtype=dtype, path=path, scale=scale, clamp=clamp)
    reward.name = "shapes_clip"
    return reward
