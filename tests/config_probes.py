"""Helpers of tests/test_config_keys.py: the config-key walk, cheap tiny runs, and the tools probes observe with."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import json
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import torch


# --- the walk ----------------------------------------------------------------------------------------------------


def _dataclass_members(tp: Any) -> list[type]:
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [m for m in members if isinstance(m, type) and dataclasses.is_dataclass(m)]


def _mapping_value_dataclasses(tp: Any) -> list[type]:
    """Dataclass value types of ``dict[str, X]`` members of ``tp`` (per-entry options, e.g. per-reward groups)."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    found = []
    for member in members:
        if typing.get_origin(member) is dict and len(typing.get_args(member)) == 2:
            found += _dataclass_members(typing.get_args(member)[1])
    return found


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a config dataclass as a dotted name, recursing into nested config groups (and into the
    dataclass values of ``dict`` fields as ``key.*.field``)."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, tp = prefix + field.name, hints[field.name]
        groups = _dataclass_members(tp)
        if groups:
            for group in groups:
                keys += [k for k in leaf_keys(group, key + ".") if k not in keys]
            continue
        keys.append(key)
        for group in _mapping_value_dataclasses(tp):
            keys += [k for k in leaf_keys(group, key + ".*.") if k not in keys]
    return keys


def matches_any(key: str, patterns: typing.Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


# --- configs -----------------------------------------------------------------------------------------------------


def with_keys(raw: dict, values: dict[str, Any]) -> dict:
    """A deep copy of the raw config ``raw`` with the dotted ``values`` set."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


# --- fast tiny runs ----------------------------------------------------------------------------------------------

DENOISERS = ("unet", "transformer")


def fresh_pipeline(pipe: Any, dtype: torch.dtype | None) -> Any:
    """A pipeline sharing ``pipe``'s frozen parts (VAE, tokenizers; text encoders when they keep their dtype) with
    its own denoiser and scheduler: what a run trains or steps is never shared."""
    components = dict(pipe.components)
    own = {"scheduler", *DENOISERS}
    if dtype not in (None, torch.float32):
        own |= {name for name in components if name.startswith("text_encoder")}
    for name in own & set(components):
        components[name] = copy.deepcopy(components[name])
    return type(pipe)(**components)


def cached_pipeline(cache: dict[str, Any], folder: str | Path) -> Any:
    """The pipeline of a local folder, loaded once into ``cache`` (what :func:`fast_loading` yields)."""
    from diffalign.adapters.registry import load_pipeline

    key = str(Path(folder).resolve())
    if key not in cache:
        cache[key] = load_pipeline(folder)
    return cache[key]


@contextlib.contextmanager
def fast_loading():
    """Make ``TrainingRun`` load each local pipeline folder once: ``diffalign.trainers.common.load_adapter`` gets
    a fresh copy of the folder's pipeline object (revision / variant loads still read the folder)."""
    import diffalign.trainers.common as common

    real = common.load_adapter
    cache: dict[str, Any] = {}

    def load(source, device=None, dtype=None, revision=None, variant=None, **kwargs):
        if revision or variant or kwargs.get("vae_path") or not Path(str(source)).is_dir():
            return real(source, device=device, dtype=dtype, revision=revision, variant=variant, **kwargs)
        pipe = cached_pipeline(cache, source)
        return real(fresh_pipeline(pipe, dtype), device=device, dtype=dtype, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "load_adapter", load)
        yield cache


@contextlib.contextmanager
def fresh_accelerator_state():
    """Let a run pick another ``mixed_precision`` (accelerate fixes it once per process), then put the process's
    state back."""
    from accelerate.state import AcceleratorState

    saved = dict(AcceleratorState._shared_state)
    AcceleratorState._shared_state.clear()
    try:
        yield
    finally:
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(saved)


# --- observation tools -------------------------------------------------------------------------------------------


class DenoiserSpy:
    """Forward pre-hook on a denoiser: the batch size, timestep and input latents of every call."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.batch_sizes: list[int] = []
        self.timesteps: list[Any] = []
        self.inputs: list[torch.Tensor] = []
        self._handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        latents = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        self.inputs.append(latents.detach().clone())
        self.batch_sizes.append(latents.shape[0])
        self.timesteps.append(kwargs.get("timestep", args[1] if len(args) > 1 else None))

    def __enter__(self) -> DenoiserSpy:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)


def spy(denoiser: torch.nn.Module) -> DenoiserSpy:
    return DenoiserSpy(denoiser)


@contextlib.contextmanager
def perturbed_lora(run: Any, scale: float = 0.3, seed: int = 0):
    """Give the LoRA B matrices (zero at init, so policy == reference) random values inside the block."""
    names = run.trainable_names()
    saved = [p.detach().clone() for p in run.params]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in zip(names, run.params):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(run.params, saved):
                param.copy_(value)


def fake_update(run: Any) -> dict[str, float]:
    """One real optimizer step of ``run`` on a loss of its parameters alone (no model forward)."""
    loss = sum((p.float() ** 2).sum() + p.float().sum() for p in run.params)
    run.backward(loss)
    return run.optimizer_step()


@dataclasses.dataclass
class LoopRecord:
    """What :meth:`TrainingRun.run_steps` did with a probe's step function."""

    steps: list[int]
    evaluated: list[int]
    logged: list[int]
    checkpoints: list[str]


def run_loop(run: Any, step_seconds: float = 0.0) -> LoopRecord:
    """Drive ``run`` through ``run_steps`` with steps that update the weights (no model forward)."""
    from diffalign.trainers.common import list_checkpoints

    steps, evaluated = [], []

    def train_step(step: int) -> dict[str, float]:
        steps.append(step)
        fake_update(run)
        time.sleep(step_seconds)
        return {"loss": float(step)}

    def evaluate(step: int) -> dict[str, float]:
        evaluated.append(step)
        return {"eval/probe": 0.0}

    run.run_steps(train_step, dict, evaluate, desc="probe", postfix=())
    metrics = run.output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    logged = [r["step"] for r in records if "loss" in r]
    return LoopRecord(steps, evaluated, logged, [p.name for p in list_checkpoints(run.output_dir)])


def lora_layers(denoiser: torch.nn.Module) -> dict[str, Any]:
    """The peft LoRA layers of a denoiser by module name."""
    return {name: m for name, m in denoiser.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
