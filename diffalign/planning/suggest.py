"""What would make a plan fit: each knob tried alone on a copy of the config, then the cheap ones together.

Knobs, cheapest in step time first: gradient checkpointing, the text-embedding cache with the encoders released,
FSDP2 on the same GPUs, 8-bit AdamW, smaller re-scoring calls or micro-batches (the effective batch stays with
``optim.gradient_accumulation_steps``), per-block checkpointing in reward backprop, DPO's CPU offload, and FSDP2 on
more GPUs. A re-plan reuses the planner's measurements, so trying them takes milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from diffalign.config import ConfigError
from diffalign.planning.plan import GB, MemoryPlan, Planner, PlanSettings


__all__ = ["suggest"]

Variant = tuple[str, Any, PlanSettings]
"""A change: its description, the changed config and settings."""


def _replace(config: Any, dotted: str, value: Any) -> Any:
    """``config`` with the dotted key set (each level through ``dataclasses.replace``, so checks run again)."""
    head, _, rest = dotted.partition(".")
    inner = value if not rest else _replace(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: inner})


def _set(config: Any, *pairs: tuple[str, Any]) -> Any | None:
    """``config`` with every ``(key, value)`` set in order; None when the result is not a valid config."""
    try:
        for key, value in pairs:
            config = _replace(config, key, value)
    except (ConfigError, ValueError):
        return None
    return config


def _shardable(config: Any) -> bool:
    """FSDP2 refuses Adafactor and 8-bit AdamW (diffalign.trainers.sharding.check_sharded_options)."""
    return config.optim.optimizer == "adamw" and not config.optim.use_8bit_adam


def _switches(config: Any, settings: PlanSettings) -> Iterator[Variant]:
    method, optim = config.method, config.optim
    if not config.gradient_checkpointing:
        yield "gradient_checkpointing: true", _set(config, ("gradient_checkpointing", True)), settings
    if method != "diffusion_dpo" and config.model.offload_text_encoders == "keep":
        cached = _set(config, ("sampling.precompute_text_embeddings", True), ("model.offload_text_encoders", "delete"))
        yield "sampling.precompute_text_embeddings: true + model.offload_text_encoders: delete", cached, settings
    if settings.sharding == "ddp" and settings.gpus > 1 and _shardable(config):
        sharded = dataclasses.replace(settings, sharding="fsdp2")
        yield f"--sharding fsdp2 (on the {settings.gpus} GPUs)", config, sharded
    if optim.optimizer == "adamw" and not optim.use_8bit_adam and settings.sharding == "ddp":
        yield "optim.use_8bit_adam: true", _set(config, ("optim.use_8bit_adam", True)), settings
    if method == "reward_backprop" and not config.backprop.checkpoint_blocks:
        pairs = (("gradient_checkpointing", True), ("backprop.checkpoint_blocks", True))
        yield "gradient_checkpointing + backprop.checkpoint_blocks: true", _set(config, *pairs), settings
    if method == "diffusion_dpo" and not config.dpo.offload_frozen:
        yield "dpo.offload_frozen: true", _set(config, ("dpo.offload_frozen", True)), settings


def _sizes(config: Any, guided: bool) -> Iterator[tuple[str, int, int]]:
    """Keys that bound a call's rows: ``(key, current value, smallest value the trainer accepts)``."""
    if config.method == "grpo":
        train = config.train
        if train.timestep_chunk == "auto":  # GRPOTrainer refuses fewer rows than one trained step of a micro-batch
            rows = train.batch_size * (2 if train.cfg and guided else 1)
            yield "train.max_rescore_rows", train.max_rescore_rows, rows
        yield "train.batch_size", train.batch_size, 1
        yield "sampling.batch_size", config.sampling.batch_size, 1
    elif config.method == "reward_backprop":
        yield "sampling.batch_size", config.sampling.batch_size, 1
    else:
        yield "data.batch_size", config.data.batch_size, 1


def _largest_fitting(
    planner: Planner, config: Any, settings: PlanSettings, key: str, current: int, smallest: int
) -> Variant | None:
    """The largest value of ``key`` in ``[smallest, current)`` that fits, as a variant."""
    for value in range(current - 1, smallest - 1, -1):
        changed = _set(config, (key, value))
        if changed is not None and planner.plan(changed, settings).fits:
            return f"{key}: {value}{_keeps_batch(config, key)}", changed, settings
    return None


def _keeps_batch(config: Any, key: str) -> str:
    """A note for the sizes that change the effective batch (GRPO's rollout chunk and re-scoring rows do not)."""
    if key in ("train.max_rescore_rows", "sampling.batch_size") and config.method == "grpo":
        return ""
    return " with a larger optim.gradient_accumulation_steps for the same effective batch"


def _more_gpus(planner: Planner, config: Any, settings: PlanSettings) -> Variant | None:
    if not _shardable(config):
        return None
    for gpus in (2, 4, 8, 16, 32, 64):
        if gpus <= settings.gpus:
            continue
        wider = dataclasses.replace(settings, gpus=gpus, sharding="fsdp2")
        if _valid_gpus(config, gpus) and planner.plan(config, wider).fits:
            return f"fsdp2 on {gpus} GPUs", config, wider
    return None


def _valid_gpus(config: Any, gpus: int) -> bool:
    """GRPO splits an epoch's images evenly over processes."""
    if config.method != "grpo":
        return True
    return (config.sampling.prompts_per_epoch * config.sampling.images_per_prompt) % gpus == 0


def _variants(planner: Planner, config: Any, settings: PlanSettings) -> Iterator[Variant]:
    yield from (variant for variant in _switches(config, settings) if variant[1] is not None)
    spec = planner.spec
    guided = config.method == "grpo" and config.sampling.guidance_scale > 1 and not spec.guidance_embedded
    for key, current, smallest in _sizes(config, guided):
        found = _largest_fitting(planner, config, settings, key, current, smallest)
        if found is not None:
            yield found
    found = _more_gpus(planner, config, settings)
    if found is not None:
        yield found


def _combined(planner: Planner, config: Any, settings: PlanSettings) -> tuple[list[str], MemoryPlan]:
    """The switches applied one after another, cheapest first, until the plan fits (or they run out)."""
    applied: list[str] = []
    plan = planner.plan(config, settings)
    while not plan.fits:
        step = next((v for v in _switches(config, settings) if v[1] is not None), None)
        if step is None:
            break
        applied.append(step[0])
        config, settings = step[1], step[2]
        plan = planner.plan(config, settings)
    return applied, plan


def suggest(planner: Planner, config: Any, settings: PlanSettings, plan: MemoryPlan) -> list[str]:
    """Changes that make ``plan`` (of ``config`` on ``settings``) fit: each that does alone, with the total it
    gives; when none does, the switches together. Empty when the plan fits already."""
    if plan.fits:
        return []
    fitting = []
    for description, changed, changed_settings in _variants(planner, config, settings):
        total = planner.plan(changed, changed_settings).total
        if total <= changed_settings.gpu_memory:
            fitting.append(f"{description} ({total / GB:.1f} GB)")
    if fitting:
        return fitting
    applied, combined = _combined(planner, config, settings)
    if not applied:
        return ["none of the changes the planner knows makes it fit: lower the batch sizes or the resolution"]
    verdict = "fits" if combined.fits else "still does not fit"
    return [f"no single change fits; together: {' + '.join(applied)} ({combined.total / GB:.1f} GB, {verdict})"]
