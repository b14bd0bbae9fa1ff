"""FSDP2 for the trainers: PyTorch's ``fully_shard`` through accelerate's FSDP plugin, and sharded checkpoints.

A run is sharded when it is launched with an FSDP accelerate config (``configs/accelerate/fsdp2.yaml``):
accelerate's ``prepare`` applies ``fully_shard`` to every block of the denoiser (the model's ``_no_split_modules``)
and to the root, and the trainable parameters become ``DTensor`` shards. What accelerate leaves to us:

- On a machine without GPUs accelerate runs several processes as plain multi-CPU data parallel and ignores the
  FSDP config. FSDP2 itself runs on CPU with the gloo backend, so :func:`enable_fsdp2` switches accelerate's state
  to FSDP there too: the same sharded code path runs in the CPU tests as on GPUs.
- Mixed precision: bf16 (or fp16) parameters for compute, fp32 gradient reduction (accelerate's default reduces in
  the compute dtype).
- Gradient clipping over a subset of the parameters (LoRA), which accelerate only does for a whole model.
- The frozen reference of full fine-tuning, sharded like the live model (:func:`sharded_copy`).
- Checkpoints: every process writes its own shards with ``torch.distributed.checkpoint`` in the safetensors layout
  (tensors and JSON headers only, nothing unpickled on load), and :func:`consolidate` joins them offline.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.config import ConfigError


logger = logging.getLogger(__name__)

SHARDED_DIR = "sharded"
"""The folder of a checkpoint that holds the shards (one safetensors file per process)."""


def fsdp_requested(accelerator: Any) -> bool:
    """Whether the launch asked for FSDP (an FSDP accelerate config, or an FSDP plugin given to the accelerator)."""
    from accelerate.utils import DistributedType

    return (
        accelerator.distributed_type == DistributedType.FSDP
        or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    )


def enable_fsdp2(accelerator: Any, mixed_precision: str) -> bool:
    """Set ``accelerator`` up for FSDP2 when the launch asked for FSDP; returns whether the run is sharded.

    Raises:
        ConfigError: FSDP version 1, or FSDP on a single process.
    """
    if not fsdp_requested(accelerator):
        return False
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    version = plugin.fsdp_version if plugin is not None else int(os.environ.get("FSDP_VERSION", "1"))
    if version != 2:
        raise ConfigError(
            f"the accelerate config asks for FSDP version {version}; diffalign shards with FSDP2 only: set "
            "'fsdp_version: 2' in its fsdp_config (see configs/accelerate/fsdp2.yaml)"
        )
    if accelerator.num_processes == 1:
        raise ConfigError(
            "an FSDP accelerate config on one process shards nothing: launch several processes "
            "(accelerate launch --num_processes N ...) or run without the FSDP config"
        )
    if plugin is None:
        # Multi-CPU launch: accelerate left FSDP off; FSDP2 runs on CPU with gloo, so turn it on (see the module doc).
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set from the config
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return True


def broadcast_from_main(tensors: Iterable[Tensor]) -> None:
    """Give every process the main process's values of ``tensors`` (in place; collective)."""
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def check_sharded_options(config: Any) -> None:
    """Refuse the options that do not work on sharded parameters, naming each key."""
    optim = config.optim
    if optim.optimizer == "adafactor":
        # Adafactor's factored moments are row/column means of the whole matrix; a shard would get its own.
        raise ConfigError("factors whole matrices, which FSDP splits over processes: use adamw", key="optim.optimizer")
    if optim.use_8bit_adam:
        raise ConfigError("bitsandbytes' 8-bit Adam does not take FSDP's DTensor shards", key="optim.use_8bit_adam")


def local(tensor: Tensor) -> Tensor:
    """The shard this process holds (the tensor itself when it is not a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor on the CPU, gathered from every process's shard (collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return whole.detach().cpu().contiguous()


def full_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`full` of every tensor, in order (collective)."""
    return {name: full(tensor) for name, tensor in tensors.items()}


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of sharded ``params`` to a total 2-norm of ``max_norm``; returns the norm before clipping.

    The norm is over the whole (unsharded) gradients: each process's shard norms are summed over processes by the
    ``DTensor`` reduction, so every process scales by the same factor.
    """
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    total = get_total_norm([p.grad for p in with_grad], 2.0)
    total = total.full_tensor() if hasattr(total, "full_tensor") else total
    if max_norm != float("inf"):
        clip_grads_with_norm_(with_grad, max_norm, total)
    return float(total)


def sharded_copy(accelerator: Any, live: nn.Module) -> nn.Module:
    """A frozen copy of the sharded ``live`` denoiser, sharded the same way (each process holds its shard only).

    The copy is built empty on the meta device from the model's config, sharded with the plugin's policy, then
    given storage and the live shards; a deep copy of a sharded module is not supported by FSDP2.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    with torch.device("meta"):
        copy = type(live).from_config(live.config)
    copy.requires_grad_(False)
    copy = fsdp2_prepare_model(accelerator, copy)
    copy.to_empty(device=accelerator.device)
    sources = dict(live.named_parameters()) | dict(live.named_buffers())
    with torch.no_grad():
        for name, tensor in [*copy.named_parameters(), *copy.named_buffers()]:
            local(tensor).copy_(local(sources[name]))
    return copy.eval()


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state flattened to ``{"state.<param>.<key>": tensor, "param_groups.<param>.<key>": value}``
    (torch's distributed form; states are created, with a zero-learning-rate step, when none exist yet)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def save_shards(folder: Path, tensors: Mapping[str, Tensor]) -> None:
    """Every process writes its shards of ``tensors`` under ``folder`` (collective; the folder must not exist on
    any process yet, or be empty). Replicated tensors are written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(dict(tensors), storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def load_shards(folder: Path, tensors: dict[str, Tensor]) -> None:
    """Fill ``tensors`` (this process's shards, keyed as saved) in place from the shards under ``folder``
    (collective). Only safetensors files are read: tensors and their JSON headers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with torch.no_grad():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def consolidate(folder: Path) -> dict[str, Tensor]:
    """The whole tensors of a sharded checkpoint folder, joined on this process (no process group needed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    files = shard_files(folder)
    if not files:
        raise FileNotFoundError(f"no shard files (*.safetensors) in {folder}")
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    with tempfile.TemporaryDirectory() as out:
        consolidate_safetensors_files(str(folder), out, dict.fromkeys(sorted(names), 1))
        merged: dict[str, Tensor] = {}
        for path in sorted(Path(out).glob("*.safetensors")):
            merged.update(load_file(str(path)))
    return merged
