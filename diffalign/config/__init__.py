"""Typed configs: YAML files and dotted command-line overrides, validated into nested dataclasses.

A config is a tree of ``kw_only`` dataclasses; its type hints are the schema and the attribute docstring under each
field is its help text. ``load_config`` reads YAML (or a dict), applies ``key.path=value`` overrides and raises
one :class:`ConfigError` listing every problem, each with its dotted key::

    cfg = load_config(GRPOConfig, "configs/grpo/sd35m_pickscore.yaml", ["optim.lr=1e-4", "seed=1"])
    save_config(cfg)  # -> <output_dir>/config.yaml, which load_config reads back to an equal config

The package has two parts, both re-exported here:

- :mod:`diffalign.config.loader`: the generic typed-YAML loader (``load_config``, ``save_config``,
  ``config_to_dict``, ``describe_config``, ``field_docs``, ``ConfigError``), which knows nothing about diffusion.
- :mod:`diffalign.config.groups`: the config groups shared by every trainer (:class:`ModelConfig`,
  :class:`OptimConfig`, ...) and their base :class:`TrainerConfig`; each trainer's own config subclasses
  ``TrainerConfig`` beside the trainer.
"""

from diffalign.config.groups import (
    CheckpointConfig,
    EMAConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
)
from diffalign.config.loader import (
    RESOLVED_CONFIG_NAME,
    ConfigError,
    ConfigIssue,
    config_to_dict,
    describe_config,
    field_docs,
    load_config,
    save_config,
)


__all__ = [
    "RESOLVED_CONFIG_NAME",
    "CheckpointConfig",
    "ConfigError",
    "ConfigIssue",
    "EMAConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
    "config_to_dict",
    "describe_config",
    "field_docs",
    "load_config",
    "save_config",
]
