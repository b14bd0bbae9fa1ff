"""Source images of editing prompts: a prompt JSONL whose records also name an ``"image"`` to edit
(docs/architecture.md#editing), e.g. ``{"prompt": "make the circle red", "image": "sources/0001.png"}``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.adapters import Conditioning, DiffusionAdapter
from diffalign.config import ConfigError
from diffalign.data.image_captions import load_real_image
from diffalign.samplers.rollout import prompt_conditioning


__all__ = [
    "SOURCE_KEY",
    "SourceImages",
    "has_source_images",
    "refuse_source_images",
    "resolve_source_images",
    "source_conditioning",
]

SOURCE_KEY = "image"
"""The metadata field of a prompt record that names its source image."""


def resolve_source_images(
    metadata: Sequence[dict[str, Any]], prompt_source: Any, key: str = "sampling.prompts"
) -> list[Path] | None:
    """The source image of every record, or ``None`` when no record names one; relative paths are taken from the
    prompt file's folder, and each record's ``"image"`` is rewritten to its absolute path (rewards read it there).

    Raises:
        ValueError: some records name a source image and others do not (the first without one is named).
        FileNotFoundError: named images that do not exist (listed).
    """
    named = [SOURCE_KEY in record for record in metadata]
    if not any(named):
        return None
    if not all(named):
        index = named.index(False)
        raise ValueError(
            f"{key}: record {index + 1} has no {SOURCE_KEY!r} although others do; an edit run needs a source image "
            "for every prompt"
        )
    base = Path(prompt_source).parent if isinstance(prompt_source, (str, os.PathLike)) else Path.cwd()
    paths = [(base / str(record[SOURCE_KEY])).resolve() for record in metadata]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{key}: {len(missing)} source image(s) missing: {shown}")
    for record, path in zip(metadata, paths):
        record[SOURCE_KEY] = str(path)
    return paths


class SourceImages:
    """The source images of a prompt list, read at the working size on first use and kept (on the CPU).

    Args:
        paths: one file per prompt (:func:`resolve_source_images`).
        height, width: the size the adapter works at.
    """

    def __init__(self, paths: Sequence[Path], height: int, width: int) -> None:
        self.paths = list(paths)
        self.height, self.width = height, width
        self._loaded: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> Tensor:
        """Prompt ``index``'s source image, ``[3, height, width]`` in ``[0, 1]``."""
        if index not in self._loaded:  # kept as 8-bit pixels, a quarter of the float32 image
            image = load_real_image(self.paths[index], self.height, self.width, key="sampling.prompts")
            self._loaded[index] = (image * 255).round().to(torch.uint8)
        return self._loaded[index].float() / 255

    def batch(self, indices: Sequence[int]) -> Tensor:
        """``[len(indices), 3, height, width]``: the source images of these prompts, in order."""
        return torch.stack([self.get(i) for i in indices])


def has_source_images(metadata: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any record names a source image."""
    return any(SOURCE_KEY in record for record in metadata)


def refuse_source_images(metadata: Sequence[Mapping[str, Any]], trainer: str) -> None:
    """For trainers that sample from text only: prompt records with source images are an error, not silently
    sampled as text-to-image.

    Raises:
        ConfigError: a record names a source image (``sampling.prompts``).
    """
    if has_source_images(metadata):
        raise ConfigError(
            f"sampling.prompts name source images ('image'): edits train with the grpo trainer; {trainer} samples "
            "from text only",
            key="sampling.prompts",
        )


def source_conditioning(
    adapter: DiffusionAdapter,
    prompts: Sequence[str],
    sources: SourceImages,
    indices: Sequence[int],
    guidance_scale: float,
    negative_prompt: str | None = None,
    batch_size: int | None = None,
) -> Conditioning:
    """``[len(indices)]`` conditioning of prompt records ``indices`` (into ``prompts`` and ``sources``), each with
    its source image: every distinct record's text and source are encoded once (``batch_size`` images per VAE call)
    and repeated where the record recurs (a group, the seeds of an evaluation)."""
    distinct = list(dict.fromkeys(indices))
    position = {index: row for row, index in enumerate(distinct)}
    text = prompt_conditioning(adapter, [prompts[i] for i in distinct], guidance_scale, negative_prompt)
    edited = adapter.with_source_images(text, sources.batch(distinct), batch_size=batch_size)
    return edited[[position[i] for i in indices]]
