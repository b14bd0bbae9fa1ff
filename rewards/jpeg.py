"""JPEG (in)compressibility, DDPO's task rewards (docs/rewards.md#jpeg-compressibility).

``jpeg_incompressibility``: the size in kB (1 kB = 1000 bytes) of the image saved as JPEG with quality 95 after
the reference conversion ``(x * 255).round().clamp(0, 255)`` to uint8; ``jpeg_compressibility`` is its negative.
Not differentiable (the encoder is not a torch op). flow_grpo's ``-kB / 500`` scaling is a weight choice: use
``WeightedSum({"jpeg_compressibility": 1 / 500})``.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from rewards.base import Reward
from rewards.registry import register


JPEG_QUALITY = 95


def jpeg_sizes_kb(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """JPEG file sizes in kB of ``[B, 3, H, W]`` images in [0, 1]; returns float32 ``[B]`` on the CPU."""
    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu()  # NCHW -> NHWC, the layout PIL reads
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image.numpy()).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """JPEG size in kB (larger = more detail/noise); not differentiable, prompt-agnostic.

    Args:
        device, dtype: accepted for the factory protocol and unused (the encoder runs on the CPU).
        quality: JPEG quality (95 as in DDPO).
    """

    name = "jpeg_incompressibility"
    differentiable = False
    needs_prompts = False
    sign = 1.0

    def __init__(self, device: object = None, dtype: object = None, quality: int = JPEG_QUALITY) -> None:
        self.quality = int(quality)

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self.sign * jpeg_sizes_kb(images, self.quality)


@register("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    """Negative JPEG size in kB (larger = more compressible); not differentiable, prompt-agnostic."""

    name = "jpeg_compressibility"
    sign = -1.0
