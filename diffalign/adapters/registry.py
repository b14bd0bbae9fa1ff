"""``load_adapter``: a hub id, a local pipeline folder or a pipeline object -> the family's adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diffalign.adapters.base import DiffusionAdapter
from diffalign.adapters.flux import FluxAdapter
from diffalign.adapters.flux2 import Flux2Adapter
from diffalign.adapters.flux_kontext import FluxKontextAdapter
from diffalign.adapters.qwenimage import QwenImageAdapter
from diffalign.adapters.sana import SanaAdapter
from diffalign.adapters.sd import StableDiffusionAdapter
from diffalign.adapters.sd3 import StableDiffusion3Adapter
from diffalign.adapters.sdxl import StableDiffusionXLAdapter
from diffalign.adapters.zimage import ZImageAdapter


ADAPTERS: tuple[type[DiffusionAdapter], ...] = (
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
    StableDiffusion3Adapter,
    FluxAdapter,
    Flux2Adapter,
    FluxKontextAdapter,
    QwenImageAdapter,
    ZImageAdapter,
    SanaAdapter,
)
"""The families that ship with diffalign. A new family is one adapter file, listed here or registered from
outside with :func:`register_adapter` (plus a tiny builder in testing.py for its tests)."""

_BY_PIPELINE_CLASS: dict[str, type[DiffusionAdapter]] = {}


class UnsupportedPipelineError(ValueError):
    """The pipeline class has no diffalign adapter."""


def register_adapter(adapter_cls: type[DiffusionAdapter]) -> type[DiffusionAdapter]:
    """Make ``adapter_cls`` the adapter of the pipeline classes it names; usable as a class decorator.

    Everything else (sampling, the three trainers, evaluation, the command line) reads the family through the
    adapter interface, so a registered family trains like the built-in ones.

    Raises:
        ValueError: a pipeline class that another adapter already serves, or a class missing the attributes
            every adapter sets.
    """
    missing = [
        name
        for name in ("family", "denoiser_name", "pipeline_class_names", "default_lora_targets")
        if not hasattr(adapter_cls, name)
    ]
    if missing:
        raise ValueError(f"{adapter_cls.__name__} does not set {', '.join(missing)}; see DiffusionAdapter")
    for name in adapter_cls.pipeline_class_names:
        taken = _BY_PIPELINE_CLASS.get(name)
        if taken is not None and taken is not adapter_cls:
            raise ValueError(f"{name} is already served by {taken.__name__}")
    for name in adapter_cls.pipeline_class_names:
        _BY_PIPELINE_CLASS[name] = adapter_cls
    return adapter_cls


def unregister_adapter(adapter_cls: type[DiffusionAdapter]) -> None:
    """Forget a family registered with :func:`register_adapter` (tests, plugins that unload)."""
    for name in adapter_cls.pipeline_class_names:
        if _BY_PIPELINE_CLASS.get(name) is adapter_cls:
            del _BY_PIPELINE_CLASS[name]


for _adapter in ADAPTERS:
    register_adapter(_adapter)


def supported_pipelines() -> str:
    return ", ".join(f"{name} ({adapter.family})" for name, adapter in _BY_PIPELINE_CLASS.items())


def adapter_class_for(pipeline_class_name: str) -> type[DiffusionAdapter]:
    """The adapter class for a diffusers pipeline class name; a clear error for anything else."""
    try:
        return _BY_PIPELINE_CLASS[pipeline_class_name]
    except KeyError:
        raise UnsupportedPipelineError(
            f"{pipeline_class_name} is not supported by diffalign; supported pipelines: {supported_pipelines()}"
        ) from None


def _pipeline_class_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); pass a folder written by "
            "pipe.save_pretrained(...) or a hub id"
        )
    try:
        return json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{index} is not a valid diffusers model_index.json ({err})") from err


def load_pipeline(
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
    **kwargs: Any,
):
    """Load a supported diffusers pipeline from a local folder or a hub id, at ``revision`` (hub ids) with the
    ``variant`` weight files when they are given; ``kwargs`` go to ``from_pretrained`` (e.g. a component to use).

    The pipeline class is checked *before* any weight is read, so an unsupported model fails fast.
    """
    from diffusers import DiffusionPipeline

    kwargs.update({key: value for key, value in {"revision": revision, "variant": variant}.items() if value})
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file, not a diffusers pipeline folder")
        class_name = _pipeline_class_of_folder(path)
        adapter_class_for(class_name)
        return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, **kwargs)
    source = str(source)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"no pipeline folder at {source!r} (and it is not a hub id of the form 'org/name')")
    try:
        return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load {source!r} from the Hugging Face hub ({err}). Offline? Download it once and pass "
            "the local folder instead."
        ) from err


def load_vae(source: str | os.PathLike) -> Any:
    """An ``AutoencoderKL`` from a folder or hub id holding one (its ``config.json`` at the top, as
    ``madebyollin/sdxl-vae-fp16-fix``), or a pipeline folder's ``vae/`` subfolder; loaded in fp32 (the adapters keep
    the VAE in fp32)."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return AutoencoderKL.from_pretrained(str(path))
        if (path / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(str(path), subfolder="vae")
        raise FileNotFoundError(f"no VAE in {path}: expected config.json (an AutoencoderKL folder) or vae/config.json")
    try:
        return AutoencoderKL.from_pretrained(str(source))
    except OSError as err:
        raise OSError(
            f"could not load the VAE {str(source)!r} ({err}). Offline? Download it once and pass the local folder."
        ) from err


def load_adapter(
    source: Any,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
    vae_path: str | os.PathLike | None = None,
    **adapter_kwargs: Any,
) -> DiffusionAdapter:
    """Wrap a model in its family's adapter.

    Args:
        source: a diffusers pipeline object, a local folder written by ``save_pretrained``, or a hub id.
        device: where to run (default: CPU, or the pipeline object's device).
        dtype: compute dtype of the denoiser and text encoders (default fp32; the VAE always stays fp32).
        revision: hub revision (branch, tag or commit) of a hub id; diffusers ignores it for local folders.
        variant: weight-file variant, e.g. ``fp16`` (``diffusion_pytorch_model.fp16.safetensors``).
        vae_path: a VAE to use instead of the pipeline's (:func:`load_vae`), e.g. the fp16-safe SDXL VAE
            ``madebyollin/sdxl-vae-fp16-fix``; only with a folder or hub id as ``source``.
        **adapter_kwargs: family options, e.g. ``height``, ``width``, ``max_sequence_length`` (SD3/FLUX).

    Raises:
        UnsupportedPipelineError: the pipeline class has no adapter (the message lists the supported ones).
        FileNotFoundError: a path that is not a pipeline folder.
    """
    pipe = source
    if isinstance(source, (str, os.PathLike)):
        vae = {"vae": load_vae(vae_path)} if vae_path is not None else {}
        pipe = load_pipeline(source, dtype=dtype, revision=revision, variant=variant, **vae)
    elif vae_path is not None:
        raise ValueError("vae_path replaces the VAE of a pipeline loaded from a folder or hub id, not of a built one")
    adapter_cls = adapter_class_for(type(pipe).__name__)
    return adapter_cls(pipe, device=device, dtype=dtype, **adapter_kwargs)
