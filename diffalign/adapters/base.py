"""The model-family interface: one adapter per family, by composition over a diffusers pipeline.

An adapter owns nothing but references to the pipeline's components. It reuses the pipeline's own stage methods
(``encode_prompt``, ``prepare_latents``, FLUX's packing helpers) and never copies ``__call__``: the sampling loop
lives once, in :mod:`diffalign.samplers`, and the trainers talk only to this interface. What differs between
families is small -- the text conditioning, the denoiser call and the latent <-> image conversion -- and that is
all a family file implements.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn


if TYPE_CHECKING:
    from diffalign.adapters.text_cache import TextEmbeddingCache


logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads."""
LORA_SCOPE_NAME = "diffalign_lora.json"
"""Beside a saved LoRA that acts on part of the trajectory only, or was trained on a fixed schedule shift:
``{"min_timestep": t, "max_timestep": u, "timestep_shift": s}`` (each key only when set; the LoRA is off at timesteps
``<= t`` and at timesteps ``> u``: ``u`` is ImageReFL's combined generation, the base model before a switch step).
``pipe.load_lora_weights`` ignores it; honour ``t`` with a ``callback_on_step_end`` that calls
``pipe.disable_lora()`` once the next timestep is at or below ``t``, and ``s`` with ``pipe.scheduler.set_shift(s)``
(static schedulers) or ``mu=log(s)`` (FLUX's dynamic shift)."""
NEGATIVE_ADAPTER = "negative"
"""The peft adapter name of a negative LoRA (:meth:`DiffusionAdapter.load_negative_lora`)."""

PredictionType = Literal["epsilon", "v_prediction", "flow"]
CompileMode = Literal["none", "default", "max-autotune-no-cudagraphs"]
"""``torch.compile`` modes for the denoiser (:meth:`DiffusionAdapter.compile_denoiser`): ``none`` runs eagerly,
``default`` is inductor's default, ``max-autotune-no-cudagraphs`` also autotunes matmul/conv kernels (longer first
compile) without CUDA graphs, which would pin each batch shape's buffers across the training loop."""
COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)
PromptInput = str | Sequence[str]


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning of a batch, ready for the denoiser.

    Every tensor in ``embeds`` and ``negative`` is batch-first with the same batch size ``B``; they are keyed by
    the denoiser keyword they feed (e.g. ``encoder_hidden_states [B, L, D]``, ``pooled_projections [B, P]``,
    SDXL's ``text_embeds``/``time_ids``). ``extras`` holds tensors without a batch dimension that every sample
    shares (FLUX's ``txt_ids [L, 3]``). Conditionings are cheap to slice, repeat and concatenate, so a trainer can
    encode each prompt once and index into the cache.

    Attributes:
        embeds: the prompts' conditioning, ``{name: Tensor[B, ...]}``.
        negative: the unconditional branch for classifier-free guidance (same keys and shapes), or ``None`` when
            the conditioning was built without one (no CFG, or FLUX's guidance embedding).
        extras: batch-independent tensors, ``{name: Tensor}``.
        ragged: keys whose dim 1 is a text sequence of per-prompt length, right-padded with zeros: the encoder
            states and the mask that marks their real tokens (0 on padding), for families that encode prompts to
            their own length (Qwen-Image). :meth:`cat` and :meth:`guided_inputs` pad them to a common length;
            the denoiser masks the padding, so padding changes no output.
    """

    embeds: dict[str, Tensor]
    negative: dict[str, Tensor] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    ragged: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return next(iter(self.embeds.values())).shape[0]

    def _map(self, fn) -> Conditioning:
        negative = None if self.negative is None else {k: fn(v) for k, v in self.negative.items()}
        return Conditioning({k: fn(v) for k, v in self.embeds.items()}, negative, dict(self.extras), self.ragged)

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Conditioning:
        """Select samples along the batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return self._map(lambda t: t[index] if isinstance(index, slice) else t[index.to(t.device)])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Repeat each sample ``repeats`` times in place: ``[a, b] -> [a, a, b, b]``."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device``; floating tensors are also cast to ``dtype`` (id tensors keep theirs)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        moved = self._map(move)
        moved.extras = {k: move(v) for k, v in self.extras.items()}
        return moved

    def without_negative(self) -> Conditioning:
        return Conditioning(dict(self.embeds), None, dict(self.extras), self.ragged)

    def unconditional(self) -> Conditioning:
        """The negative (unconditional) branch as a conditioning of its own, for a call without CFG."""
        self.guided_inputs()  # the clear error when there is no negative branch
        return Conditioning(dict(self.negative), None, dict(self.extras), self.ragged)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch; all items must agree on having a negative branch."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        has_negative = {item.negative is not None for item in items}
        if len(has_negative) != 1:
            raise ValueError("cannot concatenate conditionings with and without a negative (CFG) branch")
        ragged = items[0].ragged
        embeds = {k: _cat_padded([item.embeds[k] for item in items], k in ragged) for k in items[0].embeds}
        negative = None
        if items[0].negative is not None:
            negative = {k: _cat_padded([item.negative[k] for item in items], k in ragged) for k in items[0].negative}
        return Conditioning(embeds, negative, dict(items[0].extras), ragged)

    def without_padding(self) -> Conditioning:
        """Ragged keys cut to the longest real row (the last position a ragged ``*mask`` key marks), so that a row
        kept from a padded batch (a text-cache entry) holds its own tokens only; unchanged without ragged keys."""
        mask_keys = [key for key in self.ragged if "mask" in key]
        if not mask_keys:
            return self

        def trimmed(values: dict[str, Tensor]) -> dict[str, Tensor]:
            real = torch.stack([values[key].bool().any(dim=0) for key in mask_keys]).any(dim=0).nonzero()  # [L]
            keep = int(real.max()) + 1 if len(real) else 1
            return {key: value[:, :keep] if key in self.ragged else value for key, value in values.items()}

        negative = None if self.negative is None else trimmed(self.negative)
        return Conditioning(trimmed(self.embeds), negative, dict(self.extras), self.ragged)

    def guided_inputs(self) -> dict[str, Tensor]:
        """Denoiser inputs of the CFG batch: ``cat([negative, positive])`` per key, shape ``[2B, ...]``."""
        if self.negative is None:
            raise ValueError(
                "classifier-free guidance needs a negative branch: build the conditioning with "
                "adapter.encode_prompt(prompts, with_negative=True)"
            )
        return {k: _cat_padded([self.negative[k], v], k in self.ragged) for k, v in self.embeds.items()}


def _cat_padded(tensors: Sequence[Tensor], ragged: bool) -> Tensor:
    """``torch.cat`` along the batch; ``ragged`` tensors (``[B, L_i, ...]``) are first right-padded with zeros to
    the longest ``L``."""
    if ragged:
        length = max(t.shape[1] for t in tensors)
        tensors = [_pad_sequence(t, length) for t in tensors]
    return torch.cat(list(tensors))


def _pad_sequence(tensor: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 of ``tensor`` with zeros to ``length``."""
    missing = length - tensor.shape[1]
    if not missing:
        return tensor
    padding = tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, padding], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Timestep schedule
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """The discretisation of one sampling run, as the stateless step kernels need it.

    Attributes:
        timesteps: ``[T]`` the values passed to the denoiser (the scheduler's 0..1000 scale).
        sigmas: ``[T + 1]`` flow families: the noise level before each step and after the last (``sigmas[T] == 0``).
        alphas_cumprod: ``[T]`` epsilon/v families: ``alpha_bar`` at each step's timestep.
        alphas_cumprod_prev: ``[T]`` epsilon/v families: the ``alpha_bar`` each DDIM step moves to, computed as
            diffusers' ``DDIMScheduler.step`` does (``t - num_train_timesteps // T``; ``final_alpha_cumprod`` past 0).
        stochastic_alphas_cumprod_prev: ``[T]`` epsilon/v families: where a *stochastic* DDIM step moves to. As in
            ddpo-pytorch the previous timestep is clamped at 0, so the last step of a scheduler with
            ``set_alpha_to_one=True`` keeps its noise (into ``alpha_bar = 1`` it would have none, and no log-prob);
            equal to ``alphas_cumprod_prev`` otherwise. ``None``: use ``alphas_cumprod_prev``.
    """

    timesteps: Tensor
    sigmas: Tensor | None = None
    alphas_cumprod: Tensor | None = None
    alphas_cumprod_prev: Tensor | None = None
    stochastic_alphas_cumprod_prev: Tensor | None = None

    def __len__(self) -> int:
        return self.timesteps.shape[0]


# ---------------------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------------------


class DiffusionAdapter:
    """Base of the family adapters; see :func:`diffalign.adapters.load_adapter` to get one.

    Subclasses set the class attributes and implement ``_encode``, ``_forward``, ``set_timesteps`` (and, for
    families with packed latents, override the few methods that touch the latent layout); register one from
    outside the package with :func:`~diffalign.adapters.register_adapter` (``docs/architecture.md``). LoRA uses
    diffusers' PEFT integration: a ``PeftAdapterMixin`` denoiser and a pipeline with a LoRA loader mixin
    (``save_lora_weights``), or overrides of :meth:`save_lora` / :meth:`load_lora`.

    Args:
        pipe: a loaded diffusers pipeline of the family.
        device: where to run (default: the pipeline's device). Moves the pipeline.
        dtype: the compute dtype of the denoiser and text encoders (default: fp32). The VAE stays in fp32, since
            fp16 VAEs overflow and decoding is where rewards read the pixels; the step kernels run in fp32.
        height, width: the working image resolution (default: the family's native size for this checkpoint).
    """

    family: ClassVar[str]
    """Short family name (``"sd3"``), shown in messages and logs."""
    denoiser_name: ClassVar[Literal["unet", "transformer"]]
    """The pipeline attribute that holds the denoiser."""
    pipeline_class_names: ClassVar[tuple[str, ...]]
    """diffusers pipeline class names this adapter wraps (:func:`~diffalign.adapters.load_adapter` picks by them)."""
    default_lora_targets: ClassVar[tuple[str, ...]]
    """Module-name suffixes a LoRA wraps when ``model.lora.target_modules`` is null."""
    default_num_steps: ClassVar[int] = 28
    """Sampling steps when a command or config leaves them unset (the pipeline's ``num_inference_steps``)."""
    default_guidance_scale: ClassVar[float] = 1.0
    """Classifier-free guidance scale when a command or config leaves it unset (the family's usual value)."""
    default_dpo_beta: ClassVar[float] = 100.0
    """Diffusion-DPO's beta in the ``-0.5 * beta`` convention of :mod:`diffalign.losses.dpo` when
    ``dpo.beta`` is null. It multiplies differences of per-element errors, whose scale depends on the target:
    flow targets ``noise - x0`` err more per element than epsilon targets, hence smaller values for flows."""
    guidance_embedded: ClassVar[bool] = False
    """The guidance scale is an input of the denoiser (FLUX.1-dev's guidance embedding), not two CFG branches;
    training calls then pass a guidance value too."""
    edits_images: ClassVar[bool] = False
    """The family edits: each prompt comes with a source image that :meth:`with_source_images` adds to its
    conditioning (FLUX.1 Kontext)."""
    clip_sample_range: float | None = None
    """DDIM families: clamp each step's predicted ``x0`` to ``[-r, r]`` (the scheduler's ``clip_sample``)."""

    def __init__(
        self,
        pipe: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else pipe.device
        self.dtype = dtype or torch.float32
        pipe.to(self.device)
        for name, module in pipe.components.items():
            if isinstance(module, nn.Module):
                # Frozen and in eval mode (no dropout): sampling and re-scoring must see the same function.
                module.requires_grad_(False).eval()
                target = torch.float32 if name == "vae" else self.dtype
                if next(module.parameters()).dtype != target:
                    module.to(dtype=target)
        pipe.set_progress_bar_config(disable=True)
        self._denoiser_wrapper: nn.Module | None = None
        self._compile_options: dict[str, Any] | None = None  # torch.compile kwargs; None: eager
        self._compile_target: nn.Module | None = None  # the denoiser that compile_denoiser was asked for
        self._compiled: tuple[nn.Module, nn.Module] | None = None  # (module called, its compiled form)
        self._lora_off_depth = 0  # open lora_disabled() blocks
        self.lora_min_timestep: float | None = None
        """The LoRA acts only at timesteps above this (scheduler scale); ``None``: at every timestep. Saved beside
        the LoRA weights (:data:`LORA_SCOPE_NAME`) and restored by :meth:`load_lora`."""
        self.lora_max_timestep: float | None = None
        """The LoRA acts only at timesteps at or below this (scheduler scale); ``None``: no upper limit. ImageReFL's
        combined generation: the base model runs the early, noisy steps and the LoRA takes over from a switch step
        (:func:`diffalign.losses.reward_backprop.switch_timestep` maps a step to this limit). Saved beside the LoRA
        weights and restored by :meth:`load_lora`, like :attr:`lora_min_timestep`."""
        self.alignment_scale: float | None = None
        """Sampling-time alignment (RL guidance, Jin et al. 2025): with a LoRA, every prediction becomes
        ``base + w * (aligned - base)`` of the base model's (LoRA off) and the LoRA model's outputs, each with the
        same CFG; ``w = 0`` is the base model, ``1`` the LoRA model, ``> 1`` extrapolates (one more denoiser call
        per step). ``None``: off. A sampling choice, not saved with the LoRA (docs/methods/sampling-alignment.md)."""
        self.negative_lora: str | None = None
        """The peft adapter whose weights join CFG's unconditional branch (negative preference optimisation,
        Self-NPO): with guidance the unconditional half runs the positive model plus this adapter and the conditional
        half the positive model alone, as two calls. :meth:`load_negative_lora` sets it to ``"negative"``; a Self-NPO
        run sets ``"default"`` (its own LoRA, the positive model then the base). ``None``: off
        (docs/methods/self-npo.md#sampling)."""
        self.text_cache: TextEmbeddingCache | None = None
        """Per-prompt text conditionings that :meth:`encode_prompt` answers from
        (:mod:`diffalign.adapters.text_cache`); ``None``: every call encodes."""
        self.text_encoders_released: str | None = None
        """``"cpu"`` or ``"delete"`` after :meth:`release_text_encoders`; ``None`` while they are in place."""
        self.timestep_shift: float | None = None
        """Flow families: a fixed shift ``sigma -> shift * sigma / (1 + (shift - 1) * sigma)`` of the sampling
        schedule in place of the scheduler's own (static, or resolution-dependent with dynamic shifting); ``None``
        keeps the scheduler's (``model.timestep_shift``; MixGRPO and DanceGRPO sample FLUX with 3). Saved beside the
        LoRA weights (:data:`LORA_SCOPE_NAME`) and restored by :meth:`load_lora`, so the LoRA samples on the schedule
        it was trained on."""
        self.height = height or self.default_resolution
        self.width = width or self.default_resolution
        self._check_resolution()

    # --- properties -------------------------------------------------------------------------------------------------

    @property
    def denoiser(self) -> nn.Module:
        """The UNet or transformer: the module that LoRA wraps and trainers optimise."""
        return getattr(self.pipe, self.denoiser_name)

    def wrap_denoiser(self, wrapper: nn.Module | None) -> None:
        """Route denoiser calls through ``wrapper`` (DDP / DeepSpeed / FSDP from ``accelerator.prepare``).

        :attr:`denoiser` keeps returning the bare module (config, LoRA switches, parameters); only the forward
        goes through the wrapper, so that distributed gradient synchronisation happens.
        """
        self._denoiser_wrapper = wrapper

    def call_denoiser(self, *args: Any, **kwargs: Any) -> Any:
        """Call the denoiser (through its distributed wrapper when one is set, compiled after
        :meth:`compile_denoiser`)."""
        module = self._denoiser_wrapper if self._denoiser_wrapper is not None else self.denoiser
        if self._compile_options is not None and self.denoiser is self._compile_target:
            module = self._compiled_form(module)
        return module(*args, **kwargs)

    def compile_denoiser(self, mode: CompileMode = "default", dynamic: bool | None = None) -> None:
        """Run the denoiser's calls through ``torch.compile`` (inductor; CPU and GPU), or eagerly again (``none``).

        What is compiled is the module :meth:`call_denoiser` calls -- the distributed wrapper once
        :meth:`wrap_denoiser` set one, else the denoiser. The compiled form (an ``OptimizedModule``, whose own keys
        would carry an ``_orig_mod.`` prefix) is kept by the adapter, outside the pipeline, and the denoiser is left
        as it is: its ``state_dict`` keys, the saved LoRA and checkpoints are those of an eager run. Compilation
        happens on the first call, so a LoRA added afterwards is part of the graph; parameters are graph inputs, so
        optimizer steps and swapped-in EMA weights are seen without recompiling. Dynamo guards on what changes
        between calls and recompiles once for each new case, then reuses it: LoRA on / off (:meth:`lora_disabled`,
        the reference policy), grad mode (sampling vs training) and, with ``dynamic=None``, a second batch size,
        after which the batch dimension is symbolic (CFG's doubled batch, a smaller last chunk, the re-scoring
        rows) instead of one graph per size. A denoiser other than the one asked for (a full fine-tune's frozen
        reference copy, swapped into the pipeline for no-grad forwards, possibly with offload hooks) runs eagerly.

        Args:
            mode: one of :data:`COMPILE_MODES`.
            dynamic: ``torch.compile``'s ``dynamic``: ``None`` (static, symbolic once a size changes), ``True``
                (symbolic from the start) or ``False`` (one graph per batch size).
        """
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        self._compiled = None
        if mode == "none":
            self._compile_options = self._compile_target = None
            return
        self._compile_options = {"mode": None if mode == "default" else mode, "dynamic": dynamic}
        self._compile_target = self.denoiser

    @property
    def compile_mode(self) -> CompileMode:
        """The ``torch.compile`` mode the denoiser runs with (``none``: eagerly)."""
        if self._compile_options is None:
            return "none"
        return self._compile_options["mode"] or "default"

    def _compiled_form(self, module: nn.Module) -> nn.Module:
        """``module`` compiled (made on first use, and again when the wrapper changes)."""
        from accelerate.utils import is_compiled_module

        if is_compiled_module(module):  # accelerate's own dynamo_backend compiled it already
            return module
        if self._compiled is None or self._compiled[0] is not module:
            self._compiled = (module, torch.compile(module, **self._compile_options))
        return self._compiled[1]

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def prediction_type(self) -> PredictionType:
        return "flow"

    @property
    def default_resolution(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.vae_scale_factor

    def _check_resolution(self) -> None:
        multiple = self.latent_multiple
        for name, value in (("height", self.height), ("width", self.width)):
            if value % multiple:
                raise ValueError(
                    f"{self.family}: {name}={value} is not a multiple of {multiple} (VAE downsampling"
                    f"{' x 2 for latent packing' if multiple != self.vae_scale_factor else ''}); pick e.g. "
                    f"{value // multiple * multiple or multiple}"
                )

    # --- text -------------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompts: PromptInput,
        negative_prompt: PromptInput | None = None,
        with_negative: bool = True,
    ) -> Conditioning:
        """Encode prompts with the pipeline's own ``encode_prompt``.

        Args:
            prompts: a prompt or a list of ``B`` prompts.
            negative_prompt: the unconditional text (default: the pipeline's own default, e.g. ``""``, or zeros
                for SDXL's ``force_zeros_for_empty_prompt``).
            with_negative: also build the unconditional branch that classifier-free guidance needs.

        Returns:
            A :class:`Conditioning` of batch ``B`` on the adapter's device, in its dtype.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompt got no prompts")
        cache = self.text_cache
        if cache is not None and cache.signature != self._text_signature():
            if len(cache) and self.text_encoders_released is not None:
                raise RuntimeError(
                    "the text settings (max_sequence_length, image size) changed after the text encoders were "
                    "released, so the cached text embeddings no longer apply; keep the encoders to change them"
                )
            cache.clear()  # encoded under other settings: stale
            cache.signature = self._text_signature()
        if cache is not None and (cached := cache.lookup(prompts, negative_prompt, with_negative)) is not None:
            return cached.to(self.device)
        if self.text_encoders_released == "cpu":  # encode on the device for once, then back to the CPU
            with self._text_encoders_on(self.device):
                cond = self._encode_uncached(prompts, negative_prompt, with_negative)
            return cond
        if self.text_encoders_released is not None:
            missing = cache.missing(prompts, negative_prompt, with_negative) if cache is not None else prompts
            raise RuntimeError(
                f"the text encoders were released (model.offload_text_encoders: {self.text_encoders_released}) and "
                f"{len(missing)} prompt(s) are not in the text-embedding cache, e.g. {missing[0]!r}: precompute every "
                "prompt the run uses, or keep the encoders (model.offload_text_encoders: keep)"
            )
        return self._encode_uncached(prompts, negative_prompt, with_negative)

    def _encode_uncached(
        self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool
    ) -> Conditioning:
        with torch.no_grad():
            cond = self._encode(prompts, negative_prompt, with_negative)
        if self.text_cache is not None:
            self.text_cache.store(prompts, cond, negative_prompt, with_negative)
        return cond

    def _text_signature(self) -> tuple:
        """The settings a text conditioning depends on besides the prompt: T5's length, the image size (SDXL)."""
        return (getattr(self, "max_sequence_length", None), self.height, self.width)

    @contextlib.contextmanager
    def _text_encoders_on(self, device: torch.device) -> Iterator[None]:
        """Text encoders released to the CPU, on ``device`` for the block (an uncached prompt)."""
        encoders = [getattr(self.pipe, name) for name in self.text_encoder_names]
        for encoder in encoders:
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.to("cpu")

    def precompute_text_embeddings(
        self,
        prompts: Sequence[str],
        negative_prompt: str | None = None,
        with_negative: bool = True,
        batch_size: int = 16,
    ) -> int:
        """Encode the prompts missing from :attr:`text_cache` (created if there is none), ``batch_size`` at a time;
        returns how many were encoded. Each row is kept on its own (families with a fixed text length pad it to that
        length; ragged text is cut to the row's own tokens), so the cached conditioning predicts what an uncached
        call does up to float rounding."""
        from diffalign.adapters.text_cache import TextEmbeddingCache

        if self.text_cache is None:
            self.text_cache = TextEmbeddingCache()
        missing = self.text_cache.missing(list(prompts), negative_prompt, with_negative)
        for start in range(0, len(missing), batch_size):
            self.encode_prompt(missing[start : start + batch_size], negative_prompt, with_negative)
        return len(missing)

    def release_text_encoders(self, mode: Literal["cpu", "delete"]) -> list[str]:
        """Free the text encoders' device memory once every prompt is cached: ``cpu`` moves them to the CPU,
        ``delete`` drops them from the pipeline. :meth:`encode_prompt` then answers from :attr:`text_cache` only
        (a missing prompt is an error that names it). Returns the released components' names."""
        if mode not in ("cpu", "delete"):
            raise ValueError(f"mode must be 'cpu' or 'delete', got {mode!r}")
        names = [name for name in self.text_encoder_names if getattr(self.pipe, name, None) is not None]
        for name in names:
            if mode == "cpu":
                getattr(self.pipe, name).to("cpu")
            else:
                self.pipe.register_modules(**{name: None})
        self.text_encoders_released = mode
        return names

    @property
    def text_encoder_names(self) -> list[str]:
        """The pipeline's text-encoder components (``text_encoder``, ``text_encoder_2``, ...)."""
        return [name for name in self.pipe.components if name.startswith("text_encoder")]

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        raise NotImplementedError

    def with_source_images(self, cond: Conditioning, images: Tensor, batch_size: int | None = None) -> Conditioning:
        """``cond`` with one source image per sample for an editing family to condition on
        (docs/architecture.md#editing).

        Args:
            cond: ``[B]`` conditioning of the edit instructions.
            images: ``[B, 3, H, W]`` source images in ``[0, 1]`` at the adapter's resolution.
            batch_size: images per VAE call (default: all at once).
        """
        raise ValueError(
            f"{self.family} does not take a source image; the editing families are FluxKontextPipeline (flux_kontext)"
        )

    # --- latents ----------------------------------------------------------------------------------------------------

    def prepare_latents(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """Initial noise through the pipeline's ``prepare_latents``: ``[B, C, h, w]`` (FLUX: packed ``[B, L, C]``).

        With a list of ``batch_size`` generators, sample ``i`` is drawn from generator ``i`` (per-image seeds).
        """
        channels = self.denoiser.config.in_channels
        return self.pipe.prepare_latents(
            batch_size, channels, self.height, self.width, self.dtype, self.device, generator
        )

    def with_size_conditioning(
        self, cond: Conditioning, original_sizes: Tensor, crop_top_lefts: Tensor
    ) -> Conditioning:
        """``cond`` with each sample's original image size and crop as extra conditioning, for families trained
        with it (SDXL's micro-conditioning); the base returns ``cond`` unchanged.

        Args:
            cond: ``[B]`` conditioning of the captions.
            original_sizes: ``[B, 2]`` ``(height, width)`` of each image before resizing.
            crop_top_lefts: ``[B, 2]`` ``(top, left)`` of each crop.
        """
        return cond

    # --- denoiser ---------------------------------------------------------------------------------------------------

    def predict(
        self,
        latents: Tensor,
        t: Tensor | float,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        uncond_grad: bool = True,
    ) -> Tensor:
        """The model output at ``(latents, t)``: :meth:`_predict`, with the LoRA switched off at the timesteps at
        or below :attr:`lora_min_timestep` and above :attr:`lora_max_timestep` when those are set, and mixed with
        the base model's output by :attr:`alignment_scale` when that is set.

        A batch whose samples sit on both sides of a limit runs twice (with and without the LoRA) and each
        sample takes its own side; the samplers' batches share one timestep, so they run once.
        """
        scale = self.alignment_scale
        if scale is None or not self.has_lora or self._lora_off_depth:
            return self._predict_scoped(latents, t, cond, guidance_scale, uncond_grad)
        with self.lora_disabled():
            base = self._predict(latents, t, cond, guidance_scale, uncond_grad=uncond_grad)
        aligned = self._predict_scoped(latents, t, cond, guidance_scale, uncond_grad)
        # lerp is exact at both ends (w = 0 gives base, w = 1 aligned, bit for bit) and extrapolates past them.
        return torch.lerp(base, aligned, float(scale))

    def _predict_scoped(
        self, latents: Tensor, t: Tensor | float, cond: Conditioning, guidance_scale: float, uncond_grad: bool
    ) -> Tensor:
        """:meth:`_predict` with the LoRA on only inside its timestep scope (:meth:`predict`)."""
        low, high = self.lora_min_timestep, self.lora_max_timestep
        if (low is None and high is None) or not self.has_lora or self._lora_off_depth:
            return self._predict(latents, t, cond, guidance_scale, uncond_grad=uncond_grad)
        timesteps = self._timesteps(t, latents.shape[0]).float()
        active = torch.ones_like(timesteps, dtype=torch.bool)  # [B]
        if low is not None:
            active &= timesteps > low
        if high is not None:
            active &= timesteps <= high
        if bool(active.all()):
            return self._predict(latents, t, cond, guidance_scale, uncond_grad=uncond_grad)
        with self.lora_disabled():
            base = self._predict(latents, t, cond, guidance_scale, uncond_grad=uncond_grad)
        if not bool(active.any()):
            return base
        adapted = self._predict(latents, t, cond, guidance_scale, uncond_grad=uncond_grad)
        return torch.where(active.view(-1, *[1] * (latents.ndim - 1)), adapted, base)

    def _predict(
        self,
        latents: Tensor,
        t: Tensor | float,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        uncond_grad: bool = True,
    ) -> Tensor:
        """The model output at ``(latents, t)``, classifier-free-guided when ``guidance_scale > 1``.

        CFG runs as one batched call on ``cat([negative, positive])``, as the pipelines do, and combines
        ``uncond + g * (text - uncond)`` in the model dtype.

        Args:
            latents: ``[B, ...]`` the noisy latents (any float dtype; cast to the adapter's dtype).
            t: the timestep on the scheduler's scale (a scalar, or ``[B]``).
            cond: the conditioning of the ``B`` samples.
            guidance_scale: CFG weight; ``<= 1`` means a single conditional call.
            uncond_grad: with grad enabled, let the gradient flow through the unconditional branch too. ``False``
                gives flow_grpo's training gradient (that branch detached): it then runs as its own no-grad call
                of ``B`` rows, so the backward covers the ``B`` conditional rows only.

        Returns:
            ``[B, ...]`` epsilon, v or velocity (per :attr:`prediction_type`), in the adapter's dtype.
        """
        latents = latents.to(self.dtype)
        batch = latents.shape[0]
        if len(cond) != batch:
            raise ValueError(f"conditioning has batch {len(cond)} but latents have batch {batch}")
        if guidance_scale > 1.0 and self.negative_lora is not None:
            inputs, timesteps = cond.guided_inputs(), self._timesteps(t, batch)
            with self._adapters_on(negative=True):
                uncond = self._forward(latents, timesteps, {k: v[:batch] for k, v in inputs.items()}, cond)
            with self._adapters_on(negative=False):
                text = self._forward(latents, timesteps, cond.embeds, cond)
            return self.combine_guidance(uncond, text, guidance_scale)
        if guidance_scale > 1.0 and not uncond_grad and torch.is_grad_enabled():
            inputs = cond.guided_inputs()  # the clear error when there is no negative branch
            timesteps = self._timesteps(t, batch)
            with torch.no_grad():
                uncond = self._forward(latents, timesteps, {k: v[:batch] for k, v in inputs.items()}, cond)
            text = self._forward(latents, timesteps, cond.embeds, cond)
            return self.combine_guidance(uncond, text, guidance_scale)
        if guidance_scale > 1.0:
            inputs = cond.guided_inputs()
            output = self._forward(torch.cat([latents, latents]), self._timesteps(t, 2 * batch), inputs, cond)
            uncond, text = output.chunk(2)
            return self.combine_guidance(uncond, text, guidance_scale)
        return self._forward(latents, self._timesteps(t, batch), cond.embeds, cond)

    def combine_guidance(self, uncond: Tensor, text: Tensor, guidance_scale: float) -> Tensor:
        """Classifier-free guidance of the two branches' outputs (``[B, ...]`` each): ``uncond + g * (text - uncond)``.
        Families whose pipeline guides otherwise (Qwen-Image's norm rescale) override it."""
        return uncond + guidance_scale * (text - uncond)

    def _timesteps(self, t: Tensor | float, batch: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            return t.expand(batch)
        return t.repeat(batch // t.shape[0]) if t.shape[0] != batch else t

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        raise NotImplementedError

    # --- schedule ---------------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        """Set the scheduler's timesteps exactly as the pipeline's ``__call__`` does and return the schedule."""
        raise NotImplementedError

    # --- images <-> latents -----------------------------------------------------------------------------------------

    def flow_shift_options(self, mu: Callable[[], float]) -> dict[str, float]:
        """``retrieve_timesteps`` options that shift a flow schedule: the fixed :attr:`timestep_shift` when set,
        else the scheduler's own (``mu()``, the resolution-dependent shift, when it shifts dynamically).

        A dynamic scheduler's exponential time shift with ``mu = log(shift)`` is the static shift ``shift``; a
        static scheduler takes the fixed shift through ``set_shift``.
        """
        config = self.scheduler.config
        dynamic = bool(config.get("use_dynamic_shifting", False))
        if not dynamic:  # set on every call, so that clearing timestep_shift restores the scheduler's own
            self.scheduler.set_shift(self.timestep_shift or config.get("shift", 1.0))
            return {}
        if self.timestep_shift is None:
            return {"mu": mu()}
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("model.timestep_shift needs the scheduler's exponential time shift (time_shift_type)")
        return {"mu": math.log(self.timestep_shift)}

    def linear_flow_schedule(self, num_inference_steps: int, image_tokens: int) -> Schedule:
        """The schedule of the flow pipelines that start from sigmas ``linspace(1, 1/N, N)`` and shift them by the
        number of image tokens (FLUX.1, Qwen-Image, Z-Image: ``calculate_shift`` with the scheduler's settings),
        or by :attr:`timestep_shift` when it is set."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config = self.scheduler.config
        sigmas = (
            None
            if config.get("use_flow_sigmas", False)
            else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        )

        def mu() -> float:
            return calculate_shift(
                image_tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )

        shift = self.flow_shift_options(mu)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, **shift)
        return Schedule(timesteps, sigmas=self.scheduler.sigmas.to(self.device))

    def decode(self, latents: Tensor) -> Tensor:
        """Decode latents into images ``[B, 3, H, W]`` float32 in ``[0, 1]``; differentiable.

        Same arithmetic as the pipeline (unscale/shift, ``vae.decode``, ``x / 2 + 0.5`` clamped), in fp32.
        """
        vae_latents = self._latents_to_vae(latents.to(torch.float32))
        images = self.vae.decode(vae_latents, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)

    def _latents_to_vae(self, latents: Tensor) -> Tensor:
        """Undo the latent scaling (and shift) of the family: denoiser space -> VAE space."""
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return latents / config.scaling_factor + shift

    def _vae_to_latents(self, vae_latents: Tensor) -> Tensor:
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (vae_latents - shift) * config.scaling_factor

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Encode images ``[B, 3, H, W]`` in ``[0, 1]`` into denoiser latents (the inverse of :meth:`decode`).

        Args:
            images: float images in ``[0, 1]``.
            generator: for the posterior sample.
            sample: draw from the VAE posterior (as Diffusion-DPO does); ``False`` takes its mode.
        """
        images = images.to(self.device, torch.float32) * 2 - 1
        dist = self.vae.encode(images).latent_dist
        vae_latents = dist.sample(generator) if sample else dist.mode()
        return self._vae_to_latents(vae_latents).to(self.dtype)

    # --- forward process (DPO / SFT) --------------------------------------------------------------------------------

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x_t`` from clean latents: flow ``(1 - sigma) x0 + sigma noise`` with ``sigma = t / 1000``."""
        sigma = self._flow_sigma(timesteps, x0)
        return (1 - sigma) * x0 + sigma * noise

    def training_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The regression target of the family at ``timesteps``: flow velocity ``noise - x0``."""
        return noise - x0

    def _flow_sigma(self, timesteps: Tensor, like: Tensor) -> Tensor:
        sigma = timesteps.to(like.device, torch.float32) / self.scheduler.config.num_train_timesteps
        return sigma.view(-1, *[1] * (like.ndim - 1)).to(like.dtype)

    # --- performance switches ---------------------------------------------------------------------------------------

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the denoiser's activations in backward (less memory, ~30% more compute)."""
        if enabled:
            self.denoiser.enable_gradient_checkpointing()
        else:
            self.denoiser.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: Literal["sdpa", "xformers"] = "sdpa") -> None:
        """PyTorch SDPA (diffusers' default processors) or xformers' memory-efficient attention when installed."""
        if backend == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "attention backend 'xformers' was asked for but xformers is not installed: "
                    "pip install 'diffalign[xformers]', or use attention: sdpa"
                ) from err
            self.pipe.enable_xformers_memory_efficient_attention()
        elif backend != "sdpa":
            raise ValueError(f"unknown attention backend {backend!r}; choose 'sdpa' or 'xformers'")
        # "sdpa": the processors diffusers installs by default already use scaled_dot_product_attention. Resetting
        # them would replace family-specific ones (SD3's joint attention), so nothing is touched.

    # --- LoRA -------------------------------------------------------------------------------------------------------

    def add_lora(
        self,
        rank: int,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        init: Literal["gaussian", "default"] = "gaussian",
        dropout: float = 0.0,
    ) -> list[nn.Parameter]:
        """Wrap the denoiser with a peft LoRA adapter named ``"default"`` and return its trainable parameters.

        Args:
            rank: LoRA rank ``r``.
            alpha: LoRA ``alpha`` (scale ``alpha / r``); default ``rank``.
            target_modules: module-name suffixes to wrap; default the family's :attr:`default_lora_targets`
                (docs/architecture.md#lora-targets).
            init: ``"gaussian"`` (Flow-GRPO, diffusers' training scripts) or peft's ``"default"``; both start with
                ``B = 0``, so the wrapped model initially equals the base.
            dropout: LoRA dropout.
        """
        from peft import LoraConfig

        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank} (rank 0 means full fine-tuning: skip add_lora)")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights=True if init == "default" else init,
            target_modules=list(target_modules or self.default_lora_targets),
            lora_dropout=dropout,
        )
        self.denoiser.add_adapter(config)
        self._restore_adapters()  # active and enabled, also after a negative LoRA left the adapters disabled
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        for p in params:  # LoRA weights train in fp32 even when the base runs in fp16/bf16
            p.data = p.data.float()
        return params

    @property
    def has_lora(self) -> bool:
        """Whether the denoiser carries the trainable ``"default"`` LoRA (a negative LoRA alone does not count)."""
        return "default" in self._peft_adapters()

    def _peft_adapters(self) -> dict[str, Any]:
        if not getattr(self.denoiser, "_hf_peft_config_loaded", False):
            return {}
        return dict(self.denoiser.peft_config)

    def load_negative_lora(self, folder: str | os.PathLike) -> None:
        """Load a diffusers-format LoRA as the ``"negative"`` adapter of CFG's unconditional branch
        (:attr:`negative_lora`; e.g. a Self-NPO run's export). It never trains and acts in no other call."""
        if self.guidance_embedded:
            raise ValueError(
                f"{self.family} takes its guidance as an input and samples without CFG, so it has no unconditional "
                "branch for a negative LoRA"
            )
        folder = Path(folder)
        if not (folder / LORA_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"no LoRA weights at {folder / LORA_WEIGHTS_NAME}")
        if NEGATIVE_ADAPTER in self._peft_adapters():
            self.denoiser.delete_adapters(NEGATIVE_ADAPTER)
        self.denoiser.load_lora_adapter(
            str(folder), prefix=self.denoiser_name, adapter_name=NEGATIVE_ADAPTER, weight_name=LORA_WEIGHTS_NAME
        )
        self.negative_lora = NEGATIVE_ADAPTER
        self._restore_adapters()

    def _restore_adapters(self) -> None:
        """The adapters' normal state: ``"default"`` alone active (off inside :meth:`lora_disabled`), a negative
        adapter inactive and frozen."""
        adapters = self._peft_adapters()
        if not adapters:
            return
        if "default" in adapters:
            self.denoiser.set_adapter("default")  # peft also sets requires_grad: default trains, others not
            if self._lora_off_depth:
                self.denoiser.disable_adapters()
            else:
                self.denoiser.enable_adapters()
        else:
            self.denoiser.disable_adapters()
        for name, p in self.denoiser.named_parameters():
            if f".{NEGATIVE_ADAPTER}." in name:
                p.requires_grad_(False)

    @contextlib.contextmanager
    def _adapters_on(self, negative: bool) -> Iterator[None]:
        """One half of CFG with a negative LoRA (:attr:`negative_lora`): the positive model's adapters (``"default"``
        unless it is the negative one or :meth:`lora_disabled` holds it off), plus the negative one when
        ``negative``."""
        names = [] if self._lora_off_depth or self.negative_lora == "default" or not self.has_lora else ["default"]
        if negative and not (self.negative_lora == "default" and self._lora_off_depth):  # lora_disabled: the base
            names.append(self.negative_lora)
        if names:
            self.denoiser.enable_adapters()
            self.denoiser.set_adapter(names if len(names) > 1 else names[0])
        else:
            self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self._restore_adapters()

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Run the base model (the reference policy) inside the block; a no-op without LoRA. Blocks nest: the
        LoRA comes back when the outermost one ends."""
        outermost = self.has_lora and not self._lora_off_depth
        if outermost:
            self.denoiser.disable_adapters()
        self._lora_off_depth += 1
        try:
            yield
        finally:
            self._lora_off_depth -= 1
            if outermost:
                self.denoiser.enable_adapters()

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The LoRA weights, peft keys (``...to_q.lora_A.weight``) without the ``{denoiser}.`` prefix.

        This is the layout diffusers' own training scripts save and every pipeline's ``load_lora_weights`` reads.
        """
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("this adapter has no LoRA; call add_lora first")
        return get_peft_model_state_dict(self.denoiser)

    def save_lora(self, folder: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Save the LoRA in diffusers format, so that ``pipe.load_lora_weights(folder)`` loads it.

        Writes ``pytorch_lora_weights.safetensors`` with the rank/alpha metadata.

        Args:
            folder: output folder (created).
            state_dict: weights to save instead of the live ones (e.g. EMA weights), same keys.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = state_dict if state_dict is not None else self.lora_state_dict()
        weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        config = self.denoiser.peft_config["default"].to_dict()
        type(self.pipe).save_lora_weights(
            folder,
            **{f"{self.denoiser_name}_lora_layers": weights, f"{self.denoiser_name}_lora_adapter_metadata": config},
        )
        # How the LoRA is meant to be sampled: where it acts, and the schedule shift it was trained with.
        scope = {
            "min_timestep": self.lora_min_timestep,
            "max_timestep": self.lora_max_timestep,
            "timestep_shift": self.timestep_shift,
        }
        scope = {key: value for key, value in scope.items() if value is not None}
        if scope:
            (folder / LORA_SCOPE_NAME).write_text(json.dumps(scope) + "\n")
        else:
            (folder / LORA_SCOPE_NAME).unlink(missing_ok=True)
        return folder

    def load_lora(self, folder: str | os.PathLike) -> list[nn.Parameter]:
        """Load a diffusers-format LoRA (as written by :meth:`save_lora`) as the trainable ``"default"`` adapter."""
        folder = Path(folder)
        if not (folder / LORA_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"no LoRA weights at {folder / LORA_WEIGHTS_NAME}")
        if self.has_lora:
            self.denoiser.delete_adapters("default")
        self.denoiser.load_lora_adapter(
            str(folder), prefix=self.denoiser_name, adapter_name="default", weight_name=LORA_WEIGHTS_NAME
        )
        self._restore_adapters()
        scope_file = folder / LORA_SCOPE_NAME
        scope = json.loads(scope_file.read_text()) if scope_file.is_file() else {}
        self.lora_min_timestep = scope.get("min_timestep")
        self.lora_max_timestep = scope.get("max_timestep")
        self.timestep_shift = scope.get("timestep_shift")
        params = []
        for name, p in self.denoiser.named_parameters():
            if "lora_" in name and f".{NEGATIVE_ADAPTER}." not in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
        return params
