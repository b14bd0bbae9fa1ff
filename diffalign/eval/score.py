"""Score images with rewards: a folder (or a list) of PNG/JPEG files, one prompt per image or one for all.

``diffalign score`` is a thin shell over :func:`score_images`::

    report = score_images("samples/", "prompts.txt", build_rewards(["pickscore", "aesthetic"]))
    print(report.table())

A file that cannot be decoded (truncated, not an image) is skipped and counted, never fatal: the report lists it.
Images of different sizes are fine; each batch holds images of one size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffalign.data.prompts import PromptRecord, load_prompt_records
from diffalign.rewarding import build_reward, score_with_parts


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File types :func:`list_images` picks up in a folder."""


# ---------------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------------


def reward_label(spec: str) -> str:
    """A short display name for a reward spec: ``pickscore``, the callable of ``module:fn`` / ``file.py:fn``, or a
    ``remote:URL`` spec whole (its last colon is the port's)."""
    if spec.startswith("remote:"):
        return spec
    return spec.rsplit(":", 1)[-1] if ":" in spec else spec


def build_rewards(specs: Sequence[str], device: torch.device | str | None = None) -> dict[str, Any]:
    """``{label: reward}`` for reward specs (names, ``module:fn`` or ``file.py:fn``); labels must be distinct."""
    built: dict[str, Any] = {}
    for spec in specs:
        label = reward_label(spec)
        if label in built:
            raise ValueError(f"two rewards are both called {label!r}; give each reward once")
        built[label] = build_reward(spec, device=device)
    return built


def reward_scores(
    rewards: Mapping[str, Any],
    images: Tensor,
    prompts: list[str],
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Tensor]:
    """Scores of ``images`` under every reward: ``{label: [B]}``, plus ``label.part`` for composite rewards
    (a weighted sum's parts) and verifiers (``label.strict``). ``metadata`` (``B`` dicts) reaches the rewards that
    take it."""
    scores: dict[str, Tensor] = {}
    for label, reward in rewards.items():
        parts = score_with_parts(reward, images, prompts, metadata)
        scores[label] = parts.pop("reward")
        scores.update({f"{label}.{name}": values for name, values in parts.items()})
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Images and prompts
# ---------------------------------------------------------------------------------------------------------------------


def list_images(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files: a folder's PNG/JPEG files in sorted name order, and given files in the order given."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no PNG or JPEG images in {source}")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"no such image file or folder: {source}")
    if not files:
        raise FileNotFoundError("no images given")
    return files


def image_prompts(prompts: str | os.PathLike | Sequence[str], count: int) -> list[str]:
    """One prompt per image: a text or JSONL file (one line per image), a list, or a single text used for every
    image.

    A string is read as a file when one exists there; one that looks like a path but names no file is an error
    (see :func:`~diffalign.data.prompts.load_prompts`), never the prompt.
    """
    return [record.prompt for record in image_prompt_records(prompts, count)]


def image_prompt_records(prompts: str | os.PathLike | Sequence[str], count: int) -> list[PromptRecord]:
    """:func:`image_prompts` with each prompt's metadata (a JSONL record's fields; empty otherwise)."""
    found = load_prompt_records(prompts)
    if len(found) == 1:
        return found * count
    if len(found) != count:
        raise ValueError(
            f"{len(found)} prompts for {count} images: give one prompt per image (in sorted file order), "
            "or a single prompt for all"
        )
    return found


def load_image(path: str | os.PathLike) -> Tensor:
    """An image file as ``[3, H, W]`` float32 in ``[0, 1]`` (RGB)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def _read_all(
    files: list[Path], prompts: list[PromptRecord]
) -> tuple[list[tuple[Path, PromptRecord, Tensor]], list[str]]:
    loaded, skipped = [], []
    for path, prompt in zip(files, prompts):
        try:
            loaded.append((path, prompt, load_image(path)))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            logger.warning("skipping %s: %s", path, err)
            skipped.append(str(path))
    return loaded, skipped


def _batches(loaded: list, batch_size: int) -> list[list]:
    """Consecutive runs of same-size images, at most ``batch_size`` long."""
    batches: list[list] = []
    for item in loaded:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[-1][2].shape == item[2].shape:
            last.append(item)
        else:
            batches.append([item])
    return batches


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreReport:
    """Per-image scores and the files that could not be read.

    Attributes:
        records: ``{"image": path, "prompt": text, "scores": {label: value}}`` in file order.
        skipped: paths of files that could not be decoded.
    """

    records: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.records[0]["scores"]) if self.records else []

    def means(self) -> dict[str, float]:
        """The mean of each score over the scored images."""
        return {name: float(np.mean([r["scores"][name] for r in self.records])) for name in self.names}

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "mean": self.means(), "skipped": self.skipped}

    def table(self, prompt_width: int = 40) -> str:
        """An aligned text table: one row per image, a mean row, and the skipped count."""
        header = ["image", "prompt", *self.names]
        rows = [
            [Path(r["image"]).name, _clip(r["prompt"], prompt_width), *(f"{v:.4f}" for v in r["scores"].values())]
            for r in self.records
        ]
        rows.append([f"mean ({len(self.records)} images)", "", *(f"{v:.4f}" for v in self.means().values())])
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s): {', '.join(self.skipped)}")
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def score_images(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    prompts: str | os.PathLike | Sequence[str],
    rewards: Mapping[str, Any],
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> ScoreReport:
    """Score image files with every reward.

    Args:
        images: a folder (its PNG/JPEG files in sorted order) or a list of files and folders.
        prompts: a text file with one prompt per image, a JSONL file with one record per image (its fields reach
            rewards that take metadata), a list, or one text for all images (a string that looks like a path but
            names no file is an error, not the text).
        rewards: ``{label: reward}`` (see :func:`build_rewards`).
        batch_size: images per reward call.
        device: where the images go before scoring (default: CPU).

    Raises:
        FileNotFoundError: a missing image, folder or prompt file, or a folder without images.
        ValueError: the prompts do not match the images, or no image could be read.
    """
    files = list_images(images)
    loaded, skipped = _read_all(files, image_prompt_records(prompts, len(files)))
    if not loaded:
        raise ValueError(f"none of the {len(files)} image file(s) could be read (see the warnings above)")
    records = []
    for batch in _batches(loaded, batch_size):
        pixels = torch.stack([item[2] for item in batch]).to(device or "cpu")
        records_of_batch = [item[1] for item in batch]
        scores = reward_scores(
            rewards, pixels, [r.prompt for r in records_of_batch], [r.metadata for r in records_of_batch]
        )
        for i, (path, record, _) in enumerate(batch):
            values = {name: float(v[i]) for name, v in scores.items()}
            records.append({"image": str(path), "prompt": record.prompt, "scores": values})
    return ScoreReport(records, skipped)
