"""``diffalign plan``: the per-GPU memory of a training config, planned before any weight is loaded.

The configured architecture is built on the meta device (:mod:`diffalign.adapters.architectures`, or a local
pipeline folder's configs), the activations of its calls are measured there at the configured shapes
(:mod:`~diffalign.planning.costs`), and the trainer's memory is added up item by item
(:mod:`~diffalign.planning.phases`); docs/performance.md#diffalign-plan explains the model and how it was checked
against measured peaks. From Python::

    from diffalign.config import load_config
    from diffalign.planning import PlanSettings, format_plan, plan_memory
    from diffalign.trainers.grpo import GRPOConfig

    config = load_config(GRPOConfig, "configs/grpo/flux_hps.yaml")
    plan = plan_memory(config, PlanSettings(gpus=8, sharding="fsdp2"))
    print(format_plan(plan), plan.total, plan.fits)
"""

from __future__ import annotations

from typing import Any

from diffalign.planning.model import UnknownArchitectureError
from diffalign.planning.plan import GB, Item, MemoryPlan, Phase, Planner, PlanSettings
from diffalign.planning.report import format_plan, parse_memory, plan_to_dict
from diffalign.planning.suggest import suggest
from diffalign.planning.tracking import StorageTracker


__all__ = [
    "GB",
    "Item",
    "MemoryPlan",
    "Phase",
    "PlanSettings",
    "Planner",
    "StorageTracker",
    "UnknownArchitectureError",
    "format_plan",
    "parse_memory",
    "plan_memory",
    "plan_to_dict",
    "suggest",
]


def plan_memory(
    config: Any,
    settings: PlanSettings | None = None,
    planner: Planner | None = None,
    suggestions: bool = True,
) -> MemoryPlan:
    """The per-GPU memory plan of a loaded trainer config.

    Args:
        config: a ``GRPOConfig``, ``RewardBackpropConfig`` or ``DiffusionDPOConfig``.
        settings: GPUs, memory per GPU, sharding (default: one 80 GB GPU).
        planner: a :class:`Planner` of the config's model to reuse (its measurements are cached).
        suggestions: when the plan does not fit, fill :attr:`MemoryPlan.suggestions` with the changes that would
            make it fit.

    Raises:
        UnknownArchitectureError: ``model.path`` is no local pipeline folder and no known hub id.
    """
    settings = settings or PlanSettings()
    planner = planner or Planner(config.model.path, settings.architecture)
    plan = planner.plan(config, settings)
    if suggestions:
        plan.suggestions = suggest(planner, config, settings, plan)
    return plan
