"""Differentiable torch versions of the scorers' image preprocessing (docs/rewards.md#preprocessing).

The reference scorers preprocess PIL images (uint8, no gradient). These functions apply the same geometry and
normalisation to float tensors ``[B, 3, H, W]`` in [0, 1] so that gradients reach the pixels:

- ``clip_preprocess``: shortest edge -> ``size`` (bicubic, antialiased) then a centre crop, as the HF
  ``CLIPImageProcessor`` (PickScore, CLIP score, aesthetic) and torchvision ``Resize + CenterCrop`` (ImageReward) do;
  the two differ only in how an odd crop margin is split, which ``crop_rounding`` selects.
- ``hps_preprocess``: longest edge -> ``size`` then zero padding to a centred square, as HPSv2's ``ResizeMaxSize``.

Bicubic resampling uses ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, whose kernel is PIL's
(a = -0.5 with support scaled on downsampling). On smooth images it matches PIL's uint8 resize to about one grey level
(the uint8 rounding); on noise it differs more because PIL clips the bicubic overshoot to [0, 255]. Like every
reference, nothing is clamped after the resize.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


# OpenAI CLIP normalisation, shared by PickScore, HPSv2, ImageReward, the aesthetic predictor and CLIP score.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: Tensor, height: int, width: int) -> Tensor:
    """Bicubic, antialiased resize of ``[B, C, H, W]`` floats to ``[B, C, height, width]`` (no clamping)."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` when the shortest edge goes to ``size``; the long edge is truncated, not rounded.

    Both ``transformers``' ``get_resize_output_image_size`` and torchvision's ``Resize(int)`` use
    ``int(size * long / short)``.
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop(images: Tensor, size: int, rounding: Literal["floor", "round"] = "floor") -> Tensor:
    """Centre crop ``[B, C, H, W]`` to ``[B, C, size, size]`` (both edges must be >= ``size``).

    Args:
        images: the batch to crop.
        size: the square output edge.
        rounding: how an odd margin is split. ``"floor"`` puts the extra pixel at the bottom/right, as
            ``transformers.image_transforms.center_crop`` (``(H - size) // 2``); ``"round"`` follows torchvision's
            ``CenterCrop`` (``int(round((H - size) / 2))``, Python's round-half-to-even).
    """
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {height}x{width} to {size}x{size}")
    if rounding == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def normalize(images: Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Tensor:
    """Per-channel ``(x - mean) / std`` of ``[B, 3, H, W]``."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(
    images: Tensor,
    size: int = 224,
    crop_rounding: Literal["floor", "round"] = "floor",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Shortest edge -> ``size`` (bicubic), centre crop, CLIP mean/std (docs/rewards.md#preprocessing).

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        size: resize and crop edge (224 for every supported CLIP).
        crop_rounding: ``"floor"`` for HF processors, ``"round"`` for torchvision pipelines (see :func:`center_crop`).
        dtype: the model's dtype; the math runs in float32 and only the result is cast.

    Returns:
        Pixel values ``[B, 3, size, size]``.
    """
    x = images.float()
    x = resize(x, *shortest_edge_size(x.shape[-2], x.shape[-1], size))
    x = normalize(center_crop(x, size, crop_rounding))
    return x.to(dtype or torch.float32)


def hps_preprocess(images: Tensor, size: int = 224, dtype: torch.dtype | None = None) -> Tensor:
    """Longest edge -> ``size`` (bicubic), zero padding to a centred square, CLIP mean/std.

    See docs/rewards.md#preprocessing.

    HPSv2's ``ResizeMaxSize`` computes the new edges as ``round(edge * size / longest)`` and pads left/top with
    ``pad // 2`` and right/bottom with the rest, before ``Normalize``, so the padding is black, not mean-grey. The
    reference skips resize and padding when the longest edge already equals ``size``; padding here still squares a
    non-square image, which the model needs anyway.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        size: output edge (224).
        dtype: the model's dtype; the math runs in float32 and only the result is cast.

    Returns:
        Pixel values ``[B, 3, size, size]``.
    """
    x = images.float()
    height, width = x.shape[-2:]
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    x = resize(x, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return normalize(x).to(dtype or torch.float32)
