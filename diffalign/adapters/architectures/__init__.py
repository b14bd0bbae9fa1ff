"""The architectures of the supported model families as configs, without weights: built on the meta device they give
every component's shapes in seconds, with no download and no memory.

Each architecture is a folder laid out like a diffusers pipeline folder -- ``model_index.json``,
``scheduler/scheduler_config.json`` and a ``config.json`` for every model component (the denoiser, the VAE, each
text encoder; SD1.5 also its safety checker, which ``from_pretrained`` loads) -- holding the values published in
the hub repository named in :data:`ARCHITECTURES`, but no weights and no tokenizers. Uses: the memory planner
(``diffalign plan``, :mod:`diffalign.planning`) and benchmarks that build full-size random-weight models::

    from diffalign.adapters.architectures import architecture_path, build_on_meta

    modules = build_on_meta("flux1_dev")             # {"transformer": ..., "vae": ..., "text_encoder": ...}
    folder = architecture_path("sd35_medium")         # diffusers layout: folder / "transformer" / "config.json"

A local diffusers pipeline folder works the same way (``build_on_meta(folder)``): only its ``model_index.json`` and
component ``config.json`` files are read.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_for_model",
    "architecture_names",
    "architecture_path",
    "build_component",
    "build_on_meta",
    "model_components",
    "read_model_index",
]

FOLDER = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One shipped architecture.

    Attributes:
        name: the folder name (``flux1_dev``).
        title: what it is, for messages.
        hub_ids: hub repositories with this architecture (the first is the one the configs were read from).
        published_parameters: ``{component: parameters}`` as published by the model authors, to check the configs
            against (the meta-device build must give these counts).
    """

    name: str
    title: str
    hub_ids: tuple[str, ...]
    published_parameters: dict[str, float]


_CLIP_L, _CLIP_G, _T5_XXL = 123e6, 695e6, 4.76e9

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            "sd15",
            "Stable Diffusion 1.5",
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
            {"unet": 860e6, "text_encoder": _CLIP_L},
        ),
        Architecture(
            "sdxl",
            "Stable Diffusion XL base 1.0",
            ("stabilityai/stable-diffusion-xl-base-1.0",),
            {"unet": 2.6e9, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G},
        ),
        Architecture(
            "sd35_medium",
            "Stable Diffusion 3.5 Medium",
            ("stabilityai/stable-diffusion-3.5-medium",),
            {"transformer": 2.5e9, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL},
        ),
        Architecture(
            "sd35_large",
            "Stable Diffusion 3.5 Large",
            ("stabilityai/stable-diffusion-3.5-large",),
            {"transformer": 8.1e9, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL},
        ),
        Architecture(
            "flux1_dev",
            "FLUX.1-dev",
            ("black-forest-labs/FLUX.1-dev",),
            {"transformer": 12e9, "text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL},
        ),
    )
}
"""The shipped architectures by folder name."""


def architecture_names() -> tuple[str, ...]:
    """The names of the shipped architectures (``sd15``, ``sdxl``, ...)."""
    return tuple(ARCHITECTURES)


def architecture_path(name: str) -> Path:
    """The folder of the shipped architecture ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return FOLDER / name


def architecture_for_model(model_id: str) -> str | None:
    """The shipped architecture of a hub id (``black-forest-labs/FLUX.1-dev`` -> ``flux1_dev``; case-insensitive)
    or of an architecture name itself; ``None`` for anything else."""
    if model_id in ARCHITECTURES:
        return model_id
    wanted = model_id.strip().lower()
    for arch in ARCHITECTURES.values():
        if wanted in (hub_id.lower() for hub_id in arch.hub_ids):
            return arch.name
    return None


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """A pipeline folder's ``model_index.json``.

    Raises:
        FileNotFoundError: the folder has none (it is not a diffusers pipeline folder).
        ValueError: the file is not valid JSON.
    """
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); its model_index.json and each "
            "component's config.json are all that is read"
        )
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{index} is not valid JSON ({err})") from None


def model_components(folder: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """``{component: (library, class name)}`` of the model components of a pipeline folder: the entries of its
    ``model_index.json`` that have a ``<component>/config.json`` (tokenizers, schedulers and image processors have
    none, so they are left out)."""
    folder = Path(folder)
    components = {}
    for name, entry in read_model_index(folder).items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        if (folder / name / "config.json").is_file():
            components[name] = (str(entry[0]), str(entry[1]))
    return components


def _module_class(library: str, class_name: str) -> type[nn.Module]:
    """The class ``model_index.json`` names: ``diffusers`` and ``transformers`` classes, or a pipeline-local one
    (``["stable_diffusion", "StableDiffusionSafetyChecker"]`` lives in ``diffusers.pipelines.stable_diffusion``)."""
    module = library if library in ("diffusers", "transformers") else f"diffusers.pipelines.{library}"
    found = getattr(importlib.import_module(module), class_name, None)
    if not isinstance(found, type) or not issubclass(found, nn.Module):
        raise ValueError(f"model_index.json names {library}.{class_name}, which is not a torch module class")
    return found


def build_component(folder: str | os.PathLike, name: str, library: str, class_name: str) -> nn.Module:
    """Build one component of a pipeline folder from its ``config.json`` on the meta device (no weights), in eval
    mode as ``from_pretrained`` returns it.

    Diffusers models come from ``from_config``; transformers models from their class's ``config_class``.
    """
    cls = _module_class(library, class_name)
    config = json.loads((Path(folder) / name / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        if hasattr(cls, "from_config") and hasattr(cls, "config_name"):  # a diffusers ModelMixin
            module = cls.from_config(config)
        else:
            values = {key: value for key, value in config.items() if not key.startswith("_")}
            module = cls(cls.config_class.from_dict(values))
    return module.eval()  # as from_pretrained leaves it (no dropout)


def build_on_meta(source: str | os.PathLike, components: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Build the model components of a shipped architecture (by name) or of a local pipeline folder on the meta
    device: parameters and buffers with their shapes and dtypes, no storage.

    Args:
        source: an architecture name (:func:`architecture_names`) or a diffusers pipeline folder.
        components: the components to build (e.g. ``["transformer"]``); default all of them.

    Returns:
        ``{component name: module}`` in ``model_index.json`` order.
    """
    folder = architecture_path(str(source)) if str(source) in ARCHITECTURES else Path(source)
    found = model_components(folder)
    wanted = list(found) if components is None else list(components)
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(f"{folder} has no model component {', '.join(missing)} (it has: {', '.join(found)})")
    return {name: build_component(folder, name, *found[name]) for name in wanted}
