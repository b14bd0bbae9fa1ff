"""Evaluation grids: images in rows and columns, each cell captioned (e.g. with its reward scores)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from diffalign.eval.search import NoiseSearch, search_initial_noise


def to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` float in ``[0, 1]`` -> an RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def image_grid(
    images: Tensor,
    num_columns: int,
    captions: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell_size: int = 128,
    caption_height: int = 14,
    label_width: int = 0,
) -> Image.Image:
    """Lay out ``N`` images row-major in a grid with ``num_columns`` columns.

    Args:
        images: ``[N, 3, H, W]`` float in ``[0, 1]``.
        num_columns: cells per row; ``N`` must be a multiple of it.
        captions: one line under each cell (e.g. ``"shapes 0.83"``), or ``None``.
        row_labels: text left of each row (e.g. the prompt), or ``None``.
        column_labels: text above each column (e.g. ``"base s0"``), or ``None``.
        cell_size: each image is resized (nearest) to this side.
        caption_height: pixels reserved under each cell for its caption.
        label_width: pixels reserved left of each row (default: 0, or 240 with row labels).

    Returns:
        The grid, ``(label_width + cols * cell_size) x (header + rows * (cell_size + caption_height))`` pixels.
    """
    count = images.shape[0]
    if count == 0 or count % num_columns:
        raise ValueError(f"{count} images do not fill rows of {num_columns}")
    rows = count // num_columns
    label_width = label_width or (240 if row_labels else 0)
    header = caption_height if column_labels else 0
    cap = caption_height if captions else 0
    width = label_width + num_columns * cell_size
    height = header + rows * (cell_size + cap)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for index in range(count):
        row, col = divmod(index, num_columns)
        x, y = label_width + col * cell_size, header + row * (cell_size + cap)
        grid.paste(to_pil(images[index]).resize((cell_size, cell_size), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + cell_size + 1), captions[index], fill="black", font=font)
    for row, label in enumerate(row_labels or []):
        draw.text(
            (2, header + row * (cell_size + cap) + cell_size // 2 - 6),
            _fit(label, label_width),
            fill="black",
            font=font,
        )
    for col, label in enumerate(column_labels or []):
        draw.text((label_width + col * cell_size + 2, 1), label, fill="black", font=font)
    return grid


def _fit(text: str, width: int) -> str:
    limit = max(width // 6, 4)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tile_images(images: Tensor, num_columns: int) -> Image.Image:
    """Tile ``[N, 3, H, W]`` images row-major at their own resolution, no captions: ``(cols * W) x (rows * H)``."""
    count, _, height, width = images.shape
    if count == 0 or count % num_columns:
        raise ValueError(f"{count} images do not fill rows of {num_columns}")
    grid = Image.new("RGB", (num_columns * width, count // num_columns * height), "white")
    for index in range(count):
        row, col = divmod(index, num_columns)
        grid.paste(to_pil(images[index]), (col * width, row * height))
    return grid


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation grids: prompts x (models x seeds), scored
# ---------------------------------------------------------------------------------------------------------------------

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def ode_images(
    adapter: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float,
    batch_size: int | None = None,
    negative_prompt: str | None = None,
    sources: Tensor | None = None,
) -> Tensor:
    """Deterministic (ODE) samples of every prompt at every seed: ``[P * S, 3, H, W]``, prompt-major; an editing
    model edits ``sources[p]`` (``[P, 3, H, W]``) for prompt ``p`` (docs/architecture.md#editing).

    The image of ``(prompt, seed)`` depends on nothing else: the same pair gives the same image in any grid.
    """
    from diffalign.samplers.plan import ode_plan
    from diffalign.samplers.rollout import prompt_conditioning, rollout

    conditioning = None
    if sources is not None:
        text = prompt_conditioning(adapter, list(prompts), guidance_scale, negative_prompt)
        conditioning = adapter.with_source_images(text, sources, batch_size=batch_size)
    trajectory = rollout(
        adapter,
        list(prompts),
        ode_plan(num_steps),
        conditioning=conditioning,
        num_images_per_prompt=len(seeds),
        guidance_scale=guidance_scale,
        seeds=[int(seed) for _ in prompts for seed in seeds],
        chunk_size=batch_size,
        negative_prompt=negative_prompt,
    )
    return trajectory.images


def resolve_lora(path: str | os.PathLike) -> Path:
    """A LoRA folder: ``path`` itself, or its ``lora/`` subfolder (a run folder or a ``checkpoint-<step>``)."""
    path = Path(path)
    for folder in (path, path / "lora"):
        if (folder / LORA_WEIGHTS_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"no LoRA at {path}: expected {LORA_WEIGHTS_FILE} there or in {path / 'lora'} "
        "(a run folder, a checkpoint folder or a saved LoRA)"
    )


def lora_label(path: str | os.PathLike) -> str:
    """Column label of a LoRA: its folder name, or the parent's for ``.../lora`` (``checkpoint-200``)."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "lora" else path.name


@contextlib.contextmanager
def _weights(adapter: Any, lora: Path | None, alignment_scale: float | None = None) -> Iterator[None]:
    """The base model (LoRA disabled) when ``lora`` is None, else that LoRA loaded as the active adapter, mixed
    with the base model by ``alignment_scale`` (RL guidance, :attr:`DiffusionAdapter.alignment_scale`) if given."""
    if lora is None:
        with adapter.lora_disabled():
            yield
        return
    try:
        adapter.load_lora(lora)
    except (ValueError, KeyError, RuntimeError) as err:  # peft/diffusers: no matching keys, wrong shapes
        message = f"cannot load the LoRA {lora} into this {adapter.family} model ({err}); was it trained on it?"
        raise ValueError(message) from err
    previous, adapter.alignment_scale = adapter.alignment_scale, alignment_scale
    try:
        yield
    finally:
        adapter.alignment_scale = previous


@dataclass
class EvalGrid:
    """What :func:`make_eval_grid` returns.

    Attributes:
        image: the grid.
        records: one per cell, row-major: ``{"prompt", "column", "seed", "scores": {name: value}}``.
        columns: the model labels (``"base"``, then one per LoRA), each spanning ``len(seeds)`` grid columns.
        settings: how the images were made (steps, guidance, seeds, rewards), stored in the JSON.
    """

    image: Image.Image
    records: list[dict[str, Any]]
    columns: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, json_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
        """Write the PNG to ``path`` and the records to ``json_path`` (default: ``path`` with ``.json``)."""
        path = Path(path)
        json_path = Path(json_path) if json_path is not None else path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path)
        payload = {"settings": self.settings, "columns": self.columns, "records": self.records}
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        return path, json_path


def _unique_labels(models: list[tuple[str, Path | None, float | None]]) -> list[tuple[str, Path | None, float | None]]:
    """Number repeated labels (two runs' ``checkpoint-500``): ``checkpoint-500``, ``checkpoint-500 (2)``."""
    seen: dict[str, int] = {}
    unique = []
    for label, lora, scale in models:
        seen[label] = seen.get(label, 0) + 1
        unique.append((label if seen[label] == 1 else f"{label} ({seen[label]})", lora, scale))
    return unique


def caption_height(num_lines: int) -> int:
    """Pixels under each cell for ``num_lines`` caption lines (14 for none or one)."""
    return max(14, 12 * num_lines + 2)


def make_eval_grid(
    adapter: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    loras: Sequence[str | os.PathLike] = (),
    rewards: Mapping[str, Any] | None = None,
    include_base: bool = True,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    cell_size: int = 128,
    batch_size: int | None = None,
    alignment_scales: Sequence[float] | None = None,
    search: NoiseSearch | None = None,
    sources: Tensor | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> EvalGrid:
    """Sample prompts x (models x seeds) with the ODE and lay them out, each cell captioned with its rewards.

    Rows are prompts; columns are the base model (LoRA disabled) and each LoRA, each at every seed, labelled
    ``"<model> s<seed>"``. The layout is :func:`image_grid`'s with row labels (240 px), column labels and
    :func:`caption_height` (``len(scores)`` lines) under every cell; the image is
    ``(240 + M * S * cell_size) x (caption_height + P * (cell_size + caption_height))`` pixels.

    Args:
        adapter: the model; its LoRA (if any) is disabled for the base column, and each LoRA in ``loras`` is
            loaded in turn (the adapter keeps the last one).
        prompts: the rows.
        seeds: the seeds of every model column.
        loras: LoRA folders (or run / checkpoint folders holding ``lora/``).
        rewards: ``{label: reward}``; the cells are captioned ``label value`` (see
            :func:`diffalign.eval.score.reward_scores`).
        include_base: add the base model's columns.
        num_steps, guidance_scale: the ODE sampler's settings.
        cell_size: side of each cell in pixels (images are resized, nearest).
        batch_size: images per denoiser batch (default: all of a model's images at once).
        alignment_scales: RL guidance: each LoRA is sampled at each of these scales ``w`` (one column group per
            LoRA and scale, labelled ``"<lora> w=<w>"``; docs/methods/sampling-alignment.md); ``None``: plain LoRA.
        search: choose every cell's starting noise by a reward (best-of-N or the zero-order search,
            :func:`~diffalign.eval.search.search_initial_noise`); its reward is ``rewards[search.reward]`` (default:
            the first), and each cell's record lists every candidate's reward under ``"candidates"``.
        sources: an editing model's source images, ``[P, 3, H, W]`` in ``[0, 1]``, one per prompt: every column
            edits its row's source, which the grid shows first in the row ("source | before | after").
        metadata: one dict per prompt for the rewards that take metadata (an edit reward reads its source's path).
    """
    from diffalign.eval.score import reward_scores

    scales: list[float | None] = list(alignment_scales) if alignment_scales else [None]
    models = [("base", None, None)] if include_base else []
    for path in loras:
        label, folder = lora_label(path), resolve_lora(path)
        models += [(label if w is None else f"{label} w={w:g}", folder, w) for w in scales]
    models = _unique_labels(models)
    if not models:
        raise ValueError("nothing to compare: give at least one LoRA, or keep the base model")
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or not seeds:
        raise ValueError("an evaluation grid needs at least one prompt and one seed")
    if sources is not None and search is not None:
        raise ValueError("the noise search samples from text only: leave it out when the grid edits source images")
    if sources is not None and len(sources) != len(prompts):
        raise ValueError(f"{len(sources)} source images for {len(prompts)} prompts")
    search_label = _search_label(search, rewards or {}) if search is not None else None
    sampling = {"num_steps": num_steps, "guidance_scale": guidance_scale, "batch_size": batch_size}
    cell_metadata = [dict(metadata[p]) for p in range(len(prompts)) for _ in seeds] if metadata else None
    per_model, scores, candidates = [], [], []
    for _, lora, scale in models:
        with _weights(adapter, lora, scale):
            if search is None:
                images, found = ode_images(adapter, prompts, seeds, **sampling, sources=sources), None
            else:
                result = search_initial_noise(adapter, prompts, seeds, rewards[search_label], search, **sampling)
                images, found = result.images, result.candidates
        per_model.append(images)
        candidates.append(found)
        cell_prompts = [p for p in prompts for _ in seeds]
        scores.append(reward_scores(rewards or {}, images, cell_prompts, cell_metadata))

    num_lines = len(scores[0])
    cells, records, captions = [], [], []
    for p, prompt in enumerate(prompts):
        if sources is not None:
            cells.append(sources[p])
            captions.append("\n" * (num_lines - 1))
        for m, (label, _, _) in enumerate(models):
            for s, seed in enumerate(seeds):
                index = p * len(seeds) + s
                cell_scores = {name: float(values[index]) for name, values in scores[m].items()}
                cells.append(per_model[m][index])
                record = {"prompt": prompt, "column": label, "seed": seed, "scores": cell_scores}
                if candidates[m] is not None:
                    record["candidates"] = candidates[m][index]
                records.append(record)
                captions.append("\n".join(f"{name} {value:.3f}" for name, value in cell_scores.items()))
    columns = [f"{label} s{seed}" for label, _, _ in models for seed in seeds]
    columns = ["source", *columns] if sources is not None else columns
    image = image_grid(
        torch.stack([cell.cpu() for cell in cells]),
        len(columns),
        captions=captions if num_lines else None,
        row_labels=prompts,
        column_labels=columns,
        cell_size=cell_size,
        caption_height=caption_height(num_lines),
    )
    settings = {"num_steps": num_steps, "guidance_scale": guidance_scale, "seeds": seeds, "rewards": list(scores[0])}
    if sources is not None and metadata:
        settings["sources"] = [m.get("image") for m in metadata]
    if alignment_scales:
        settings["alignment_scales"] = [float(w) for w in alignment_scales]
    if search is not None:
        settings["search"] = {**dataclasses.asdict(search), "reward": search_label}
    return EvalGrid(image, records, [label for label, _, _ in models], settings)


def _search_label(search: NoiseSearch, rewards: Mapping[str, Any]) -> str:
    """The label of the reward a noise search maximises: ``search.reward``, or the first of ``rewards``."""
    if not rewards:
        raise ValueError("a noise search (best-of-N) needs a reward to choose by: give one (--reward)")
    label = search.reward or next(iter(rewards))
    if label not in rewards:
        raise ValueError(f"the search reward {label!r} is not one of the grid's rewards: {', '.join(rewards)}")
    return label
