"""Checkpoint and run folders: what a checkpoint holds, how it is written so that a crash never leaves a ``latest``
that does not load, how it is read without running code, and the one-run-per-folder rules.

A checkpoint ``<output_dir>/checkpoints/checkpoint-<step>/`` holds tensors and JSON:

==========================  ==============================================================================
``trainable.safetensors``   the trained weights (LoRA or full), by parameter name
``optimizer.pt``            the optimizer state: tensors and numbers, read with ``torch.load(weights_only=True)``
``lr_scheduler.json``       the learning-rate schedule's state
``ema.safetensors``         the EMA shadow weights (when EMA is on); ``num_updates`` in the metadata
``rng-<rank>.json``         each process's Python, NumPy, torch (and CUDA) generator states
``config.yaml``             the config the run had when it saved
``trainer_state.json``      step counters and the trainer's own state; written last, the "complete" marker
``lora/``                   the LoRA in diffusers format (``pipe.load_lora_weights``)
==========================  ==============================================================================

Nothing runs code when read: ``optimizer.pt`` is the one ``torch.save`` file, and torch's ``weights_only`` reader
accepts only tensors and plain containers; any other file that is not in its format (a crafted pickle included)
is refused with :class:`CheckpointError` before any of its content runs. Writing goes to
``.tmp-checkpoint-<step>``; every file and folder is fsynced, an existing ``checkpoint-<step>`` is renamed away
(``.old-...``) before the new one is renamed in, and only then deleted, marker first, so a kill at any point leaves
either the old or the new checkpoint complete. The next save tidies up after such a kill: an ``.old-`` folder
whose successor never arrived gets its name back, the other dotted folders are deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from diffalign.config import ConfigError, config_to_dict, load_config


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.json"
EMA_FILE = "ema.safetensors"
BEST_EVAL_FILE = "best_eval.safetensors"  # the best evaluation's trained weights (eval.early_stopping_patience)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# Files an output folder holds when a run has used it (removed by ``overwrite``); the tracker folder is added.
TEXT_CACHE_DIR = "text_cache"
"""The run folder's saved text-embedding cache (one safetensors file per process)."""
RUN_ARTIFACTS = (CONFIG_FILE, METRICS_FILE, "checkpoints", "lora", "model", "eval", TEXT_CACHE_DIR)
# Config keys that say how a run is watched, kept or computed, not what it trains: they may change on resume
# (``max_steps`` and ``max_minutes``: see :func:`changes_training`).
BOOKKEEPING_KEYS = (
    "output_dir",
    "logging",
    "checkpoint",
    "eval",
    "gradient_checkpointing",
    "model.offload_text_encoders",
    "model.compile",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from: a file missing, damaged, or not in diffalign's format."""


class RunFolderError(ValueError):
    """The output folder does not fit the request: another run in it, nothing to resume, or a changed config."""


_STEP = re.compile(rf"{CHECKPOINT_PREFIX}([0-9]+)")
# Name prefixes of the folders a save or a delete passes through.
_TEMPORARY, _REPLACED, _DELETED = ".tmp-", ".old-", ".del-"


def temporary_folder(final: Path) -> Path:
    return final.parent / f"{_TEMPORARY}{final.name}"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


def say(message: str) -> None:
    """A line for the person running the job (stderr; logging may not be configured)."""
    print(f"diffalign: {message}", file=sys.stderr, flush=True)  # noqa: T201


# ---------------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first.

    Temporary folders are ignored, but a replaced checkpoint (``.old-checkpoint-<step>``) stands in for
    ``checkpoint-<step>`` when a kill came between the two renames of :func:`commit_folder`.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir(), key=lambda p: p.name.startswith(_REPLACED)):  # real folders first
        step = checkpoint_step(path)
        if step is not None and (path / COMPLETE_MARKER).is_file():
            found.setdefault(step, path)
    return [found[step] for step in sorted(found)]


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder (also under its ``.old-`` name); None for other names."""
    match = _STEP.fullmatch(path.name.removeprefix(_REPLACED))
    return int(match[1]) if match else None


def resolve_checkpoint(resume: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``resume`` names: ``"latest"`` the newest complete one (an error when there is none),
    ``"auto"`` the newest one or ``None``, a path that folder; ``None`` for ``None``."""
    if resume is None:
        return None
    if str(resume) in ("latest", "auto"):
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            return checkpoints[-1]
        if str(resume) == "auto":
            return None
        raise RunFolderError(
            f"no checkpoint to resume from in {Path(output_dir) / 'checkpoints'}; check output_dir, or pass "
            "--resume auto (checkpoint.resume_from: auto) to resume when there is one and start fresh otherwise"
        )
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete diffalign checkpoint (no {COMPLETE_MARKER}); pass a folder "
            f"{CHECKPOINT_PREFIX}<step> from <output_dir>/checkpoints, 'latest' or 'auto'"
        )
    return path


# ---------------------------------------------------------------------------------------------------------------------
# RNG state as JSON
# ---------------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every generator this process draws from (Python, NumPy's legacy global, torch, CUDA), as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    keys = np.asarray(numpy["keys"], dtype=np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=_json_default), encoding="utf-8")


def write_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)


def commit_folder(tmp: Path, final: Path) -> None:
    """Make the complete folder ``tmp`` durable and rename it to ``final``, replacing an existing ``final`` so that
    a kill at any point leaves one of the two complete under the name ``final`` or a dotted leftover."""
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
        _fsync(path) if path.is_file() else _fsync_folder(path)
    _fsync_folder(tmp)
    old = final.parent / f"{_REPLACED}{final.name}"
    if final.exists():
        _delete(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_folder(final.parent)
    _delete(old)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: renamed away first, so a kill during the delete leaves no half folder that still
    looks complete."""
    doomed = path.parent / f"{_DELETED}{path.name}"
    _delete(doomed)
    os.replace(path, doomed)
    _fsync_folder(path.parent)
    _delete(doomed)


def _delete(folder: Path) -> None:
    """Delete a checkpoint folder, its "complete" marker first: a half-deleted folder never looks complete."""
    if not folder.exists():
        return
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    _fsync_folder(folder)
    try:
        shutil.rmtree(folder)
    except OSError as err:  # a leftover: the next save tries again
        logger.warning("could not delete %s: %s", folder, err)


def remove_leftovers(root: Path) -> None:
    """Tidy up after a killed save or delete: a replaced checkpoint whose successor never arrived gets its name
    back, and the other dotted folders are removed."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        final = root / path.name.removeprefix(_REPLACED)
        if path.name.startswith(_REPLACED) and not final.exists() and (path / COMPLETE_MARKER).is_file():
            os.replace(path, final)
    for path in root.iterdir():
        if path.name.startswith((_TEMPORARY, _REPLACED, _DELETED)):
            _delete(path)


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(path: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync elsewhere
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------

# What each file was called when checkpoints held pickles; found instead of the new name, it is refused by name.
_PICKLED_NAMES = {SCHEDULER_FILE: "lr_scheduler.pt", EMA_FILE: "ema.pt"}


def pickled_name(name: str) -> str | None:
    """The name the file ``name`` had when checkpoints held pickles (None for files that were never pickles)."""
    return _PICKLED_NAMES.get(name, name.replace(".json", ".pt") if name.startswith("rng-") else None)


def read_file(checkpoint: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """``reader(checkpoint / name)``; a missing or unreadable file raises :class:`CheckpointError` naming the
    checkpoint, the file and what to do."""
    path = checkpoint / name
    if not path.is_file():
        pickled = pickled_name(name)
        if pickled is not None and (checkpoint / pickled).is_file():
            raise CheckpointError(
                f"{checkpoint} holds {pickled} where this version reads {name}: it was written by an older "
                "diffalign as a pickle, and pickles can run code when loaded, so they are not read. Resume from a "
                "checkpoint written by this version, or start afresh (--overwrite)"
            )
        raise CheckpointError(
            f"{checkpoint} is missing {name}: the folder is incomplete or was edited. Resume from another checkpoint "
            f"in {checkpoint.parent} (pass its folder to --resume)"
        )
    try:
        return reader(path)
    except Exception as err:  # noqa: BLE001 - any failure of the reader means the same thing to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{checkpoint}: {name} cannot be read ({type(err).__name__}: {reason[:200]}); it is damaged or was not "
            f"written by diffalign, and nothing from it was run. Resume from another checkpoint in {checkpoint.parent}"
        ) from None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {})


def read_torch(path: Path, map_location: Any = None) -> Any:
    """A ``torch.save`` file of tensors and plain values; anything else is refused by torch without running it."""
    return torch.load(path, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------------------------------


def run_artifacts(output_dir: Path, config: Any) -> list[Path]:
    """What a run wrote into ``output_dir``, present now: its config, logs, checkpoints, LoRA, evaluation grids and
    tensorboard folder (``logging.project``, now or in the saved config, when it holds event files)."""
    found = [output_dir / name for name in RUN_ARTIFACTS if (output_dir / name).exists()]
    projects = [config.logging.project]
    with contextlib.suppress(Exception):  # the earlier run's project, when its config names another
        projects.append(yaml.safe_load((output_dir / CONFIG_FILE).read_text(encoding="utf-8"))["logging"]["project"])
    for project in dict.fromkeys(projects):
        folder = output_dir / str(project)
        if _PLAIN_NAME.fullmatch(str(project)) and folder.is_dir() and any(folder.rglob("events.out.tfevents*")):
            found.append(folder)
    return found


_PLAIN_NAME = re.compile(r"[\w][\w.\- ]*")  # one path component, not "." or ".."


def check_output_dir(config: Any, announce: bool = True) -> Path | None:
    """Apply the one-run-per-folder rules to ``config.output_dir`` before anything is written; returns the checkpoint
    to resume from (``None``: start fresh). Reads only; ``announce`` prints the accepted config differences.

    Raises:
        RunFolderError: a fresh start (or a start from another run's checkpoint) into a folder holding another run
            without ``checkpoint.overwrite``, ``resume_from: latest`` with no checkpoint, or a resume whose config
            changes the training (without ``checkpoint.allow_config_change``).
    """
    output_dir, options = Path(config.output_dir), config.checkpoint
    checkpoint = resolve_checkpoint(options.resume_from, output_dir)
    continues_this_run = checkpoint is not None and _same_folder(checkpoint.parent, output_dir / "checkpoints")
    if not continues_this_run and options.resume_from not in ("latest", "auto") and not options.overwrite:
        # A config.yaml (and text cache) alone is a run that stopped before logging or saving anything (a config
        # error, say); a fresh start replaces them.
        found = [path for path in run_artifacts(output_dir, config) if path.name not in (CONFIG_FILE, TEXT_CACHE_DIR)]
        if found:
            raise RunFolderError(
                f"{output_dir} already holds a run ({', '.join(p.name for p in found)}); pass --resume latest "
                "(checkpoint.resume_from: latest) to continue it, --overwrite (checkpoint.overwrite: true) to "
                "replace it, or choose another output_dir"
            )
    if checkpoint is not None:
        check_config_change(checkpoint, config, announce)
    return checkpoint


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def clear_output_dir(config: Any) -> None:
    """Delete what an earlier run wrote into ``config.output_dir`` (``checkpoint.overwrite``); other files stay."""
    found = run_artifacts(Path(config.output_dir), config)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if found:
        say(f"overwrite: removed the earlier run's {', '.join(p.name for p in found)} from {config.output_dir}")


def check_config_change(checkpoint: Path, config: Any, announce: bool = True) -> None:
    """Compare ``config`` with the config the checkpoint was saved under; print every difference, and refuse the
    ones that change the training trajectory unless ``checkpoint.allow_config_change``."""
    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.is_file():
        saved_file = checkpoint.parent.parent / CONFIG_FILE  # the run's, for a checkpoint without its own
        if not saved_file.is_file():
            return
    allowed = config.checkpoint.allow_config_change
    try:
        saved = _flatten(config_to_dict(load_config(type(config), saved_file)))
    except ConfigError as err:
        if not allowed:
            raise RunFolderError(
                f"{saved_file} is not a valid {type(config).__name__} for this version ({err}); the method or "
                "diffalign changed since the checkpoint. Pass --allow-config-change to resume anyway"
            ) from None
        return
    new = _flatten(config_to_dict(config))
    changes = sorted(key for key in saved.keys() | new.keys() if saved.get(key, _MISSING) != new.get(key, _MISSING))
    changes = [key for key in changes if not key.startswith("checkpoint.")]
    if not changes:
        return
    described = [f"{key}: {_show(saved.get(key, _MISSING))} -> {_show(new.get(key, _MISSING))}" for key in changes]
    trajectory = [key for key in changes if changes_training(key, config)]
    if trajectory and not allowed:
        raise RunFolderError(
            f"resuming from {checkpoint} with a config that changes the training ({', '.join(trajectory)}), so the "
            f"run would no longer follow one config; the differences: {'; '.join(described)}. Revert them, pass "
            "--allow-config-change (checkpoint.allow_config_change: true) to continue anyway, or start a new run in "
            "another output_dir"
        )
    if announce:
        say(f"config changes since {checkpoint.name}:\n" + "\n".join(f"  {line}" for line in described))


def changes_training(key: str, config: Any) -> bool:
    """Whether changing the dotted config ``key`` on resume changes what the run trains (not only how it is watched
    and kept): everything but :data:`BOOKKEEPING_KEYS` and the config class's ``resume_safe_keys``. ``max_steps``
    (and ``max_minutes`` with ``optim.lr_horizon: max_minutes``) set the length of a decaying schedule, so they count
    unless the learning rate is constant."""
    optim = config.optim
    if key in ("max_steps", "max_minutes"):
        horizon = key == "max_steps" or optim.lr_horizon == "max_minutes"
        return horizon and optim.lr_scheduler not in ("constant", "constant_with_warmup")
    safe = (*BOOKKEEPING_KEYS, *getattr(config, "resume_safe_keys", ()))
    return not any(key == prefix or key.startswith(f"{prefix}.") for prefix in safe)


_MISSING = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the ``metrics.jsonl`` records up to ``step`` (a resumed run logs the later steps again); a line a
    kill cut short is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")
