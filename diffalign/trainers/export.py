"""A checkpoint as something to sample with: its LoRA folder, or a diffusers pipeline folder for full fine-tuning.

``diffalign export CHECKPOINT --out DIR`` runs :func:`export_checkpoint`. It needs no GPU and no process group: the
shards of an FSDP checkpoint (one safetensors file per training process) are joined here, so a run trained on 8 GPUs
is exported on a laptop.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import Tensor

from diffalign.adapters import load_adapter
from diffalign.config import TrainerConfig, load_config
from diffalign.trainers import checkpoints as ckpt
from diffalign.trainers import get_trainer, sharding


def checkpoint_config(checkpoint: Path) -> TrainerConfig:
    """The config a checkpoint was saved with (its own ``config.yaml``)."""
    import yaml

    path = checkpoint / ckpt.CONFIG_FILE
    method = ckpt.read_file(checkpoint, ckpt.CONFIG_FILE, lambda p: yaml.safe_load(p.read_text()))["method"]
    config_class, _ = get_trainer(method)
    return load_config(config_class, path)


def checkpoint_weights(checkpoint: Path, ema: bool) -> dict[str, Tensor]:
    """The trained weights of ``checkpoint`` by parameter name, whole (joined from the shards of an FSDP
    checkpoint); the EMA weights when ``ema`` and the checkpoint has them."""
    if (checkpoint / sharding.SHARDED_DIR).is_dir():
        tensors = sharding.consolidate(checkpoint / sharding.SHARDED_DIR)
        prefix = "ema." if ema and any(name.startswith("ema.") for name in tensors) else "model."
        return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}
    name = ckpt.EMA_FILE if ema and (checkpoint / ckpt.EMA_FILE).is_file() else ckpt.TRAINABLE_FILE
    weights, _ = ckpt.read_file(checkpoint, name, ckpt.read_tensors)
    return weights


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return ckpt.resolve_checkpoint("latest", path)
    return ckpt.resolve_checkpoint(path, path.parent)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the trained weights of ``checkpoint`` (a checkpoint or a run folder) to ``out``: the LoRA in diffusers
    format, or the fully fine-tuned pipeline as a ``save_pretrained`` folder; the EMA weights when the run kept
    them, as the run's own export does. Returns ``out``."""
    checkpoint, out = resolve(checkpoint), Path(out)
    config = checkpoint_config(checkpoint)
    if config.model.lora.rank > 0:
        # Every checkpoint of a LoRA run carries its LoRA export (gathered from the shards when sharded).
        source = checkpoint / "lora"
        if not source.is_dir():
            raise ckpt.CheckpointError(f"{checkpoint} has no lora/ folder; the checkpoint is incomplete")
        shutil.copytree(source, out, dirs_exist_ok=True)
        return out
    model = config.model
    adapter = load_adapter(
        model.path, device="cpu", revision=model.revision, variant=model.variant, vae_path=model.vae_path
    )
    weights = checkpoint_weights(checkpoint, ema=config.ema.enabled)
    missing, unexpected = adapter.denoiser.load_state_dict(weights, strict=False)
    trained = {name for name, _ in adapter.denoiser.named_parameters()}
    if unexpected or trained & set(missing):
        raise ckpt.CheckpointError(
            f"{checkpoint} does not match {model.path} (unknown {unexpected[:3]}, missing "
            f"{sorted(trained & set(missing))[:3]}): export with the model the run trained"
        )
    adapter.pipe.save_pretrained(out)
    return out
