"""Which architecture a config trains, built on the meta device: :class:`ModelSpec`.

``model.path`` is mapped to an architecture folder -- a local diffusers pipeline folder as it is, a hub id of a
shipped architecture (:mod:`diffalign.adapters.architectures`) to that architecture's folder -- and every model
component of the folder is built from its ``config.json`` on the meta device (no weights, no download).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from torch import nn

from diffalign.adapters import adapter_class_for
from diffalign.adapters.architectures import (
    ARCHITECTURES,
    architecture_for_model,
    architecture_path,
    build_on_meta,
    read_model_index,
)


__all__ = ["ModelSpec", "UnknownArchitectureError", "load_model_spec", "resolve_architecture"]


class UnknownArchitectureError(ValueError):
    """``model.path`` names nothing the planner can build: not a local pipeline folder, not a known hub id."""


def _known() -> str:
    return "; ".join(f"{arch.name} ({', '.join(arch.hub_ids)})" for arch in ARCHITECTURES.values())


def resolve_architecture(model_path: str, architecture: str | None = None) -> tuple[Path, str]:
    """The folder to build for ``model_path`` and a label for it.

    Args:
        model_path: the config's ``model.path``: a local diffusers pipeline folder (only its ``model_index.json``
            and component ``config.json`` files are read), or the hub id of a shipped architecture.
        architecture: a shipped architecture name that overrides ``model_path`` (a fine-tune of it on the hub).

    Raises:
        UnknownArchitectureError: nothing matches; the message lists the known architectures and how to point
            at a folder.
    """
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise UnknownArchitectureError(f"unknown architecture {architecture!r}; known: {_known()}")
        return architecture_path(architecture), f"{architecture} (--architecture, model.path {model_path})"
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        read_model_index(folder)  # a clear error for a folder that is no pipeline
        return folder, str(folder)
    name = architecture_for_model(model_path)
    if name is None:
        raise UnknownArchitectureError(
            f"cannot plan model.path {model_path!r}: it is no local pipeline folder and no known architecture. "
            f"Known: {_known()}. Point model.path at a local diffusers pipeline folder (its model_index.json and "
            "each component's config.json are enough, no weights), or pass --architecture NAME for a fine-tune "
            "of a known architecture"
        )
    return architecture_path(name), f"{ARCHITECTURES[name].title} [{name}]"


@dataclasses.dataclass
class ModelSpec:
    """The components of one pipeline, built on the meta device, and what the planner needs to know about its family.

    Attributes:
        folder: the architecture folder.
        label: how reports name it.
        family: the adapter family (``sd``, ``sdxl``, ``sd3``, ``flux``).
        denoiser_name: ``unet`` or ``transformer``.
        guidance_embedded: guidance is a denoiser input (FLUX.1-dev), never a second CFG batch.
        lora_targets: the family's default LoRA targets.
        modules: ``{component: meta module}`` of every model component.
        default_max_sequence_length: T5 tokens when ``model.max_sequence_length`` is null (None: no T5).
        default_resolution: the family's native image side.
        vae_scale_factor: image pixels per latent pixel.
    """

    folder: Path
    label: str
    family: str
    denoiser_name: str
    guidance_embedded: bool
    lora_targets: tuple[str, ...]
    modules: dict[str, nn.Module]
    default_max_sequence_length: int | None
    default_resolution: int
    vae_scale_factor: int

    @property
    def denoiser(self) -> nn.Module:
        return self.modules[self.denoiser_name]

    @property
    def vae(self) -> nn.Module:
        return self.modules["vae"]

    @property
    def text_encoder_names(self) -> list[str]:
        return [name for name in self.modules if name.startswith("text_encoder")]

    @property
    def other_names(self) -> list[str]:
        """Frozen components that are no denoiser, VAE or text encoder (SD1.5's safety checker)."""
        taken = {self.denoiser_name, "vae", *self.text_encoder_names}
        return [name for name in self.modules if name not in taken]

    def text_length(self, max_sequence_length: int | None) -> int:
        """Tokens of one prompt's conditioning: CLIP's 77 (SD, SDXL), CLIP + T5 (SD3), T5 (FLUX)."""
        clip = self.modules["text_encoder"].config.max_position_embeddings
        t5 = max_sequence_length or self.default_max_sequence_length
        if self.family == "sd3":
            return clip + t5
        return t5 if self.family == "flux" else clip


def load_model_spec(model_path: str, architecture: str | None = None) -> ModelSpec:
    """Resolve ``model_path`` (:func:`resolve_architecture`) and build its components on the meta device."""
    folder, label = resolve_architecture(model_path, architecture)
    adapter = adapter_class_for(read_model_index(folder)["_class_name"])
    modules = build_on_meta(folder)
    if adapter.denoiser_name not in modules or "vae" not in modules:
        raise ValueError(f"{folder} lacks the {adapter.denoiser_name} or vae config.json the planner needs")
    default_length = inspect.signature(adapter.__init__).parameters.get("max_sequence_length")
    scale = 2 ** (len(modules["vae"].config.block_out_channels) - 1)
    # FluxPipeline's default size is a constant (128 latent pixels); the others use the denoiser's sample size.
    sample_size = 128 if adapter.family == "flux" else modules[adapter.denoiser_name].config.sample_size
    return ModelSpec(
        folder=folder,
        label=label,
        family=adapter.family,
        denoiser_name=adapter.denoiser_name,
        guidance_embedded=adapter.guidance_embedded,
        lora_targets=tuple(adapter.default_lora_targets),
        modules=modules,
        default_max_sequence_length=None if default_length is None else default_length.default,
        default_resolution=sample_size * scale,
        vae_scale_factor=scale,
    )
