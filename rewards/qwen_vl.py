"""Qwen2-VL / Qwen2.5-VL inputs built from image tensors, differentiably (docs/rewards.md#hpsv3).

The Qwen-VL vision tower takes an image as a sequence of flattened patches: the image is resized so that both
edges are multiples of ``patch_size * merge_size`` (28) and its area lies in ``[min_pixels, max_pixels]``
(``smart_resize``), normalised with the OpenAI CLIP mean/std, repeated ``temporal_patch_size`` (2) times along time
(a still image is a two-frame clip), and cut into ``3 * 2 * 14 * 14 = 1176``-value patches ordered by 2x2 merge
window, so that the merger can fuse four neighbouring patches into one language-model token. ``image_grid_thw``
holds ``(1, H / 14, W / 14)`` per image, and the prompt holds ``H * W / 28**2`` ``<|image_pad|>`` tokens per image.

:func:`qwen_pixel_values` does all of this on a float tensor ``[B, 3, H, W]`` in [0, 1] so that gradients reach the
pixels; it produces exactly what ``transformers``' ``Qwen2VLImageProcessor`` produces (same patch order, checked in
tests/rewards/test_hpsv3.py) except for the resize kernel (torch's antialiased bicubic vs PIL's bicubic, about one
grey level apart on smooth images, see rewards/preprocess.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize


IMAGE_TOKEN = "<|image_pad|>"
MAX_ASPECT_RATIO = 200  # qwen_vl_utils and transformers both refuse more elongated images

Resample = Literal["bicubic", "bilinear"]


@dataclass(frozen=True)
class QwenVisionSpec:
    """How a Qwen-VL model wants its images: patch geometry, pixel bounds and normalisation.

    Attributes:
        patch_size: edge of a vision patch (14).
        merge_size: patches merged per edge into one language token (2).
        temporal_patch_size: frames per patch (2; a still image is repeated).
        min_pixels: smallest image area after resizing.
        max_pixels: largest image area after resizing.
        mean: per-channel normalisation mean (OpenAI CLIP).
        std: per-channel normalisation std (OpenAI CLIP).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @property
    def factor(self) -> int:
        """Both resized edges are multiples of this (28)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_image_processor(
        cls, image_processor: Any, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> QwenVisionSpec:
        """Read the settings of a ``Qwen2VLImageProcessor``; ``min_pixels``/``max_pixels`` override its bounds.

        transformers 5 stores the bounds as ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``,
        older versions as ``min_pixels``/``max_pixels`` attributes; both are read.
        """
        size = getattr(image_processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda key, default=None: getattr(size, key, default)
        low = min_pixels or get("shortest_edge") or getattr(image_processor, "min_pixels", None) or cls.min_pixels
        high = max_pixels or get("longest_edge") or getattr(image_processor, "max_pixels", None) or cls.max_pixels
        return cls(
            patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size),
            temporal_patch_size=int(image_processor.temporal_patch_size),
            min_pixels=int(low),
            max_pixels=int(high),
            mean=tuple(float(v) for v in image_processor.image_mean),
            std=tuple(float(v) for v in image_processor.image_std),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The ``(height, width)`` a Qwen-VL model sees: edges multiples of ``factor``, area within the bounds.

    The rule of ``qwen_vl_utils.smart_resize`` (also ``hpsv3/dataset/utils.py`` in the ``hpsv3`` wheel): round each
    edge to the nearest multiple of ``factor`` (at least ``factor``); if the area is then above ``max_pixels``
    (below ``min_pixels``), scale both edges by one factor keeping the aspect ratio and floor (ceil) them to
    multiples of ``factor``. With ``min_pixels == max_pixels`` (HPSv3: 256 * 28 * 28) every image gets about that
    area: a square gives 448 x 448.

    Raises:
        ValueError: an aspect ratio above 200, which both references refuse.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"Qwen-VL images need an aspect ratio below {MAX_ASPECT_RATIO}, got {height}x{width}; crop the images."
        )
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = math.floor(height / beta / factor) * factor
        new_w = math.floor(width / beta / factor) * factor
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def resize_images(images: Tensor, height: int, width: int, resample: Resample = "bicubic") -> Tensor:
    """Resize ``[B, C, H, W]`` to ``[B, C, height, width]``; a no-op when the size already matches.

    ``"bicubic"`` is antialiased (PIL's kernel, as the processors and ``qwen_vl_utils`` resize PIL images);
    ``"bilinear"`` is plain ``F.interpolate(mode="bilinear", align_corners=False)`` without antialiasing, as the
    ``hpsv3`` wheel's differentiable image processor does.
    """
    if images.shape[-2:] == (height, width):
        return images
    if resample == "bicubic":
        return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    if resample == "bilinear":
        return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    raise ValueError(f"unknown resample {resample!r}; use 'bicubic' or 'bilinear'")


def patchify(pixels: Tensor, spec: QwenVisionSpec) -> Tensor:
    """Cut normalised ``[B, C, H, W]`` into Qwen-VL patch rows ``[B * H/p * W/p, C * T * p * p]``.

    Rows run over 2x2 merge windows (window row, window column, then the four patches inside), each row holding
    ``(channel, time, patch row, patch column)``; the two time steps are the same frame. This is the order of
    ``Qwen2VLImageProcessor.patchify`` in transformers 5 (and of the numpy code of earlier versions), so the rows of
    image ``b`` are the ``b``-th block of ``H/p * W/p`` rows, as when images are processed one by one and concatenated.
    """
    batch, channels, height, width = pixels.shape
    p, m = spec.patch_size, spec.merge_size
    grid_h, grid_w = height // p, width // p
    patches = pixels.reshape(batch, channels, grid_h // m, m, p, grid_w // m, m, p)
    # -> [B, window row, window col, row in window, col in window, C, patch row, patch col]
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, spec.temporal_patch_size, -1, -1)
    return patches.reshape(batch * grid_h * grid_w, channels * spec.temporal_patch_size * p * p)


def qwen_pixel_values(
    images: Tensor, spec: QwenVisionSpec, resample: Resample = "bicubic", dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Differentiable Qwen-VL vision inputs of a batch of images.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        spec: the model's patch geometry, pixel bounds and normalisation.
        resample: the resize kernel (see :func:`resize_images`).
        dtype: the model's dtype; resize and normalisation run in float32 and only the result is cast.

    Returns:
        ``(pixel_values [B * h * w, 3 * T * p * p], image_grid_thw [B, 3] long)`` with ``h, w`` the patch grid of the
        resized size, on the images' device. Every image of the batch has the same grid.
    """
    x = images.float()
    height, width = smart_resize(x.shape[-2], x.shape[-1], spec.factor, spec.min_pixels, spec.max_pixels)
    x = normalize(resize_images(x, height, width, resample), spec.mean, spec.std)
    pixel_values = patchify(x, spec).to(dtype or torch.float32)
    grid = torch.tensor([1, height // spec.patch_size, width // spec.patch_size], device=images.device)
    return pixel_values, grid.expand(images.shape[0], 3).clone()


def image_token_count(grid_thw: Tensor, spec: QwenVisionSpec) -> int:
    """Number of ``<|image_pad|>`` tokens of one image: its patches divided by ``merge_size**2``."""
    return int(grid_thw.prod().item()) // spec.merge_size**2


def image_text_messages(text: str) -> list[dict[str, Any]]:
    """One user turn holding an image followed by ``text``, in the chat-template message format."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def chat_texts(processor: Any, texts: Sequence[str]) -> list[str]:
    """Render each text as a user turn (image first) plus the assistant header, through the chat template.

    The processor's template is used when it has one (Qwen-VL repositories ship it as ``chat_template.json``),
    otherwise the tokenizer's.
    """
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    if not getattr(owner, "chat_template", None):
        raise ValueError(
            "the Qwen-VL processor has no chat template; load the processor of an -Instruct model "
            "(e.g. Qwen/Qwen2-VL-7B-Instruct), which ships chat_template.json."
        )
    return [
        owner.apply_chat_template(image_text_messages(text), tokenize=False, add_generation_prompt=True)
        for text in texts
    ]


def expand_image_tokens(text: str, count: int, image_token: str = IMAGE_TOKEN) -> str:
    """Replace the single ``image_token`` of a rendered prompt by ``count`` of them, as the Qwen-VL processor does.

    Raises:
        ValueError: the prompt does not hold exactly one image token (a template without the image item).
    """
    found = text.count(image_token)
    if found != 1:
        raise ValueError(
            f"the rendered prompt must hold exactly one {image_token} (the image), found {found}; check the chat "
            "template and that the prompt text itself does not contain it."
        )
    return text.replace(image_token, image_token * count)


def tokenize_prompts(
    tokenizer: Any, texts: Sequence[str], padding_side: Literal["left", "right"], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Tokenise rendered prompts, padded on ``padding_side``: ``(input_ids [B, L], attention_mask [B, L])``."""
    batch = tokenizer(list(texts), padding=True, padding_side=padding_side, return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def single_token_id(tokenizer: Any, text: str, what: str) -> int:
    """The id of ``text`` when the tokenizer encodes it as exactly one token.

    Raises:
        ValueError: ``text`` is several tokens (or none), naming them.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"{what} {text!r} must be a single token of the tokenizer, but it encodes to {len(ids)} tokens {pieces}; "
            "pick a string the tokenizer has as one token (for Qwen: 'Yes', 'yes', 'No', 'no')."
        )
    return ids[0]
