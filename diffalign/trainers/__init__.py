"""Trainers: one file per method, each with its config dataclass beside it, on the shared runtime (common.py).

``get_trainer(method)`` returns ``(ConfigClass, TrainerClass)``; a trainer is built as ``TrainerClass(config)``
and run with ``.train()``. ``diffalign train CONFIG.yaml`` reads ``method`` from the YAML to pick it.
"""

from __future__ import annotations

import importlib
from typing import Any


TRAINERS: dict[str, tuple[str, str, str]] = {
    "grpo": ("diffalign.trainers.grpo", "GRPOConfig", "GRPOTrainer"),
    "diffusion_dpo": ("diffalign.trainers.diffusion_dpo", "DiffusionDPOConfig", "DiffusionDPOTrainer"),
    "reward_backprop": ("diffalign.trainers.reward_backprop", "RewardBackpropConfig", "RewardBackpropTrainer"),
    "raft": ("diffalign.trainers.self_play", "SelfPlayConfig", "SelfPlayTrainer"),
    "spin": ("diffalign.trainers.self_play", "SelfPlayConfig", "SelfPlayTrainer"),
    "seppo": ("diffalign.trainers.self_play", "SelfPlayConfig", "SelfPlayTrainer"),
    "self_npo": ("diffalign.trainers.self_npo", "SelfNPOConfig", "SelfNPOTrainer"),
}
"""method name -> (module, config class, trainer class), imported lazily."""


def get_trainer(method: str) -> tuple[type, Any]:
    """``(ConfigClass, TrainerClass)`` of a method; a clear error for an unknown one."""
    if method not in TRAINERS:
        import difflib

        close = difflib.get_close_matches(method, TRAINERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {method!r}{hint}; available: {', '.join(TRAINERS)}")
    module_name, config_name, trainer_name = TRAINERS[method]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, trainer_name)
