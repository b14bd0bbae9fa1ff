"""The memory plan of a training config: what one GPU holds, phase by phase, against its memory.

A plan has the **resident** items (held for the whole run: weights, optimizer state, EMA, reference copy, text
encoders, VAE, reward models) and the **phases** of a step, each with the items it adds on top (GRPO's rollout,
training and optimizer step, evaluation; DPO's image encoding; ...). The peak is the resident memory plus the
largest phase. Dtypes and copies follow the trainers (:class:`diffalign.trainers.common.TrainingRun` and the three
trainers); activations come from meta-device measurements of the real modules (:mod:`diffalign.planning.costs`).
docs/performance.md#diffalign-plan describes the model item by item.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

from diffalign.planning import costs
from diffalign.planning.costs import Cost, Mode
from diffalign.planning.model import ModelSpec, load_model_spec


__all__ = ["GB", "Item", "MemoryPlan", "Phase", "PlanSettings", "Planner"]

GB = 10**9
"""Plans count decimal gigabytes."""

Sharding = Literal["ddp", "fsdp2"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Where the config runs.

    Attributes:
        gpus: processes (one GPU each).
        gpu_memory: bytes of one GPU's memory.
        sharding: ``ddp`` replicates the denoiser on every GPU; ``fsdp2`` shards its parameters, gradients,
            optimizer state, EMA and (full fine-tuning) reference copy over the GPUs.
        architecture: a shipped architecture that overrides ``model.path`` (a fine-tune of it).
        device: ``cuda`` plans a GPU run; ``cpu`` a CPU run (the optimizer then steps tensor by tensor instead of
            with multi-tensor kernels), to compare with CPU measurements.
    """

    gpus: int = 1
    gpu_memory: int = 80 * GB
    sharding: Sharding = "ddp"
    architecture: str | None = None
    device: Literal["cuda", "cpu"] = "cuda"

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {self.gpus}")
        if self.gpu_memory <= 0:
            raise ValueError(f"gpu_memory must be > 0 bytes, got {self.gpu_memory}")
        if self.sharding not in ("ddp", "fsdp2"):
            raise ValueError(f"sharding must be 'ddp' or 'fsdp2', got {self.sharding!r}")

    @property
    def shards(self) -> int:
        """How many GPUs share the sharded items (1 without FSDP2)."""
        return self.gpus if self.sharding == "fsdp2" else 1


@dataclasses.dataclass(frozen=True)
class Item:
    """One line of a plan: ``bytes`` on each GPU, and how they were counted."""

    name: str
    bytes: int
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Phase:
    """A part of a training step and the items it holds on top of the resident ones."""

    name: str
    items: tuple[Item, ...]

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.items)


@dataclasses.dataclass
class MemoryPlan:
    """Per-GPU memory of one config (see the module docstring).

    Attributes:
        method: the trainer.
        model: the architecture planned.
        settings: GPUs, memory, sharding.
        resident: items held for the whole run.
        phases: the step's phases.
        activations: the training call's activations (bytes) with and without gradient checkpointing, whichever
            the config uses.
        notes: what the plan leaves out or assumes.
        suggestions: changes that would make a plan that does not fit fit (filled by :func:`suggest`).
    """

    method: str
    model: str
    settings: PlanSettings
    resident: list[Item]
    phases: list[Phase]
    activations: dict[str, int]
    notes: list[str]
    suggestions: list[str] = dataclasses.field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        return sum(item.bytes for item in self.resident)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.bytes)

    @property
    def total(self) -> int:
        """The peak: resident memory plus the largest phase."""
        return self.resident_bytes + self.peak_phase.bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.settings.gpu_memory


# ---------------------------------------------------------------------------------------------------------------------
# Measurements, cached per planner
# ---------------------------------------------------------------------------------------------------------------------


def parameter_count(module: nn.Module) -> int:
    """Parameters of ``module`` (meta or not)."""
    return sum(p.numel() for p in module.parameters())


def buffer_bytes(module: nn.Module, float_bytes: int) -> int:
    """Buffers as the module holds them after a cast: floating ones in ``float_bytes``, others as they are."""
    return sum(b.numel() * (float_bytes if b.is_floating_point() else b.element_size()) for b in module.buffers())


class Planner:
    """Plans configs of one model: the architecture is built on the meta device once and every activation
    measurement is cached, so that variants of a config (:func:`~diffalign.planning.suggest.suggest`) plan in
    milliseconds.

    Args:
        model_path: ``model.path`` of the configs.
        architecture: a shipped architecture name overriding ``model_path``.
    """

    def __init__(self, model_path: str, architecture: str | None = None) -> None:
        self.spec: ModelSpec = load_model_spec(model_path, architecture)
        self._denoisers: dict[tuple, tuple[nn.Module, list[nn.Parameter]]] = {}
        self._costs: dict[tuple, Cost] = {}
        self._text_costs: dict[tuple, tuple[Cost, Cost]] = {}

    def denoiser(self, lora: tuple | None, dtype: torch.dtype) -> tuple[nn.Module, list[nn.Parameter]]:
        """The denoiser set up for training (LoRA ``(rank, alpha, targets)`` or full) in ``dtype``, on meta."""
        key = (lora, dtype)
        if key not in self._denoisers:
            spec = None if lora is None else {"rank": lora[0], "alpha": lora[1], "targets": lora[2]}
            self._denoisers[key] = costs.prepare_denoiser(self.spec.denoiser, dtype, spec)
        return self._denoisers[key]

    def denoiser_cost(self, lora: tuple | None, dtype: torch.dtype, mode: Mode, image_hw: tuple, text: int) -> Cost:
        """One row of a denoiser call (see :mod:`~diffalign.planning.costs`)."""
        key = ("denoiser", lora, dtype, mode, image_hw, text)
        if key not in self._costs:
            model, _ = self.denoiser(lora, dtype)
            latent_hw = tuple(side // self.spec.vae_scale_factor for side in image_hw)
            inputs = costs.denoiser_inputs(model, 1, latent_hw, text, dtype)
            self._costs[key] = costs.measure_blocks(model, lambda: model(**inputs, return_dict=False)[0], mode)
        return self._costs[key]

    def vae_cost(self, part: str, image_hw: tuple, mode: Mode) -> Cost:
        """One image through the VAE's encoder or decoder."""
        key = ("vae", part, image_hw, mode)
        if key not in self._costs:
            self._costs[key] = costs.measure_vae(self.spec.vae, part, image_hw, mode)
        return self._costs[key]

    def text_cost(self, name: str, dtype: torch.dtype, max_sequence_length: int | None, prompts: int) -> Cost:
        """``prompts`` prompts through the text encoder ``name`` (no grad) in ``dtype``. Measured for one and two
        prompts and extended linearly: T5's position-bias tables do not grow with the batch."""
        encoder = self.spec.modules[name]
        t5 = getattr(encoder.config, "model_type", "") == "t5"
        tokens = (max_sequence_length or self.spec.default_max_sequence_length) if t5 else None
        tokens = tokens or encoder.config.max_position_embeddings
        key = (name, dtype, tokens)
        if key not in self._text_costs:
            if encoder.dtype != dtype:
                nn.Module.to(encoder, dtype)  # a meta module: the cast only changes what it would hold
            one, two = (costs.measure_text_encoder(encoder, tokens, batch) for batch in (1, 2))
            self._text_costs[key] = (one, two - one)
        first, per_prompt = self._text_costs[key]
        return first + per_prompt.scaled(prompts - 1)

    def tower_cost(self, name: str, vision: dict, dtype: torch.dtype, mode: Mode) -> Cost:
        """One image through a reward's image tower."""
        key = ("tower", name, dtype, mode)
        if key not in self._costs:
            self._costs[key] = costs.measure_vision_tower(vision, dtype, mode)
        return self._costs[key]

    def plan(self, config: Any, settings: PlanSettings) -> MemoryPlan:
        """The plan of ``config`` (a loaded trainer config whose ``model.path`` is this planner's) on ``settings``."""
        from diffalign.planning.phases import plan_config

        return plan_config(PlanInputs(self, config, settings))


@dataclasses.dataclass
class PlanInputs:
    """A config on a planner and settings, with the quantities every item uses (internal to the planner)."""

    planner: Planner
    config: Any
    settings: PlanSettings

    def __post_init__(self) -> None:
        model = self.config.model
        self.spec = self.planner.spec
        self.lora = (
            (model.lora.rank, model.lora.effective_alpha, tuple(model.lora.target_modules or self.spec.lora_targets))
            if model.lora.rank > 0
            else None
        )
        self.compute = _DTYPES.get(self.config.mixed_precision, torch.float32)
        # TrainingRun loads the pipeline in the mixed-precision dtype with LoRA, in float32 for full fine-tuning.
        self.load_bytes = self.compute.itemsize if self.lora else 4
        self.model, trained = self.planner.denoiser(self.lora, self.compute)
        self.trainable = sum(p.numel() for p in trained)
        self.trained_sizes = [p.numel() for p in trained]
        self.base = parameter_count(self.spec.denoiser)
        self.shards = self.settings.shards
        self.notes: list[str] = []
        self.activations: dict[str, int] = {}  # the training call's, with and without checkpointing

    def shard(self, nbytes: int) -> int:
        """A sharded item's bytes on one GPU."""
        return math.ceil(nbytes / self.shards)

    def text_length(self) -> int:
        return self.spec.text_length(self.config.model.max_sequence_length)

    def cost(self, mode: Mode, image_hw: tuple, rows: int) -> Cost:
        """The denoiser's cost for ``rows`` rows."""
        per_row = self.planner.denoiser_cost(self.lora, self.compute, mode, image_hw, self.text_length())
        return per_row.scaled(rows)
