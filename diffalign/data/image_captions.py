"""Real image-caption pairs (ImageReFL's real images, SPIN-Diffusion's data): a JSONL of ``{"prompt", "image"}``
records or a folder of images with ``<stem>.txt`` captions, and one image read as a tensor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor


__all__ = ["IMAGE_SUFFIXES", "load_real_image", "load_real_pairs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_real_pairs(source: str | Path, key: str = "sampling.real_images") -> list[tuple[str, Path]]:
    """``(caption, image file)`` pairs from a JSONL of ``{"prompt", "image"}`` records (image paths relative to the
    file) or a folder of images with ``<stem>.txt`` captions; ``key`` names the config key in errors.

    Raises:
        FileNotFoundError: the source, or an image or caption it names, does not exist (all missing files named).
        ValueError: a JSONL line is not such a record, or the source holds no pair.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{key}: {source} does not exist")
    pairs, missing = [], []
    if source.is_dir():
        for image in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                missing.append(str(caption))
                continue
            pairs.append((caption.read_text().strip(), image))
    else:
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and record.get("image")):
                raise ValueError(
                    f'{source}:{number}: expected {{"prompt": "...", "image": "<path>"}}, got {line[:80]}'
                )
            image = (source.parent / record["image"]).resolve()
            if not image.is_file():
                missing.append(str(image))
            pairs.append((record["prompt"], image))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{key} {source}: {len(missing)} missing file(s): {shown}")
    if not pairs:
        raise ValueError(f"{key} {source} holds no image-caption pair")
    return pairs


def load_real_image(path: Path, height: int, width: int, key: str = "sampling.real_images") -> Tensor:
    """A real image as ``[3, height, width]`` float32 in ``[0, 1]``: resized to cover the size, centre-cropped.

    Raises:
        ValueError: the file cannot be read as an image (named).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{key}: cannot read the image {path} ({err}); fix or remove it") from err
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).float() / 255
