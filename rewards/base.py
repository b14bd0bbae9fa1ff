"""The reward protocol: ``score(images, prompts, metadata=None) -> Tensor[B]`` with input and output checks.

Every reward, built-in or user-written, goes through :meth:`Reward.score`, which checks the inputs (rank, channels,
dtype, value range, prompt count, per-image metadata), runs the subclass's :meth:`Reward._score` and checks its
output (shape ``[B]``, finite), so that a wrong call fails loudly instead of returning a silently wrong score
(docs/rewards.md#the-protocol).

Per-image metadata (the other fields of a JSONL prompt record, as flow_grpo's GenEval prompt files carry) reaches
only rewards that declare ``takes_metadata = True``; every other reward is called exactly as before, so rewards
written without metadata keep working (docs/rewards.md#per-prompt-metadata).

Gradient policy: :meth:`score` never enters ``torch.no_grad`` itself. Callers who want no graph wrap the call in
``torch.no_grad()``/``torch.inference_mode()``; otherwise a differentiable reward keeps the graph back to the images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


logger = logging.getLogger(__name__)

# Images a hair outside [0, 1] (float error after a VAE decode and a clamp in another dtype) are accepted; anything
# further out is a range mistake ([-1, 1] or [0, 255]) and is refused.
RANGE_TOLERANCE = 1e-3


class RewardInputError(ValueError):
    """Images or prompts passed to a reward do not follow the protocol."""


class RewardOutputError(ValueError):
    """A reward returned something other than a finite ``Tensor[B]``."""


class Reward:
    """Base class of every reward: ``score(images, prompts) -> Tensor[B]`` float32.

    Subclasses set ``name``, ``differentiable``, ``needs_prompts`` and ``takes_metadata`` and implement
    :meth:`_score`; they receive checked inputs and their output is checked. Calling the object is the same as
    calling :meth:`score`.

    Attributes:
        name: the registry name (or the spec a custom reward was loaded from); used in error messages and logs.
        differentiable: whether gradients reach the images. Reward backprop trainers require it.
        needs_prompts: whether ``prompts`` must be given (aesthetic and JPEG rewards ignore them).
        takes_metadata: whether :meth:`_score` receives the per-image metadata as a third argument,
            ``_score(images, prompts, metadata)`` with ``metadata`` a list of ``B`` dicts (empty dicts when the
            caller has none). Rewards without it never see metadata.
    """

    name: str = "reward"
    differentiable: bool = False
    needs_prompts: bool = True
    takes_metadata: bool = False

    def score(
        self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        """Score a batch of images against their prompts.

        Args:
            images: float tensor ``[B, 3, H, W]`` with values in [0, 1], on any device.
            prompts: ``B`` strings, one per image; may be ``None`` for rewards with ``needs_prompts = False``.
            metadata: ``B`` dicts, one per image (e.g. the fields of its JSONL prompt record), or ``None``; passed
                on only when ``takes_metadata`` is set, ignored otherwise.

        Returns:
            Tensor ``[B]`` float32 on the images' device, with a graph back to ``images`` when the reward is
            differentiable and grad mode is on.

        Raises:
            RewardInputError: wrong rank, channels, dtype or value range, a prompt count that is not ``B``, or
                metadata that is not ``B`` dicts (for a reward that takes it).
            RewardOutputError: the reward produced a wrong shape or a non-finite value.
        """
        check_images(images, self.name)
        prompt_list = check_prompts(prompts, images.shape[0], self.name, required=self.needs_prompts)
        # Only a reward that declares takes_metadata gets the third argument: older rewards keep their signature.
        extra = (check_metadata(metadata, images.shape[0], self.name),) if self.takes_metadata else ()
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        scores = self._score(images, prompt_list, *extra)
        return check_scores(scores, images.shape[0], self.name, device=images.device)

    __call__ = score

    def score_parts(
        self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The score and the named scores that explain it, for logs and reports.

        A weighted sum reports each of its terms, a verifier may add its strict all-correct flag; a plain reward
        reports itself, ``{self.name: total}``, which is this default. ``metadata`` is as in :meth:`score`.

        Returns:
            ``(total [B], {name: [B]})``, both as :meth:`score` returns them.
        """
        total = self.score(images, prompts, **metadata_kwargs(self, metadata))
        return total, {self.name: total}

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor | Sequence[float]:
        """Compute the scores of checked inputs; ``images`` is ``[B, 3, H, W]`` float in [0, 1], ``B >= 1``.

        A reward with ``takes_metadata`` implements ``_score(images, prompts, metadata)`` instead, ``metadata``
        being ``B`` dicts aligned with the images.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


def check_images(images: Any, name: str) -> None:
    """Refuse anything but a float ``[B, 3, H, W]`` tensor with finite values in [0, 1].

    Args:
        images: the candidate batch.
        name: the reward's name, quoted in the error.

    Raises:
        RewardInputError: with the problem and the usual fix.
    """
    if not isinstance(images, Tensor):
        raise RewardInputError(
            f"reward {name!r}: images must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}; "
            "convert PIL images or arrays with torchvision.transforms.functional.to_tensor and stack them."
        )
    if images.ndim != 4:
        hint = " (a single image needs images[None])" if images.ndim == 3 else ""
        raise RewardInputError(
            f"reward {name!r}: images must have rank 4 [B, 3, H, W], got shape {tuple(images.shape)}{hint}."
        )
    if images.shape[1] != 3:
        hint = " (channels-last? use images.permute(0, 3, 1, 2))" if images.shape[-1] == 3 else ""
        raise RewardInputError(
            f"reward {name!r}: images must have 3 channels in dim 1 [B, 3, H, W], got shape "
            f"{tuple(images.shape)}{hint}."
        )
    if not images.is_floating_point():
        raise RewardInputError(
            f"reward {name!r}: images must be floating point in [0, 1], got dtype {images.dtype}; "
            "for uint8 images use images.float() / 255."
        )
    if images.numel() == 0:
        return
    _check_range(images.detach(), name)


def _check_range(images: Tensor, name: str) -> None:
    lo, hi = (v.item() for v in torch.aminmax(images))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RewardInputError(f"reward {name!r}: images contain NaN or inf values.")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        if hi > 1.5:
            hint = "values look like [0, 255]: divide by 255"
        elif lo < -0.05:
            hint = "values look like [-1, 1]: use (images + 1) / 2, clamped to [0, 1]"
        else:
            hint = "clamp them to [0, 1]"
        raise RewardInputError(
            f"reward {name!r}: images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}."
        )


def check_prompts(prompts: Any, batch_size: int, name: str, required: bool = True) -> list[str] | None:
    """Check that ``prompts`` holds one string per image and return it as a list.

    Args:
        prompts: a sequence of ``batch_size`` strings, or ``None`` when the reward does not need prompts.
        batch_size: ``B``, the number of images.
        name: the reward's name, quoted in the error.
        required: whether ``None`` is refused.

    Returns:
        The prompts as a list, or ``None``.

    Raises:
        RewardInputError: a bare string, a wrong length, a non-string item, or missing prompts.
    """
    if prompts is None:
        if required:
            raise RewardInputError(f"reward {name!r} needs one prompt per image; got prompts=None.")
        return None
    if isinstance(prompts, str):
        raise RewardInputError(
            f"reward {name!r}: prompts must be a list of {batch_size} strings, got a single string; "
            "use [prompt] * len(images) to score every image against it."
        )
    prompt_list = list(prompts)
    if len(prompt_list) != batch_size:
        raise RewardInputError(f"reward {name!r}: got {len(prompt_list)} prompts for {batch_size} images.")
    bad = [i for i, p in enumerate(prompt_list) if not isinstance(p, str)]
    if bad:
        raise RewardInputError(
            f"reward {name!r}: prompts must be strings; item {bad[0]} is {type(prompt_list[bad[0]]).__name__}."
        )
    return prompt_list


def check_metadata(metadata: Any, batch_size: int, name: str) -> list[dict[str, Any]]:
    """Check that ``metadata`` holds one mapping per image and return shallow copies as a list of dicts.

    Args:
        metadata: a sequence of ``batch_size`` mappings, or ``None`` (then every image gets an empty dict, as an
            image from a plain-text prompt file has no metadata).
        batch_size: ``B``, the number of images.
        name: the reward's name, quoted in the error.

    Returns:
        ``B`` dicts (copies: a reward that edits its metadata does not change the caller's).

    Raises:
        RewardInputError: a bare mapping, a wrong length, or an item that is not a mapping.
    """
    if metadata is None:
        return [{} for _ in range(batch_size)]
    if isinstance(metadata, Mapping):
        raise RewardInputError(
            f"reward {name!r}: metadata must be a list of {batch_size} dicts, one per image, got a single mapping; "
            "use [metadata] * len(images) to give every image the same one."
        )
    if isinstance(metadata, (str, bytes)) or not isinstance(metadata, Sequence):
        raise RewardInputError(
            f"reward {name!r}: metadata must be a list of {batch_size} dicts, got {type(metadata).__name__}."
        )
    if len(metadata) != batch_size:
        raise RewardInputError(f"reward {name!r}: got {len(metadata)} metadata dicts for {batch_size} images.")
    bad = [i for i, item in enumerate(metadata) if not isinstance(item, Mapping)]
    if bad:
        raise RewardInputError(
            f"reward {name!r}: metadata must be dicts; item {bad[0]} is {type(metadata[bad[0]]).__name__}."
        )
    return [dict(item) for item in metadata]


def metadata_kwargs(reward: Any, metadata: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """``{"metadata": metadata}`` for a reward that takes metadata, else ``{}``.

    Callers spread it into ``reward.score(images, prompts, **metadata_kwargs(reward, metadata))``, so that rewards
    written before metadata existed, which may override ``score``/``score_parts`` with the two-argument signature,
    are called exactly as before.
    """
    return {"metadata": metadata} if getattr(reward, "takes_metadata", False) else {}


def check_scores(scores: Any, batch_size: int, name: str, device: torch.device | None = None) -> Tensor:
    """Turn a reward's raw output into a checked float32 ``Tensor[B]``.

    Args:
        scores: a tensor or a sequence of numbers, as returned by a reward.
        batch_size: ``B``, the number of images scored.
        name: the reward's name, quoted in the error.
        device: where the result goes (the images' device); ``None`` keeps the tensor's own device.

    Returns:
        Tensor ``[B]`` float32 (the graph, if any, is kept).

    Raises:
        RewardOutputError: not convertible to a tensor, a shape other than ``[B]``, or NaN/inf values.
    """
    if not isinstance(scores, Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RewardOutputError(
                f"reward {name!r} returned {type(scores).__name__}, which is not a Tensor[B] or a list of "
                f"{batch_size} floats ({err})."
            ) from err
    if scores.shape != (batch_size,):
        raise RewardOutputError(
            f"reward {name!r} returned shape {tuple(scores.shape)}; expected [{batch_size}] (one score per image)."
        )
    if scores.is_complex() or scores.dtype == torch.bool:
        raise RewardOutputError(f"reward {name!r} returned dtype {scores.dtype}; expected real numbers.")
    scores = scores.float()
    finite = torch.isfinite(scores.detach())
    if not bool(finite.all()):
        where = (~finite).nonzero().flatten().tolist()
        raise RewardOutputError(f"reward {name!r} returned NaN or inf for images at positions {where}.")
    if device is not None and scores.device != torch.device(device):
        scores = scores.to(device)
    return scores
