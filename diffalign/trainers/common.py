"""The runtime every trainer shares: accelerator, parameters, optimizer, EMA, checkpoints, logging, evaluation,
and the one step loop.

A trainer writes what one of its steps does (an optimizer step for DPO and reward backprop, an epoch of sampling
and updates for Flow-GRPO) and hands everything else to a :class:`TrainingRun`::

    run = TrainingRun(config)          # loads the model, adds LoRA, builds optimizer/schedule/EMA

    def train_step(step):              # 0-based
        with run.accumulate():
            loss = ...
            run.backward(loss)         # NaN/inf stops the run with a clear message
        return {**metrics, **run.optimizer_step()}  # clip, step, zero grad, EMA

    run.run_steps(train_step, trainer_state, evaluator, desc="my_method", postfix=("loss",))

:meth:`TrainingRun.run_steps` resumes (``checkpoint.resume_from``), evaluates at step 0, then runs the steps to
``max_steps`` or until ``max_minutes`` are spent, advancing the lr schedule, logging every ``logging.log_every``
steps, saving (atomic, keeps the last N, exports the LoRA) and evaluating on schedule, and ends with
:meth:`TrainingRun.finish`.

Checkpoints are folders ``<output_dir>/checkpoints/checkpoint-<step>/`` of tensors and JSON only, written so that
a kill at any point leaves a loadable ``latest`` (:mod:`diffalign.trainers.checkpoints` lists the files). No
checkpoint with non-finite weights is ever written, and a step whose gradients or updated weights are not finite
stops the run (:class:`TrainingDivergedError`, naming the last good checkpoint). One output folder holds one run:
a fresh start into a folder holding another run is refused unless ``checkpoint.overwrite``, and a resume whose
config changes the training is refused unless ``checkpoint.allow_config_change``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.adapters import DiffusionAdapter, load_adapter, load_pipeline
from diffalign.config import ConfigError, TrainerConfig, save_config
from diffalign.samplers.rollout import text_use
from diffalign.trainers import checkpoints as ckpt
from diffalign.trainers import sharding
from diffalign.trainers.checkpoints import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    RunFolderError,
    list_checkpoints,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from diffalign.trainers.early_stopping import EarlyStopping


__all__ = [
    "CHECKPOINT_PREFIX",
    "EMA",
    "CheckpointError",
    "RunFolderError",
    "TrainingDivergedError",
    "TrainingRun",
    "list_checkpoints",
    "mean_metrics",
    "resolve_checkpoint",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)


MAX_OVERFLOW_STREAK = 20
"""fp16 loss-scale overflows in a row after which the run counts as diverged (each one halves the scale)."""


class TrainingDivergedError(RuntimeError):
    """The loss, the gradients or the trained weights became NaN/inf."""


# ---------------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copies).

    Updates happen every ``update_every`` optimizer steps, with the decay warming up as
    ``min(decay, (1 + n) / (10 + n))`` where ``n`` counts the optimizer steps before this one, as Flow-GRPO's
    ``EMAModuleWrapper`` counts them (with ``update_every = 1`` this is diffusers' ``EMAModel``, which counts
    updates; with Flow-GRPO's 8 the first update already uses ``min(0.9, 8 / 17)``, not ``1 / 10``).
    """

    def __init__(self, params: list[nn.Parameter], decay: float, update_every: int = 1) -> None:
        self.params = params
        self.decay = decay
        self.update_every = update_every
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def step(self, optimizer_step: int) -> None:
        if optimizer_step % self.update_every:
            return
        steps_before = optimizer_step - 1
        decay = min(self.decay, (1 + steps_before) / (10 + steps_before))
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Use the EMA weights inside the block (evaluation, export); the live weights come back after."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, backup):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": [s.cpu() for s in self.shadow], "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shadow = [s.to(p.device).float() for s, p in zip(state["shadow"], self.params)]
        self.num_updates = int(state["num_updates"])


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def check_text_cache(offload_text_encoders: str, precomputed: bool) -> None:
    """``model.offload_text_encoders`` needs every prompt cached first (``sampling.precompute_text_embeddings``)."""
    if offload_text_encoders != "keep" and not precomputed:
        raise ConfigError(
            f"offload_text_encoders: {offload_text_encoders} needs every prompt's text embeddings cached first "
            "(sampling.precompute_text_embeddings: true)",
            key=("model.offload_text_encoders", "sampling.precompute_text_embeddings"),
        )


class TrainingRun:
    """Everything a trainer needs besides its own loop; see the module docstring for the life cycle.

    Args:
        config: the trainer's config (any :class:`~diffalign.config.TrainerConfig`).
        adapter: an already built adapter (tests, the Python API); by default ``config.model.path`` is loaded.
        adapter_kwargs: family options for :func:`~diffalign.adapters.load_adapter` (e.g. ``height``).

    Gradient accumulation is explicit: the trainer scales each micro-batch loss, wraps all but the last backward
    of an optimizer step in ``run.accumulate(sync=False)`` (no cross-process gradient sync) and then calls
    :meth:`optimizer_step`. The accelerator itself runs with one accumulation step, so an optimizer step happens
    exactly when the trainer asks for it, whatever the number of trained timesteps per sample.
    """

    def __init__(
        self,
        config: TrainerConfig,
        adapter: DiffusionAdapter | None = None,
        adapter_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.config = config
        self.output_dir = Path(config.output_dir)
        log_with = None if config.logging.log_with == "none" else config.logging.log_with
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir)),
        )
        set_seed(config.seed, device_specific=True)
        # FSDP2 when the launch asks for it (configs/accelerate/fsdp2.yaml); see diffalign.trainers.sharding.
        self.sharded = sharding.enable_fsdp2(self.accelerator, config.mixed_precision)
        if self.sharded:
            sharding.check_sharded_options(config)
        # The main process decides (so that no filesystem cache can make processes disagree) and tells the others.
        checked: list[Path | None] = [None]
        self._together(lambda: checked.__setitem__(0, ckpt.check_output_dir(config)))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(checked, from_process=0)
        self.resume_checkpoint = checked[0]
        self._together(self._prepare_output_dir)

        use_lora = config.model.lora.rank > 0
        # LoRA: the frozen base runs in the mixed-precision dtype, the LoRA weights in fp32. Full fine-tuning
        # keeps fp32 master weights and relies on autocast.
        dtype = _weight_dtype(config.mixed_precision) if use_lora else torch.float32
        model = config.model
        self.adapter = adapter or load_adapter(
            model.path,
            device=self.accelerator.device,
            dtype=dtype,
            revision=model.revision,
            variant=model.variant,
            vae_path=model.vae_path,
            **dict(adapter_kwargs or {}),
        )
        self._apply_model_options(model)
        if config.gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing()
        self.params = self._trainable_parameters()
        self._reference_denoiser: nn.Module | None = None

        if self.sharded:
            # Each process seeds its own stream, so a fresh LoRA differs per process; DDP broadcasts rank 0's
            # weights when it wraps the model, FSDP2 does not: do it here, before the weights are split.
            sharding.broadcast_from_main(self.params)
        self.optimizer = self._build_optimizer()
        self.lr_scheduler = self._build_lr_scheduler()
        wrapped, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.adapter.denoiser, self.optimizer, self.lr_scheduler
        )
        if wrapped is not self.adapter.denoiser:
            self.adapter.wrap_denoiser(wrapped)
        # FSDP2 replaces the parameters with DTensor shards: train (and average) the ones the optimizer now holds.
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema = EMA(self.params, config.ema.decay, config.ema.update_every) if config.ema.enabled else None
        self.early_stopping = self._build_early_stopping(config)
        self._best_weights: dict[str, Tensor] | None = None  # the trained weights of the best evaluation (CPU)
        self.state_tensors: dict[str, tuple[Callable[[], dict[str, Tensor]], Callable[[dict[str, Tensor]], None]]]
        self.state_tensors = {}
        """A trainer's own tensors that resuming needs (Self-NPO's EMA teacher): ``{name: (get, set)}``; every
        checkpoint writes ``get()`` to ``<name>.safetensors`` and resuming hands the file back to ``set``."""
        self.optimizer_steps = 0
        self.schedule_steps = 0  # trainer steps the lr schedule has advanced (advance_schedule)
        self.overflow_streak = 0  # fp16 loss-scale overflows in a row (optimizer_step)
        self.last_saved_step: int | None = None
        self._pending_divergence: str | None = None  # a non-finite loss seen by backward (several processes)
        if log_with is not None:
            run_config = {"method": getattr(config, "method", "train"), "seed": config.seed}
            # wandb names the run; tensorboard's run is the folder <output_dir>/<project>.
            name = config.logging.run_name or self.output_dir.name
            self.accelerator.init_trackers(
                config.logging.project, config=run_config, init_kwargs={"wandb": {"name": name}}
            )
        self._metrics_file = self.output_dir / ckpt.METRICS_FILE
        self._deadline: float | None = None

    # --- setup ------------------------------------------------------------------------------------------------------

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def use_lora(self) -> bool:
        return self.config.model.lora.rank > 0

    def _prepare_output_dir(self) -> None:
        """Clear an earlier run (``checkpoint.overwrite``), create the folder and write the run's config.yaml."""
        if self.config.checkpoint.overwrite:
            ckpt.clear_output_dir(self.config)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self._run_config(), self.output_dir / ckpt.CONFIG_FILE)

    def _run_config(self) -> TrainerConfig:
        """The config as the run keeps it: ``overwrite`` and ``allow_config_change`` describe one launch, not the
        run, so a saved config resumed later neither deletes the run nor accepts changes on its own."""
        flags = dataclasses.replace(self.config.checkpoint, overwrite=False, allow_config_change=False)
        return dataclasses.replace(self.config, checkpoint=flags)

    def _trainable_parameters(self) -> list[nn.Parameter]:
        lora = self.config.model.lora
        if lora.rank > 0:
            return self.adapter.add_lora(
                lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, init=lora.init, dropout=lora.dropout
            )
        denoiser = self.adapter.denoiser
        denoiser.requires_grad_(True)
        return [p for p in denoiser.parameters() if p.requires_grad]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optim = self.config.optim
        if optim.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            # A fixed learning rate (the schedule drives it), as DiffusionDPO's SDXL script configures it.
            return Adafactor(
                self.params,
                lr=optim.lr,
                weight_decay=optim.weight_decay,
                clip_threshold=1.0,
                scale_parameter=False,
                relative_step=False,
                warmup_init=False,
            )
        kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
        if optim.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
            return bnb.optim.AdamW8bit(self.params, **kwargs)
        return torch.optim.AdamW(self.params, **kwargs)

    def _build_lr_scheduler(self):
        from diffusers.optimization import get_scheduler

        optim = self.config.optim
        return get_scheduler(
            optim.lr_scheduler,
            optimizer=self.optimizer,
            # The prepared scheduler steps once per process per call (accelerate's convention).
            num_warmup_steps=optim.warmup_steps * self.accelerator.num_processes,
            num_training_steps=max(self.config.max_steps, 1) * self.accelerator.num_processes,
        )

    # --- reference model --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the reference policy inside the block: LoRA disabled, or a frozen copy of the initial weights.

        For full fine-tuning the copy is made on first use (before any optimizer step, call it once early);
        it lives on the training device.
        """
        if self.use_lora:
            with self.adapter.lora_disabled():
                yield
            return
        if self._reference_denoiser is None:
            raise RuntimeError("call run.snapshot_reference() before training when fine-tuning without LoRA")
        pipe, name = self.adapter.pipe, self.adapter.denoiser_name
        live, wrapper = getattr(pipe, name), self.adapter._denoiser_wrapper
        setattr(pipe, name, self._reference_denoiser)
        self.adapter.wrap_denoiser(None)
        try:
            yield
        finally:
            setattr(pipe, name, live)
            self.adapter.wrap_denoiser(wrapper)

    def snapshot_reference(self) -> None:
        """Keep a frozen copy of the current denoiser as the reference (full fine-tuning only)."""
        if self.use_lora or self._reference_denoiser is not None:
            return
        if self.sharded:
            self._reference_denoiser = sharding.sharded_copy(self.accelerator, self.adapter.denoiser)
        else:
            self._reference_denoiser = copy.deepcopy(self.adapter.denoiser).requires_grad_(False).eval()

    def reduce_metrics(self, metrics: Mapping[str, float], sums: Sequence[str] = ()) -> dict[str, float]:
        """Metrics of every process as one: the mean over processes, or the sum for the counters named in ``sums``.
        Every process must pass the same keys (a collective call)."""
        if self.accelerator.num_processes == 1:
            return dict(metrics)
        keys = sorted(metrics)
        from accelerate.utils import gather_object

        key_lists = gather_object([keys])
        if any(other != keys for other in key_lists):
            # Reducing different keys would pair values with the wrong names (or hang): a trainer bug, said plainly.
            raise RuntimeError(f"processes logged different metrics: {[sorted(k) for k in key_lists]}")
        values = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64, device=self.device)
        totals = self.accelerator.reduce(values, reduction="sum").tolist()
        count = self.accelerator.num_processes
        return {key: total if key in sums else total / count for key, total in zip(keys, totals)}

    def _apply_model_options(self, model: Any) -> None:
        """The ``model`` group's settings that act on the built adapter (attention kernel, T5 length, fixed shift,
        ``torch.compile``)."""
        adapter, family = self.adapter, type(self.adapter).__name__
        adapter.set_attention_backend(model.attention)
        # Compiles on the first denoiser call, after the LoRA and accelerate's wrapper are in place.
        adapter.compile_denoiser(model.compile)
        if model.max_sequence_length is not None:
            if not hasattr(adapter, "max_sequence_length"):
                raise ConfigError(f"is T5's prompt length; {family} has no T5", key="model.max_sequence_length")
            adapter.max_sequence_length = model.max_sequence_length
        if model.timestep_shift is not None:
            if adapter.prediction_type != "flow":
                raise ConfigError(f"shifts a flow schedule; {family} is not a flow model", key="model.timestep_shift")
            adapter.timestep_shift = model.timestep_shift

    def cache_text_embeddings(
        self, prompts: Sequence[str], sampling: Any, evaluator: Any | None, shared: bool = True
    ) -> int:
        """Encode every training prompt (as rollouts with ``sampling``'s guidance and negative prompt ask for them)
        and every prompt of ``evaluator`` once into the adapter's text-embedding cache, then release the text
        encoders as ``model.offload_text_encoders`` says. Returns how many encodings were made.

        ``shared``: every process passes the same prompts (GRPO, reward backprop); each then encodes a share of
        them and the shares are gathered, so that N processes encode each prompt once in all. Otherwise (DPO's
        captions, each process its own) every process encodes what it passed.

        The cache is written to ``<output_dir>/text_cache/rank<process>.safetensors``, keyed by prompt and by the
        model, revision, variant, dtype and text settings it was encoded with, and read back when the run resumes
        with the same ones: a resumed run encodes nothing again."""
        from diffalign.adapters.text_cache import TextEmbeddingCache

        adapter = self.adapter
        if adapter.text_cache is None:
            adapter.text_cache = TextEmbeddingCache()
        path = self.output_dir / ckpt.TEXT_CACHE_DIR / f"rank{self.accelerator.process_index}.safetensors"
        if self.resume_checkpoint is not None and (loaded := adapter.text_cache.load(path, self._text_identity())):
            logger.info("read %d text embeddings from %s", loaded, path)
        uses = [text_use(prompts, sampling.guidance_scale, sampling.negative_prompt)]
        uses += evaluator.text_uses() if evaluator is not None else []
        encoded = sum(self._encode_share(*use) if shared else adapter.precompute_text_embeddings(*use) for use in uses)
        if encoded:
            adapter.text_cache.save(path, self._text_identity())
        mode = self.config.model.offload_text_encoders
        if mode != "keep":
            released = adapter.release_text_encoders(mode)
            logger.info("text embeddings cached (%d); text encoders %s: %s", encoded, mode, ", ".join(released))
        return encoded

    def _encode_share(self, prompts: Sequence[str], negative_prompt: str | None, with_negative: bool) -> int:
        """Encode this process's share of the uncached ``prompts`` (the same list on every process), then take the
        other shares from the other processes (collective). Returns how many this process encoded."""
        cache, rank, world = self.adapter.text_cache, self.accelerator.process_index, self.accelerator.num_processes
        missing = cache.missing(list(prompts), negative_prompt, with_negative)
        if world == 1:
            return self.adapter.precompute_text_embeddings(missing, negative_prompt, with_negative)
        from accelerate.utils import gather_object

        mine = missing[rank::world]
        encoded = self.adapter.precompute_text_embeddings(mine, negative_prompt, with_negative) if mine else 0
        shares = gather_object([(cache.entries(mine, negative_prompt, with_negative), self.adapter._text_signature())])
        for entries, signature in shares:
            cache.update(entries, signature)
        return encoded

    def _text_identity(self) -> dict[str, str]:
        """What a cached conditioning depends on besides its prompt and the adapter's text settings (which the cache
        keeps as its signature): the text encoders' source, the family and the dtype."""
        model = self.config.model
        values = (model.path, model.revision, model.variant, model.max_sequence_length)
        names = ("model", "revision", "variant", "max_sequence_length")
        return {**dict(zip(names, map(str, values))), "family": self.adapter.family, "dtype": str(self.adapter.dtype)}

    def offload_frozen(self) -> list[str]:
        """Keep the frozen text encoders, the VAE and the reference copy (full fine-tuning; take it first with
        :meth:`snapshot_reference`) in CPU memory; accelerate's ``cpu_offload`` hooks move each module's weights to
        the training device for its forward only. Saves their GPU memory at the cost of host-to-device copies, as
        DiffusionDPO's SDXL script does. Returns the names of the offloaded modules."""
        from accelerate import cpu_offload

        pipe, device = self.adapter.pipe, self.accelerator.device
        frozen = ["vae", *self.adapter.text_encoder_names]
        names = [name for name in frozen if isinstance(getattr(pipe, name, None), nn.Module)]
        for name in names:
            cpu_offload(getattr(pipe, name), execution_device=device)
        if self._reference_denoiser is not None and not self.sharded:  # a sharded reference is spread already
            cpu_offload(self._reference_denoiser, execution_device=device)
            names.append("reference")
        return names

    # --- optimisation -----------------------------------------------------------------------------------------------

    def accumulate(self, sync: bool = True):
        """Context for one backward: ``sync=False`` skips the cross-process gradient all-reduce (not the last
        micro-batch of an optimizer step)."""
        if sync or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.adapter._denoiser_wrapper or self.adapter.denoiser)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: Tensor, step: int | None = None) -> None:
        """Backward with a finiteness check (stops the run; the last good checkpoint stays the newest).

        ``step`` is the 0-based index of the trainer step, for the message. With several processes the error waits
        for :meth:`optimizer_step`: the backward spreads the NaN to every process's gradients, so all of them stop
        there together instead of one stopping while the others wait in the gradient all-reduce.
        """
        if not torch.isfinite(loss.detach()).all():
            message = self._divergence_message("loss", loss.detach(), _number(step))
            if self.accelerator.num_processes == 1:
                raise TrainingDivergedError(message)
            self._pending_divergence = self._pending_divergence or message
        self.accelerator.backward(loss)

    def _check_finite(self, tensors: Sequence[Tensor], what: str, number: int | None) -> None:
        """Stop the run when any of ``tensors`` holds NaN/inf (on any process); ``number``: the 1-based step."""
        tensors = [sharding.local(t.detach()) for t in tensors]
        finite = torch.stack([t.isfinite().all() for t in tensors]) if tensors else torch.ones(1, dtype=bool)
        if self._max_over_processes(float(not finite.all())) > 0:  # one host sync
            bad = next((t for t, ok in zip(tensors, finite.tolist()) if not ok), None)
            value = bad[~bad.isfinite()].detach().float().cpu() if bad is not None else torch.tensor(math.nan)
            raise TrainingDivergedError(self._divergence_message(what, value, number))

    def _divergence_message(self, what: str, value: Tensor, number: int | None) -> str:
        """``number`` counts steps from 1, like the checkpoints and the metrics log."""
        checkpoints = list_checkpoints(self.output_dir)
        last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved yet"
        at = f" in step {number}" if number is not None else ""
        return (
            f"{what} became {value.flatten()[0].item()}{at}; stopping ({last}). Try a lower optim.lr, "
            "optim.max_grad_norm, or mixed_precision: bf16 instead of fp16."
        )

    def optimizer_step(self, step: int | None = None) -> dict[str, float]:
        """Clip, step and zero the gradients; update the EMA. Returns ``grad_norm`` (before clipping) and the ``lr``
        just applied.

        Gradients whose norm is not finite stop the run before the update (with or without clipping), and so do
        updated weights that are not finite (a huge learning rate): the run ends with :class:`TrainingDivergedError`
        and no checkpoint holds the bad step.

        The learning-rate schedule is not advanced here but by :meth:`advance_schedule`, once per trainer step:
        a Flow-GRPO epoch takes a varying number of optimizer steps, and its schedule must still end at
        ``max_steps``.
        """
        metrics: dict[str, float] = {"lr": self.lr_scheduler.get_last_lr()[0]}
        max_norm = self.config.optim.max_grad_norm
        # With an infinite bound the gradients are only measured (scaled by exactly 1).
        norm = self._clip_gradients(math.inf if max_norm is None else max_norm)
        if not math.isfinite(norm):
            if self._pending_divergence is not None:  # a NaN loss on some process (see backward)
                raise TrainingDivergedError(self._pending_divergence)
            if self._skip_overflow():
                return {**metrics, "grad_norm": norm, "overflow_skipped": 1.0}
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(self._divergence_message("gradient norm", torch.tensor(norm), _number(step)))
        self.overflow_streak = 0
        metrics["grad_norm"] = norm
        self.optimizer.step()
        self._check_finite(self.params, "trained weights", _number(step))
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.step(self.optimizer_steps)
        return metrics

    def _clip_gradients(self, max_norm: float) -> float:
        if self.sharded:  # accelerate clips a whole sharded model only, not a LoRA's parameters
            return sharding.clip_grad_norm(self.params, max_norm)
        return float(self.accelerator.clip_grad_norm_(self.params, max_norm))

    def _skip_overflow(self) -> bool:
        """fp16 loss scaling: an inf/NaN gradient is how the scale finds its level. The grad scaler skips the update
        and lowers the scale (inside ``optimizer.step``); only :data:`MAX_OVERFLOW_STREAK` overflows in a row mean
        the run diverged. Returns whether the step was skipped (False without a grad scaler, or past the streak)."""
        if getattr(self.accelerator, "scaler", None) is None or self.overflow_streak >= MAX_OVERFLOW_STREAK:
            return False
        self.optimizer.step()  # the scaler sees the inf, skips the update and lowers its scale
        self.optimizer.zero_grad(set_to_none=True)
        self.overflow_streak += 1
        logger.warning("fp16 gradient overflow: update skipped, scale lowered (%d in a row)", self.overflow_streak)
        return True

    def advance_schedule(self, done: int) -> None:
        """Move the learning-rate schedule to ``done`` finished trainer steps (``max_steps`` and ``warmup_steps`` count
        these), or with ``optim.lr_horizon = max_minutes`` to the budget's spent fraction times ``max_steps`` when
        that is further. The schedule only moves forward."""
        target = done
        if self.config.optim.lr_horizon == "max_minutes" and self._deadline is not None:
            budget = 60 * self.config.max_minutes
            spent = 1 - (self._deadline - time.monotonic()) / budget
            target = max(target, math.ceil(self._max_over_processes(spent) * self.config.max_steps))
        with warnings.catch_warnings():
            # A trainer step may make no update (a GRPO epoch whose groups all tie): it still counts, so torch's
            # "lr_scheduler.step() before optimizer.step()" warning does not apply.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            while self.schedule_steps < min(target, self.config.max_steps):
                self.lr_scheduler.step()
                self.schedule_steps += 1

    # --- wall-clock budget ------------------------------------------------------------------------------------------

    def start_clock(self) -> None:
        """Start the ``max_minutes`` budget now (a trainer calls it when its loop starts; no-op without a budget)."""
        minutes = self.config.max_minutes
        self._deadline = time.monotonic() + 60 * minutes if minutes else None

    def out_of_time(self) -> bool:
        """Whether the budget started by :meth:`start_clock` is spent; the same answer on every process (the max
        over processes), so that all of them stop after the same step. False when there is no budget."""
        if self._deadline is None:
            return False
        return self._max_over_processes(float(time.monotonic() > self._deadline)) > 0

    def _max_over_processes(self, value: float) -> float:
        """``value``'s maximum over processes: clock readings differ, decisions drawn from them must not."""
        if self.accelerator.num_processes == 1:
            return value
        return self.accelerator.reduce(torch.tensor([value], device=self.device), reduction="max").item()

    def _build_early_stopping(self, config: TrainerConfig) -> EarlyStopping | None:
        """``eval.early_stopping_patience``'s bookkeeping, or None; refused where the best weights cannot be kept."""
        patience = config.eval.early_stopping_patience
        if patience == 0:
            return None
        if self.sharded:
            raise ConfigError(
                "keeping the best evaluation's weights is not supported with FSDP sharding yet; use DDP or patience 0",
                key="eval.early_stopping_patience",
            )
        if config.ema.enabled:
            raise ConfigError(
                "early stopping with an EMA is not supported yet (the evaluation scores the EMA weights, the run "
                "would have to keep both); disable one",
                key="eval.early_stopping_patience",
            )
        return EarlyStopping(patience, config.eval.min_delta)

    # --- the step loop ----------------------------------------------------------------------------------------------

    def run_steps(
        self,
        train_step: Callable[[int], dict[str, float]],
        trainer_state: Callable[[], Mapping[str, Any]],
        evaluate: Callable[[int], Mapping[str, float]] | None,
        *,
        desc: str,
        postfix: tuple[str, ...],
        log_mean: bool = False,
        resumed: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """Drive a step-based trainer: resume, evaluate at step 0, then ``train_step(step)`` for every optimizer step
        to ``max_steps`` or until ``max_minutes`` are spent (the step running then completes and is saved), with
        logging, checkpoints, periodic evaluation and the final save.

        Args:
            train_step: one optimizer step, ``step`` 0-based; returns its metrics. The learning-rate schedule
                advances after it.
            trainer_state: what resuming needs beyond the runtime's state (stored in every checkpoint).
            evaluate: periodic evaluation (``eval.every``), or None.
            desc: the progress bar's label.
            postfix: metric names shown on the progress bar.
            log_mean: log the mean of each metric over the steps since the last log (``data/*`` counters: the
                latest value) instead of the logging step's own metrics.
            resumed: what :meth:`resume` returned, when the trainer needed it before its loop (resumed here if None).

        Returns:
            The metrics of the last step.
        """
        from tqdm.auto import tqdm

        start = int((resumed if resumed is not None else self.resume())["step"])
        if start == 0:
            self.maybe_evaluate(0, evaluate)
        max_steps, log_every = self.config.max_steps, self.config.log_every
        # With a wall-clock budget the bar counts its seconds (the step count is what the budget allows).
        budget = self.config.max_minutes
        progress = tqdm(
            initial=0 if budget else start,
            total=round(60 * budget) if budget else max_steps,
            unit="s" if budget else "step",
            desc=desc,
            disable=not self.is_main_process,
        )
        metrics: dict[str, float] = {}
        window: list[dict[str, float]] = []
        last = max_steps
        self.start_clock()
        started = time.monotonic()
        for step in range(start, max_steps):
            metrics = train_step(step)
            self.advance_schedule(step + 1)
            window.append(metrics)
            done = step + 1
            stop = self.out_of_time()  # max_minutes spent: this step is the last one
            if done % log_every == 0 or done == max_steps or stop:
                self.log(done, mean_metrics(window) if log_mean else metrics)
                window = []
            progress.update(min(round(time.monotonic() - started), progress.total) - progress.n if budget else 1)
            progress.set_postfix({"step": done, **{key: f"{metrics[key]:.4g}" for key in postfix if key in metrics}})
            # Evaluate first: a checkpoint of this step then holds what the evaluation decided (early stopping).
            self.maybe_evaluate(done, evaluate)
            self.maybe_save(done, trainer_state())
            if self.early_stopping is not None and self.early_stopping.should_stop:
                stop = True
                if self.is_main_process:
                    ckpt.say(
                        f"early stopping at step {done}: {self.config.eval.metric} has not improved for "
                        f"{self.early_stopping.patience} evaluations (best at step {self.early_stopping.best_step})"
                    )
            if stop:
                last = done
                break
        progress.close()
        self._restore_best_weights(last)
        self.finish(trainer_state(), last)
        return metrics

    # --- logging ----------------------------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, float | Tensor]) -> None:
        """Log scalars to the trackers (tensorboard by default) and to ``metrics.jsonl``."""
        values = {k: float(v.item() if isinstance(v, Tensor) else v) for k, v in metrics.items()}
        if self.config.logging.log_with != "none":
            self.accelerator.log(values, step=step)
        if self.is_main_process:
            with self._metrics_file.open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def trainable_names(self) -> list[str]:
        """The trained parameters' names in the denoiser, in ``self.params`` order."""
        names = {id(p): n for n, p in self.adapter.denoiser.named_parameters()}
        return [names[id(p)] for p in self.params]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained weights by name, whole and on the CPU (collective when sharded: every process calls it)."""
        return {name: sharding.full(p) for name, p in zip(self.trainable_names(), self.params)}

    def maybe_save(self, step: int, trainer_state: Mapping[str, Any]) -> Path | None:
        """Save when ``step`` (1-based count of completed steps) hits ``checkpoint.every``."""
        every = self.config.checkpoint.every
        if every > 0 and step % every == 0:
            return self.save(step, trainer_state)
        return None

    def save(self, step: int, trainer_state: Mapping[str, Any]) -> Path:
        """Write a complete checkpoint atomically and prune to ``checkpoint.keep_last``.

        Raises:
            TrainingDivergedError: the trained or EMA weights hold NaN/inf (nothing is written).
        """
        self._check_finite(self.params, "trained weights", step)
        if self.ema is not None:
            self._check_finite(self.ema.shadow, "EMA weights", step)
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{step}"
        tmp = ckpt.temporary_folder(final)
        self.accelerator.wait_for_everyone()

        def start() -> None:
            ckpt.remove_leftovers(root)
            tmp.mkdir(parents=True)

        def complete() -> None:
            state = {
                "step": step,
                "optimizer_steps": self.optimizer_steps,
                "schedule_steps": self.schedule_steps,
                "num_processes": self.accelerator.num_processes,
            }
            if self.sharded and self.ema is not None:
                state["ema_updates"] = self.ema.num_updates
            if self.early_stopping is not None:
                state["early_stopping"] = self.early_stopping.state_dict()
            ckpt.write_json(tmp / ckpt.COMPLETE_MARKER, {**state, **trainer_state})  # last: the "complete" marker
            ckpt.commit_folder(tmp, final)
            self._prune()
            logger.info("saved checkpoint %s", final)

        self._together(start)
        lora = self._lora_weights() if self.use_lora else None  # gathered from the shards on every process
        if self.sharded:
            sharding.save_shards(tmp / sharding.SHARDED_DIR, self._sharded_state())
        self._together(lambda: self._write_main_files(tmp, lora))
        self._together(lambda: ckpt.write_json(tmp / ckpt.rng_file(self.accelerator.process_index), rng_state()), True)
        self._together(complete)
        self.last_saved_step = step
        return final

    def _together(self, work: Callable[[], None], every_process: bool = False) -> None:
        """Run ``work`` on the main process (or on every process) and meet: an error on any process is raised on
        all of them, so that none is left waiting at the next barrier while another has stopped."""
        error: Exception | None = None
        if every_process or self.is_main_process:
            try:
                work()
            except Exception as err:  # noqa: BLE001 - raised again below, on every process
                error = err
        if self._max_over_processes(float(error is not None)) > 0:
            if error is not None:
                raise error
            raise RuntimeError("another process failed while writing the run folder (its error is in its log)")

    def _write_main_files(self, folder: Path, lora: dict[str, Tensor] | None) -> None:
        """Everything of a checkpoint but the shards, the RNG states and the marker (main process); ``lora``: the
        LoRA to export beside it."""
        if not self.sharded:
            ckpt.write_tensors(folder / ckpt.TRAINABLE_FILE, self.trainable_state_dict())
            torch.save(self.optimizer.state_dict(), folder / ckpt.OPTIMIZER_FILE)
            if self.ema is not None:
                shadow = dict(zip(self.trainable_names(), self.ema.shadow))
                ckpt.write_tensors(folder / ckpt.EMA_FILE, shadow, {"num_updates": str(self.ema.num_updates)})
            for name, (get, _) in self.state_tensors.items():
                ckpt.write_tensors(folder / f"{name}.safetensors", {k: v.detach().cpu() for k, v in get().items()})
        ckpt.write_json(folder / ckpt.SCHEDULER_FILE, self.lr_scheduler.state_dict())
        save_config(self._run_config(), folder / ckpt.CONFIG_FILE)
        if lora is not None:
            self.adapter.save_lora(folder / "lora", lora)
        if self._best_weights is not None:
            ckpt.write_tensors(folder / ckpt.BEST_EVAL_FILE, self._best_weights)

    def _sharded_state(self, optimizer: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """This process's shards of the trained weights (``model.``), the optimizer's state (``optim.``, torch's
        flattened names; ``optimizer`` when the caller has it already) and the EMA (``ema.``): what a sharded
        checkpoint holds."""
        names = self.trainable_names()
        tensors = {f"model.{name}": p for name, p in zip(names, self.params)}
        if optimizer is None:
            optimizer = sharding.optimizer_tensors(self.adapter.denoiser, self.optimizer.optimizer)
        tensors |= {f"optim.{key}": value for key, value in optimizer.items() if isinstance(value, Tensor)}
        if self.ema is not None:
            tensors |= {f"ema.{name}": shadow for name, shadow in zip(names, self.ema.shadow)}
        return tensors

    def _lora_weights(self) -> dict[str, Tensor]:
        """The LoRA to export (the EMA weights when EMA is on), whole and on the CPU (collective when sharded)."""
        context = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        with context:
            return sharding.full_state(self.adapter.lora_state_dict())

    def export_lora(self, folder: str | os.PathLike) -> Path:
        """The LoRA in diffusers format; the EMA weights when EMA is on. Every process calls it; the main process
        writes."""
        weights = self._lora_weights()
        if self.is_main_process:
            self.adapter.save_lora(folder, weights)
        return Path(folder)

    def export_model(self, folder: str | os.PathLike) -> Path:
        """The fully fine-tuned pipeline as a diffusers folder (``save_pretrained``; the EMA weights when EMA is on),
        loadable with ``DiffusionPipeline.from_pretrained`` and by ``diffalign sample|grid --model``.

        Modules offloaded to the CPU (``dpo.offload_frozen``) get their weights back first; text encoders deleted
        after caching (``model.offload_text_encoders: delete``) are loaded again from ``model.path``, on the CPU."""
        from accelerate.hooks import remove_hook_from_module

        pipe = self.adapter.pipe  # every process calls this (a sharded denoiser is gathered); the main one writes
        if self.is_main_process:
            for module in pipe.components.values():
                if isinstance(module, nn.Module) and hasattr(module, "_hf_hook"):
                    remove_hook_from_module(module, recurse=True)  # puts the offloaded weights back
            if self.adapter.text_encoders_released == "delete":
                pipe.register_modules(**self._original_text_encoders())
        context = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        with context, self._whole_denoiser():
            if self.is_main_process:
                pipe.save_pretrained(folder)
        return Path(folder)

    @contextlib.contextmanager
    def _whole_denoiser(self) -> Iterator[None]:
        """A sharded denoiser gathered into a plain module in the pipeline for the block (on the main process; every
        process takes part in the gathering); nothing to do when the run is not sharded."""
        if not self.sharded:
            yield
            return
        pipe, name, live = self.adapter.pipe, self.adapter.denoiser_name, self.adapter.denoiser
        weights = sharding.full_state(live.state_dict())
        if not self.is_main_process:
            yield
            return
        whole = type(live).from_config(live.config)
        whole.load_state_dict(weights)
        setattr(pipe, name, whole)
        try:
            yield
        finally:
            setattr(pipe, name, live)

    def _original_text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders of ``model.path`` (revision, variant), loaded on the CPU without the other modules."""
        model, pipe = self.config.model, self.adapter.pipe
        skipped = {name: None for name in pipe.components if name not in self.adapter.text_encoder_names}
        source = load_pipeline(model.path, revision=model.revision, variant=model.variant, **skipped)
        return {name: getattr(source, name) for name in self.adapter.text_encoder_names}

    def _prune(self) -> None:
        keep = self.config.checkpoint.keep_last
        if keep is None:
            return
        checkpoints = list_checkpoints(self.output_dir)
        for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
            ckpt.remove_checkpoint(old)

    def resume(self, resume: str | os.PathLike | None = None) -> dict[str, Any]:
        """Restore the full state from a checkpoint; returns its trainer state, ``{"step": 0}`` for a fresh start.

        Checkpoints of this run after the resumed one (an abandoned continuation) are deleted, and so are the
        ``metrics.jsonl`` records after its step, so that the run folder holds one history.

        Args:
            resume: a checkpoint folder, ``"latest"`` or ``"auto"``; by default the one ``checkpoint.resume_from``
                named when the run was built.

        Raises:
            CheckpointError: a file of the checkpoint is missing, damaged or not in diffalign's format.
            RunFolderError: the checkpoint was saved by a different number of processes.
        """
        path = self.resume_checkpoint if resume is None else resolve_checkpoint(resume, self.output_dir)
        if path is None:
            if (resume or self.config.checkpoint.resume_from) is not None and self.is_main_process:
                ckpt.say(f"no checkpoint in {self.output_dir / 'checkpoints'}; starting fresh")
            self._restart_history(-1)  # a fresh start logs (and evaluates) step 0 again
            return {"step": 0}
        state = self._check_checkpoint(path)
        if self.sharded:
            self._load_sharded(path, state)
        else:
            self._load_weights(path)
            # Read on the CPU: load_state_dict moves each state to its parameter's device (the training device as
            # map_location fails in accelerate's CPU multi-process mode, tests/trainers/test_run_folder.py).
            self.optimizer.load_state_dict(
                ckpt.read_file(path, ckpt.OPTIMIZER_FILE, lambda p: ckpt.read_torch(p, map_location="cpu"))
            )
            if self.ema is not None:
                self._load_ema(path)
            for name, (_, set_tensors) in self.state_tensors.items():
                set_tensors(ckpt.read_file(path, f"{name}.safetensors", ckpt.read_tensors)[0])
        self.lr_scheduler.load_state_dict(ckpt.read_file(path, ckpt.SCHEDULER_FILE, ckpt.read_json))
        rng = ckpt.rng_file(self.accelerator.process_index)
        if (path / rng).is_file() or "num_processes" not in state:  # else: a new rank keeps its seeded streams
            ckpt.read_file(path, rng, lambda p: set_rng_state(ckpt.read_json(p)))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.schedule_steps = int(state.get("schedule_steps", state["step"]))
        if self.early_stopping is not None:
            self._resume_early_stopping(state, path)
        self.last_saved_step = int(state["step"])
        self._restart_history(int(state["step"]))
        if self.is_main_process:
            ckpt.say(f"resumed from {path} (step {state['step']})")
        return state

    def _resume_early_stopping(self, state: Mapping[str, Any], path: Path) -> None:
        """Early stopping's bookkeeping and best weights from the checkpoint; a checkpoint saved without early
        stopping starts it afresh."""
        saved = state.get("early_stopping")
        if saved is None:
            return
        self.early_stopping.load_state_dict(saved)
        if self.early_stopping.best_step is not None:
            self._best_weights = ckpt.read_file(path, ckpt.BEST_EVAL_FILE, ckpt.read_tensors)[0]

    def _check_checkpoint(self, path: Path) -> dict[str, Any]:
        """The checkpoint's trainer state, once every file this process reads is known to be there (nothing is
        loaded from a checkpoint that lacks a file)."""
        state = ckpt.read_file(path, ckpt.COMPLETE_MARKER, ckpt.read_json)
        self._check_layout(path)
        saved_processes = int(state.get("num_processes", self.accelerator.num_processes))
        if self.sharded and saved_processes != self.accelerator.num_processes:
            raise RunFolderError(
                f"{path} holds the shards of {saved_processes} process(es), this run has "
                f"{self.accelerator.num_processes}: launch {saved_processes} processes, or export the checkpoint "
                f"('diffalign export {path} --out DIR') and start a new run from the export"
            )
        if saved_processes != self.accelerator.num_processes and not self.config.checkpoint.allow_config_change:
            raise RunFolderError(
                f"{path} was saved by {saved_processes} process(es), this run has {self.accelerator.num_processes}: "
                "the data split and the per-process random streams would differ. Launch as many processes, or pass "
                "--allow-config-change to continue anyway (RNG states of missing ranks start from the seed)"
            )
        names = [ckpt.SCHEDULER_FILE] + ([] if self.sharded else [ckpt.TRAINABLE_FILE, ckpt.OPTIMIZER_FILE])
        names += [] if self.sharded else [f"{name}.safetensors" for name in self.state_tensors]
        if saved_processes == self.accelerator.num_processes:
            names.append(ckpt.rng_file(self.accelerator.process_index))
        for name in names:
            ckpt.read_file(path, name, lambda p: None)  # only the existence check
        return state

    def _check_layout(self, path: Path) -> None:
        """A sharded checkpoint for a sharded run, a whole one for the others, with a way out when they differ."""
        saved_sharded = (path / sharding.SHARDED_DIR).is_dir()
        if saved_sharded == self.sharded:
            if saved_sharded and not sharding.shard_files(path / sharding.SHARDED_DIR):
                raise CheckpointError(f"{path / sharding.SHARDED_DIR} holds no shard files: the checkpoint is damaged")
            return
        how = "with FSDP (sharded)" if saved_sharded else "without FSDP"
        raise CheckpointError(
            f"{path} was saved {how}, and this run is {'' if self.sharded else 'not '}sharded: resume it with the "
            "accelerate config it was trained with, or turn it into a model/LoRA with "
            f"'diffalign export {path} --out DIR' and train from that"
        )

    def _load_sharded(self, path: Path, state: Mapping[str, Any]) -> None:
        """Trained weights, optimizer state and EMA from the shards of ``path`` (collective)."""
        inner = self.optimizer.optimizer
        optimizer = sharding.optimizer_tensors(self.adapter.denoiser, inner)  # a fresh state (zero-lr step) to fill
        template = self._sharded_state(optimizer)
        sharding.load_shards(path / sharding.SHARDED_DIR, template)
        optimizer = {**optimizer, **{key: template[f"optim.{key}"] for key in optimizer if f"optim.{key}" in template}}
        sharding.load_optimizer_tensors(self.adapter.denoiser, inner, optimizer)
        if self.ema is not None:
            self.ema.num_updates = int(state.get("ema_updates", 0))

    def _restart_history(self, step: int) -> None:
        """Forget what this run did after ``step``: later checkpoints (main process) and ``metrics.jsonl`` records."""

        def forget() -> None:
            later = [p for p in list_checkpoints(self.output_dir) if ckpt.checkpoint_step(p) > step]
            for path in later:
                ckpt.remove_checkpoint(path)
            if later:
                ckpt.say(f"deleted the checkpoints after step {step}: {', '.join(p.name for p in later)}")
            ckpt.truncate_metrics(self._metrics_file, step)

        self._together(forget)

    def _load_weights(self, path: Path) -> None:
        weights, _ = ckpt.read_file(path, ckpt.TRAINABLE_FILE, ckpt.read_tensors)
        by_name = dict(self.adapter.denoiser.named_parameters())
        missing = [name for name in weights if name not in by_name]
        if missing or len(weights) != len(self.params):
            raise ValueError(
                f"checkpoint {path} does not match this model/LoRA setup ({len(weights)} tensors saved, "
                f"{len(self.params)} trainable now; e.g. unknown {missing[:3]}): check model.path and model.lora"
            )
        with torch.no_grad():
            for name, value in weights.items():
                by_name[name].copy_(value.to(by_name[name].device))

    def _load_ema(self, path: Path) -> None:
        if not any((path / name).is_file() for name in (ckpt.EMA_FILE, ckpt.pickled_name(ckpt.EMA_FILE))):
            self.ema = EMA(self.params, self.config.ema.decay, self.config.ema.update_every)
            if self.is_main_process:
                ckpt.say(f"{path} has no EMA weights (saved with ema.enabled: false); the EMA starts from them")
            return
        shadow, metadata = ckpt.read_file(path, ckpt.EMA_FILE, ckpt.read_tensors)
        names = self.trainable_names()
        if sorted(shadow) != sorted(names):
            raise CheckpointError(f"{path / ckpt.EMA_FILE} does not match the trained parameters; check model.lora")
        if not metadata.get("num_updates", "").isdigit():
            raise CheckpointError(f"{path / ckpt.EMA_FILE} lacks its num_updates metadata (not saved by diffalign)")
        self.ema.load_state_dict({"shadow": [shadow[name] for name in names], "num_updates": metadata["num_updates"]})

    # --- evaluation -------------------------------------------------------------------------------------------------

    def maybe_evaluate(self, step: int, evaluate: Callable[[int], Mapping[str, float]] | None) -> dict[str, float]:
        """Run ``evaluate(step)`` every ``eval.every`` steps (with EMA weights when EMA is on) and log it."""
        every = self.config.eval.every
        if evaluate is None or every <= 0 or step % every:
            return {}
        context = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        with context:
            metrics = dict(evaluate(step))
        self.log(step, metrics)
        if self.early_stopping is not None:
            self._follow_best(step, metrics)
        return metrics

    def _follow_best(self, step: int, metrics: Mapping[str, float]) -> None:
        """Update early stopping with this evaluation; keep the weights (on the CPU) when it is the best so far.
        Every checkpoint stores them too (``best_eval.safetensors``), so that a resumed run ends with them."""
        key = f"eval/{self.config.eval.metric}_mean"
        if key not in metrics:
            available = sorted(k.removeprefix("eval/").removesuffix("_mean") for k in metrics if k.startswith("eval/"))
            raise ConfigError(
                f"the evaluation reports no {self.config.eval.metric!r}; it reports {available}",
                key="eval.metric",
            )
        if self.early_stopping.update(step, float(metrics[key])):
            self._best_weights = {name: p.detach().to("cpu", copy=True) for name, p in self.named_trainables()}

    def named_trainables(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the trained weights, in ``self.params`` order (this process's shards)."""
        return list(zip(self.trainable_names(), self.params))

    def accumulate_micro_batches(
        self, step: int, accumulation: int, micro_loss: Callable[[int], tuple[Tensor, Mapping[str, Tensor]]]
    ) -> dict[str, float]:
        """The ``accumulation`` micro-batches of one optimizer step (the trainer's
        ``optim.gradient_accumulation_steps``): ``micro_loss(micro)`` gives each one's ``(loss, metrics)``; its
        ``loss / accumulation`` is backpropagated (gradients synchronised on the last one). Returns the metrics
        averaged over the micro-batches, then over the processes."""
        totals: dict[str, float] = {}
        for micro in range(accumulation):
            with self.accumulate(sync=micro == accumulation - 1):
                loss, metrics = micro_loss(micro)
                self.backward(loss / accumulation, step=step)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) / accumulation
        return self.reduce_metrics(totals)

    @contextlib.contextmanager
    def weights_swapped(self, state: Mapping[str, Tensor]) -> Iterator[None]:
        """The trained weights set to ``state`` (by name) inside the block, e.g. SPIN's ``theta_k`` or Self-NPO's
        EMA teacher, with the denoiser in eval mode (no LoRA dropout: a fixed function). The parameters' storage
        is swapped, not copied; the live weights come back when the block ends, also on an error. Not for sharded
        runs (whole tensors are swapped)."""
        params = dict(self.named_trainables())
        live = {name: params[name].data for name in state}
        denoiser = self.adapter.denoiser
        training = denoiser.training
        for name, value in state.items():
            params[name].data = value
        denoiser.eval()
        try:
            yield
        finally:
            for name, value in live.items():
                params[name].data = value
            denoiser.train(training)

    def _restore_best_weights(self, step: int) -> None:
        """End with the best evaluation's weights (early stopping on), and log where that was."""
        stopping = self.early_stopping
        if stopping is None or self._best_weights is None:
            return
        with torch.no_grad():
            for name, param in self.named_trainables():
                param.copy_(self._best_weights[name].to(param.device))
        self.log(step, {"early_stopping/best_step": stopping.best_step, "early_stopping/best": stopping.best_value})
        if self.is_main_process and stopping.best_step != step:
            ckpt.say(f"the run ends with the weights of step {stopping.best_step}, its best evaluation")

    def finish(self, trainer_state: Mapping[str, Any], step: int) -> Path:
        """Final checkpoint (unless the last step just saved one), then the trained weights for use: the LoRA in
        ``<output_dir>/lora``, or a fully fine-tuned model as a diffusers pipeline folder in ``<output_dir>/model``."""
        path = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
        if self.last_saved_step != step:
            path = self.save(step, trainer_state)
        if self.use_lora:
            self.export_lora(self.output_dir / "lora")
        else:
            self.export_model(self.output_dir / "model")
        self.accelerator.end_training()
        return path


def _number(step: int | None) -> int | None:
    """The 1-based number of the 0-based trainer step ``step``."""
    return None if step is None else step + 1


def mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over a logging window (counters such as ``data/num_skipped``: the latest value)."""
    keys = {key for metrics in window for key in metrics}
    mean = {}
    for key in keys:
        values = [metrics[key] for metrics in window if key in metrics]
        mean[key] = values[-1] if key.startswith("data/") else sum(values) / len(values)
    return mean
