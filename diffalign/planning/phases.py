"""What each trainer holds: the resident items of every run and the phases of a GRPO, reward-backprop and DPO step.

Every item mirrors the code that allocates it; the names of the trainer functions are given where it matters.
Sharded items (FSDP2) are divided by the number of GPUs; steady state is planned (gradients of the previous
micro-batch exist during a backward, optimizer states exist from the first step on).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffalign.planning.costs import Cost, Mode
from diffalign.planning.plan import Item, MemoryPlan, Phase, PlanInputs, buffer_bytes, parameter_count
from diffalign.planning.reward_models import reward_terms


__all__ = ["plan_config"]


def plan_config(s: PlanInputs) -> MemoryPlan:
    """The plan of ``s.config`` (its ``method`` picks the phases)."""
    builders = {"grpo": _grpo_phases, "reward_backprop": _backprop_phases, "diffusion_dpo": _dpo_phases}
    method = s.config.method
    if method not in builders:
        raise ValueError(f"the planner knows the methods {', '.join(builders)}, not {method!r}")
    if s.shards > 1 and (s.config.optim.optimizer == "adafactor" or s.config.optim.use_8bit_adam):
        s.notes.append("FSDP2 refuses Adafactor and 8-bit AdamW (they need whole tensors): use optim.optimizer: adamw")
    resident = _resident(s)
    phases = builders[method](s)
    if s.config.eval.every > 0:
        phases.append(_evaluation(s))
    return MemoryPlan(
        method=method,
        model=s.spec.label,
        settings=s.settings,
        resident=resident,
        phases=phases,
        activations=dict(s.activations),
        notes=s.notes,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Resident items
# ---------------------------------------------------------------------------------------------------------------------


def _gb_params(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _sharded(s: PlanInputs) -> str:
    return f", / {s.shards} GPUs (fsdp2)" if s.shards > 1 else ""


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def _resident(s: PlanInputs) -> list[Item]:
    items = [_denoiser_weights(s), _optimizer_state(s)]
    if s.config.ema.enabled:
        items.append(Item("EMA", s.shard(4 * s.trainable), f"fp32 copy of the trained weights{_sharded(s)}"))
    items += [_reference(s), *_frozen_modules(s), _rewards(s)]
    return [item for item in items if item is not None]


def _denoiser_weights(s: PlanInputs) -> Item:
    denoiser = s.spec.denoiser
    if s.lora:
        nbytes = s.base * s.compute.itemsize + 4 * s.trainable
        detail = f"{_gb_params(s.base)} {_dtype_name(s.compute)} + LoRA {_gb_params(s.trainable)} fp32"
        buffers = buffer_bytes(denoiser, s.compute.itemsize)
    else:
        nbytes, buffers = 4 * s.base, buffer_bytes(denoiser, 4)
        detail = f"{_gb_params(s.base)} fp32 master weights"
    return Item("denoiser weights", s.shard(nbytes) + buffers, detail + _sharded(s))


def _optimizer_state(s: PlanInputs) -> Item:
    optim = s.config.optim
    if optim.optimizer == "adafactor":
        # transformers' Adafactor without beta1: factored second moments (a row and a column vector) for >= 2-D
        # weights, a full one for the rest.
        numel = sum(_adafactor_numel(p.shape) for p in s.model.parameters() if p.requires_grad)
        return Item("optimizer state", s.shard(4 * numel), "Adafactor factored second moments" + _sharded(s))
    if optim.use_8bit_adam:
        # bitsandbytes keeps 8-bit states for tensors of >= 4096 elements, 32-bit ones for smaller tensors.
        nbytes = sum((2 if n >= 4096 else 8) * n for n in s.trained_sizes)
        return Item("optimizer state", s.shard(nbytes), "8-bit AdamW: 2 uint8 states" + _sharded(s))
    return Item("optimizer state", s.shard(8 * s.trainable), "AdamW: 2 fp32 states" + _sharded(s))


def _adafactor_numel(shape: torch.Size) -> int:
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def _needs_reference(s: PlanInputs) -> bool:
    """A frozen copy of the denoiser: full fine-tuning with GRPO's KL (beta > 0) or the DPO loss."""
    config = s.config
    if s.lora:
        return False
    if config.method == "grpo":
        return config.train.beta > 0
    return config.method == "diffusion_dpo" and config.dpo.loss == "dpo"


def _offloaded(s: PlanInputs) -> bool:
    return s.config.method == "diffusion_dpo" and s.config.dpo.offload_frozen


def _reference(s: PlanInputs) -> Item | None:
    if not _needs_reference(s):
        return None
    if _offloaded(s):
        return Item("reference copy", 0, "in CPU memory (dpo.offload_frozen)")
    nbytes = s.shard(4 * s.base) + buffer_bytes(s.spec.denoiser, 4)
    return Item("reference copy", nbytes, f"frozen fp32 copy of the denoiser{_sharded(s)}")


def _released_text_encoders(s: PlanInputs) -> bool:
    sampling = getattr(s.config, "sampling", None)
    cached = sampling is not None and getattr(sampling, "precompute_text_embeddings", False)
    return cached and s.config.model.offload_text_encoders != "keep"


def _module_bytes(module: nn.Module, float_bytes: int) -> int:
    return parameter_count(module) * float_bytes + buffer_bytes(module, float_bytes)


def _text_encoders(s: PlanInputs) -> Item:
    names = s.spec.text_encoder_names
    if _offloaded(s):
        return Item("text encoders", 0, "in CPU memory (dpo.offload_frozen)")
    if _released_text_encoders(s):
        mode = s.config.model.offload_text_encoders
        return Item("text encoders", 0, f"released after caching the prompts (offload_text_encoders: {mode})")
    count = sum(parameter_count(s.spec.modules[n]) for n in names)
    dtype = "fp32" if s.load_bytes == 4 else _dtype_name(s.compute)
    nbytes = sum(_module_bytes(s.spec.modules[n], s.load_bytes) for n in names)
    return Item("text encoders", nbytes, f"{_gb_params(count)} {dtype} ({', '.join(names)})")


def _frozen_modules(s: PlanInputs) -> list[Item]:
    """The text encoders, the fp32 VAE and any other component (SD1.5's safety checker, which ``from_pretrained``
    loads and the adapter moves to the device)."""
    vae = s.spec.vae
    items = [
        _text_encoders(s),
        Item("VAE", 0 if _offloaded(s) else _module_bytes(vae, 4), _gb_params(parameter_count(vae)) + " fp32"),
    ]
    for name in s.spec.other_names:
        module = s.spec.modules[name]
        nbytes = _module_bytes(module, s.load_bytes)
        items.append(Item(name.replace("_", " "), nbytes, _gb_params(parameter_count(module))))
    return items


def _loads_reward(s: PlanInputs) -> bool:
    """GRPO and reward backprop score with the reward; DPO only evaluates with it (loaded at the first score)."""
    return s.config.method != "diffusion_dpo" or (s.config.eval.every > 0 and s.config.reward is not None)


def _rewards(s: PlanInputs) -> Item | None:
    if not _loads_reward(s):
        return None
    nbytes, parts = 0, []
    for name, model, size, known in reward_terms(s.config.reward):
        if not known:
            s.notes.append(f"reward {name!r}: its model size is unknown to the planner and not counted")
        elif model is not None:
            nbytes += round(model.parameters * size)
            parts.append(f"{name} {_gb_params(model.parameters)} {'fp32' if size == 4 else '16-bit'}")
    return Item("reward models", nbytes, ", ".join(parts) or "none with weights")


# ---------------------------------------------------------------------------------------------------------------------
# Items of the phases
# ---------------------------------------------------------------------------------------------------------------------


def _image_hw(s: PlanInputs, resolution: int | None) -> tuple[int, int]:
    side = resolution or s.spec.default_resolution
    return side, side


def _guided(s: PlanInputs, guidance_scale: float) -> int:
    """Rows per sample of a denoiser call: two with a CFG batch, one with a guidance embedding or guidance <= 1."""
    return 2 if guidance_scale > 1 and not s.spec.guidance_embedded else 1


def _gradients(s: PlanInputs) -> list[Item]:
    items = [Item("gradients", s.shard(4 * s.trainable), f"fp32, one per trained weight{_sharded(s)}")]
    if s.settings.sharding == "ddp" and s.settings.gpus > 1:
        # DistributedDataParallel's reducer keeps its own flat gradient buckets (gradient_as_bucket_view=False).
        items.append(Item("DDP gradient buckets", 4 * s.trainable, "fp32 all-reduce buffers"))
    return items


def _fsdp_units(model: nn.Module) -> tuple[int, int, int]:
    """``(largest unit's parameters, root parameters, largest unit's trained parameters)`` when every module of a
    ``_no_split_modules`` class is its own FSDP2 unit (accelerate's transformer-based wrap policy)."""
    classes = set(getattr(type(model), "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in classes]
    owner: dict[int, int] = {}
    for index, unit in enumerate(units):  # modules() is pre-order: an inner unit overwrites its outer one
        for param in unit.parameters():
            owner[id(param)] = index
    sizes, trained = [0] * len(units), [0] * len(units)
    root = 0
    for param in model.parameters():
        index = owner.get(id(param))
        if index is None:
            root += param.numel()
            continue
        sizes[index] += param.numel()
        trained[index] += param.numel() if param.requires_grad else 0
    if not units:
        return 0, root, 0
    largest = max(range(len(units)), key=sizes.__getitem__)
    return sizes[largest], root, trained[largest]


def _fsdp_gathered(s: PlanInputs, backward: bool) -> list[Item]:
    """FSDP2 all-gathers one unit at a time (and prefetches the next) in the compute dtype; the root unit stays
    gathered through the forward; backward reduce-scatters each unit's full fp32 gradients."""
    if s.shards == 1:
        return []
    unit, root, trained = _fsdp_units(s.model)
    nbytes = (2 * unit + root) * s.compute.itemsize + (4 * trained if backward else 0)
    return [Item("FSDP2 gathered units", nbytes, "2 blocks + root unsharded" + (" + block grads" if backward else ""))]


def _autocast_copies(s: PlanInputs) -> list[Item]:
    """Full fine-tuning under autocast casts every fp32 weight to the compute dtype once per forward and keeps the
    copies until backward (FSDP2's mixed-precision policy gathers in that dtype instead)."""
    if s.lora or s.compute == torch.float32 or s.shards > 1:
        return []
    return [Item("autocast weight copies", s.base * s.compute.itemsize, f"{_dtype_name(s.compute)} casts")]


def _training_activations(s: PlanInputs, image_hw: tuple, rows: int, checkpointing: bool, reference: bool) -> int:
    """The training call's activations; with a reference forward (no grad) after the policy's, before backward."""
    cost = s.cost("checkpointed" if checkpointing else "grad", image_hw, rows)
    if not reference:
        return cost.peak
    ref = s.cost("no_grad", image_hw, rows)
    return max(cost.peak, cost.retained + ref.peak)


def _record_activations(s: PlanInputs, image_hw: tuple, rows: int, reference: bool) -> int:
    """Both checkpointing settings into ``s.activations``; returns the configured one."""
    values = {on: _training_activations(s, image_hw, rows, on, reference) for on in (True, False)}
    s.activations = {"checkpointing on": values[True], "checkpointing off": values[False]}
    return values[s.config.gradient_checkpointing]


def _optimizer_transient(s: PlanInputs) -> Item:
    """Temporaries of one optimizer step: CUDA AdamW runs multi-tensor (one fp32 temporary the size of the local
    states, ``torch._foreach_sqrt``); tensor by tensor (CPU, Adafactor) the largest tensor's temporaries."""
    largest = max(s.trained_sizes, default=0)
    optim = s.config.optim
    if optim.optimizer == "adafactor":
        return Item("optimizer step", 4 * 2 * largest, "Adafactor's update of the largest tensor")
    if optim.use_8bit_adam:
        return Item("optimizer step", 0, "bitsandbytes updates in place")
    if s.settings.device == "cuda":
        return Item("optimizer step", s.shard(4 * s.trainable), "multi-tensor AdamW temporaries")
    return Item("optimizer step", 4 * 2 * largest, "AdamW temporaries of the largest tensor")


def _reward_cost(s: PlanInputs, images: int, mode: Mode) -> Cost:
    total = Cost()
    for name, model, size, _ in reward_terms(s.config.reward):
        if model is not None:
            dtype = torch.float32 if size == 4 else torch.bfloat16
            total += s.planner.tower_cost(name, model.vision, dtype, mode).scaled(images)
    return total


def _text_encoding(s: PlanInputs, prompts: int) -> int:
    """The text encoders' forward on ``prompts`` prompts (no grad; the encoders run one after the other)."""
    dtype = torch.float32 if s.load_bytes == 4 else s.compute
    length = s.config.model.max_sequence_length
    names = s.spec.text_encoder_names
    return max((s.planner.text_cost(name, dtype, length, prompts).peak for name in names), default=0)


def _sampling(s: PlanInputs, image_hw: tuple, rows: int, images: int, prompts: int) -> Item:
    """The largest of one step's moments: encoding ``prompts`` prompts (0 when the text cache answers), a no-grad
    denoiser call on ``rows`` rows, the decode of ``images`` images."""
    text = _text_encoding(s, prompts) if prompts else 0
    denoise = s.cost("no_grad", image_hw, rows).peak
    decode = s.planner.vae_cost("decode", image_hw, "no_grad").scaled(images).peak
    moments = [f"denoiser x {rows} rows", f"decoding {images} images"]
    if prompts:
        moments.append(f"encoding {prompts} prompts")
    return Item("sampling activations", max(text, denoise, decode), "largest of: " + ", ".join(moments))


def _uses_text_cache(s: PlanInputs) -> bool:
    sampling = getattr(s.config, "sampling", None)
    return sampling is not None and getattr(sampling, "precompute_text_embeddings", False)


def _caching_prompts(s: PlanInputs) -> Phase | None:
    """The start of a run with ``sampling.precompute_text_embeddings``: every prompt is encoded, 16 at a time
    (``adapter.precompute_text_embeddings``), while the text encoders are still on the device."""
    if not _uses_text_cache(s):
        return None
    items = [Item("text encoding", _text_encoding(s, 16), "16 prompts at a time, no grad")]
    if _released_text_encoders(s):
        nbytes = sum(_module_bytes(s.spec.modules[n], s.load_bytes) for n in s.spec.text_encoder_names)
        items.append(Item("text encoders", nbytes, "on the device until every prompt is cached"))
    return Phase("caching prompts", tuple(items))


def _evaluation(s: PlanInputs) -> Phase:
    """Evaluation rollouts (no grad) with the EMA weights swapped in (a backup of the live ones is kept)."""
    config, image_hw = s.config, _image_hw(s, _resolution(s))
    sampling = getattr(config, "sampling", None)
    guidance = config.eval.guidance_scale or (sampling.guidance_scale if sampling is not None else 1.0)
    batch = config.eval.batch_size
    prompts = 0 if _uses_text_cache(s) else batch
    items = [_sampling(s, image_hw, batch * _guided(s, guidance), batch, prompts)]
    if config.ema.enabled:
        items.append(Item("EMA swap backup", s.shard(4 * s.trainable), "live weights kept during evaluation"))
    if _loads_reward(s):
        items.append(Item("reward scoring", _reward_cost(s, batch, "no_grad").peak, f"{batch} images, no grad"))
    return Phase("evaluation", tuple(items + _fsdp_gathered(s, backward=False)))


def _resolution(s: PlanInputs) -> int | None:
    if s.config.method == "diffusion_dpo":
        return s.config.data.resolution
    return s.config.sampling.resolution


# ---------------------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------------------


def _grpo_geometry(s: PlanInputs) -> dict[str, int]:
    """Local images, stored and trained steps per sample, and re-scoring rows of one GRPO epoch (as
    ``GRPOTrainer.sample_epoch``, ``epoch_plans`` and ``rescore_chunk`` compute them)."""
    from diffalign.samplers.branching import count_tree_edges
    from diffalign.samplers.plan import union_plan
    from diffalign.trainers.grpo import build_plan, build_tree_plan

    config = s.config
    sampling, train = config.sampling, config.train
    local = math.ceil(sampling.prompts_per_epoch * sampling.images_per_prompt / s.settings.gpus)
    kernel = sampling.kernel if sampling.kernel != "auto" else ("sde" if s.spec.family in ("sd3", "flux") else "ddim")
    chunks = math.ceil(local / sampling.batch_size)
    keys = [(0, c) for c in range(chunks)] if sampling.plan == "window" and sampling.window_draw == "per_chunk" else []
    plans = [build_plan(sampling, kernel, 0, config.seed, key) for key in keys or [()]]
    stored, trained = len(union_plan(plans).stored), len(plans[0].trained)
    if sampling.plan == "branch_at":  # rows: (seed, child), one stored transition per branch step
        local *= sampling.branch_children
    elif sampling.plan == "tree":  # rows: a tree's stochastic edges, one transition each
        local = math.ceil(sampling.prompts_per_epoch / s.settings.gpus) * count_tree_edges(
            build_tree_plan(sampling, kernel)
        )
        stored = trained = 1
    rows_per_step = train.batch_size * (2 if train.cfg and _guided(s, sampling.guidance_scale) == 2 else 1)
    if train.timestep_chunk == "auto":
        chunk = max(1, min(trained, train.max_rescore_rows // rows_per_step))
    else:
        chunk = train.timestep_chunk or trained
    return {"local": local, "stored": stored, "trained": trained, "rows": rows_per_step * min(chunk, trained)}


def _conditioning_numel(s: PlanInputs) -> int:
    """Elements of one prompt's conditioning (what the adapter's ``encode_prompt`` returns for one prompt)."""
    config = s.spec.denoiser.config
    tokens = s.text_length()
    if s.spec.denoiser_name == "unet":
        pooled = 0
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim + 6
        return tokens * config.cross_attention_dim + pooled
    return tokens * config.joint_attention_dim + config.pooled_projection_dim


def _rollout_store(s: PlanInputs, geometry: dict[str, int], image_hw: tuple) -> Item:
    """The epoch's trajectory (``rollout``'s ``Trajectory``, on the device until training ends): fp32 latents
    entering and leaving each stored step (and their means for GRPO-Guard), the final latents, the decoded images,
    each image's own copy of its conditioning (with CFG's negative half), in the adapter's dtype."""
    sampling, stored = s.config.sampling, geometry["stored"]
    h, w = image_hw
    latent = s.spec.vae.config.latent_channels * (h // s.spec.vae_scale_factor) * (w // s.spec.vae_scale_factor)
    latents = 2 * stored + 1 + (stored if s.config.train.ratio_guard == "grpo_guard" else 0)
    cond = _conditioning_numel(s) * _guided(s, sampling.guidance_scale) * s.load_bytes
    per_image = 4 * (latents * latent + 3 * h * w + stored) + cond
    detail = f"{geometry['local']} images x ({latents} latents, image, conditioning)"
    return Item("rollout store", geometry["local"] * per_image, detail)


def _rollout_prompts(sampling: Any, local: int) -> int:
    """Distinct prompts a process's rollout encodes at once: its images' groups (a group may span two processes)."""
    group = sampling.images_per_prompt
    spanning = 1 if local % group else 0
    return min(sampling.prompts_per_epoch, math.ceil(local / group) + spanning)


def _grpo_phases(s: PlanInputs) -> list[Phase]:
    config = s.config
    sampling, image_hw = config.sampling, _image_hw(s, config.sampling.resolution)
    geometry = _grpo_geometry(s)
    store = _rollout_store(s, geometry, image_hw)
    rows = sampling.batch_size * _guided(s, sampling.guidance_scale)
    scoring = _reward_cost(s, sampling.batch_size, "no_grad").peak
    prompts = 0 if _uses_text_cache(s) else _rollout_prompts(sampling, geometry["local"])
    rollout = [
        store,
        _sampling(s, image_hw, rows, sampling.batch_size, prompts),
        Item("reward scoring", scoring, f"{sampling.batch_size} images, no grad, while the next chunk samples"),
    ]
    activations = _record_activations(s, image_hw, geometry["rows"], reference=config.train.beta > 0)
    detail = f"{geometry['rows']} rows per re-scoring call" + (" + reference forward" if config.train.beta > 0 else "")
    training = [
        store,
        *_gradients(s),
        Item("activations", activations, detail),
        *_autocast_copies(s),
        *_fsdp_gathered(s, backward=True),
    ]
    optimizer = [store, *_gradients(s), _optimizer_transient(s)]
    phases = [
        _caching_prompts(s),
        Phase("rollout", tuple(rollout + _fsdp_gathered(s, backward=False))),
        Phase("training", tuple(training)),
        Phase("optimizer step", tuple(optimizer)),
    ]
    return [phase for phase in phases if phase is not None]


# ---------------------------------------------------------------------------------------------------------------------
# Reward backprop
# ---------------------------------------------------------------------------------------------------------------------


def _grad_steps(s: PlanInputs) -> int:
    """Denoiser calls with grad per trajectory: K (the largest K a random truncation plausibly draws)."""
    backprop, steps = s.config.backprop, s.config.sampling.num_steps
    if backprop.mode in ("draft_lv", "refl"):
        return 1
    if backprop.mode == "draft_k" or backprop.truncation == "fixed":
        return backprop.k
    if backprop.truncation == "uniform":
        return min(backprop.uniform_range[1], steps - 1)
    return min(steps - 1, math.ceil(backprop.gaussian_mean + 2 * backprop.gaussian_std))


def _backprop_activations(s: PlanInputs, image_hw: tuple, checkpointing: bool) -> int:
    """The reward-backprop step's activations (``RewardBackpropTrainer.micro_batch_loss``): K grad calls, the
    decode and the reward's image tower; with ``gradient_checkpointing`` each call and the decode keep only their
    inputs and are recomputed one at a time in backward (per block too with ``backprop.checkpoint_blocks``)."""
    config = s.config
    sampling, backprop = config.sampling, config.backprop
    copies = backprop.num_renoise if backprop.mode == "draft_lv" else 1
    images = sampling.batch_size * copies
    rows = images * _guided(s, sampling.guidance_scale)
    steps = _grad_steps(s)
    blocks = checkpointing and backprop.checkpoint_blocks
    call = s.cost("checkpointed" if blocks else "grad", image_hw, rows)
    decode = s.planner.vae_cost("decode", image_hw, "grad").scaled(images)
    reward = _reward_cost(s, images, "grad")
    prompts = 0 if _uses_text_cache(s) else sampling.batch_size
    sampling_peak = max(s.cost("no_grad", image_hw, rows).peak, _text_encoding(s, prompts) if prompts else 0)
    if checkpointing:
        h, w = image_hw
        inputs = 4 * rows * s.spec.vae.config.latent_channels * h * w // s.spec.vae_scale_factor**2
        return max(sampling_peak, steps * inputs + max(reward.peak, decode.peak, call.peak))
    held = steps * call.retained
    return max(
        sampling_peak,
        held + decode.retained + reward.peak,
        held + decode.peak,
        held - call.retained + call.peak,
    )


def _backprop_phases(s: PlanInputs) -> list[Phase]:
    image_hw = _image_hw(s, s.config.sampling.resolution)
    values = {on: _backprop_activations(s, image_hw, on) for on in (True, False)}
    s.activations = {"checkpointing on": values[True], "checkpointing off": values[False]}
    detail = f"K = {_grad_steps(s)} grad calls, decode and reward with grad"
    training = [
        *_gradients(s),
        Item("activations", values[s.config.gradient_checkpointing], detail),
        *_autocast_copies(s),
        *_fsdp_gathered(s, backward=True),
    ]
    phases = [
        _caching_prompts(s),
        Phase("training", tuple(training)),
        Phase("optimizer step", (*_gradients(s), _optimizer_transient(s))),
    ]
    return [phase for phase in phases if phase is not None]


# ---------------------------------------------------------------------------------------------------------------------
# Diffusion-DPO
# ---------------------------------------------------------------------------------------------------------------------


def _dpo_phases(s: PlanInputs) -> list[Phase]:
    config = s.config
    image_hw = _image_hw(s, config.data.resolution)
    dpo = config.dpo.loss == "dpo"
    images = config.data.batch_size * (2 if dpo else 1)  # winner and loser through the same calls
    h, w = image_hw
    encode = s.planner.vae_cost("encode", image_hw, "no_grad").scaled(images).peak + 4 * images * 3 * h * w
    if _offloaded(s):  # cpu_offload brings the VAE's weights over for its forward
        encode += _module_bytes(s.spec.vae, 4)
    # Each step encodes its captions (DPO keeps its text encoders), after the images.
    text = _text_encoding(s, config.data.batch_size)
    activations = _record_activations(s, image_hw, images, reference=dpo)
    detail = f"{images} rows (winner + loser)" + (" + reference forward" if dpo else "")
    training = [
        *_gradients(s),
        Item("activations", activations, detail),
        *_autocast_copies(s),
        *_fsdp_gathered(s, backward=True),
    ]
    return [
        Phase(
            "encoding",
            (
                *_gradients(s),
                Item("VAE or text encoders", max(encode, text), f"{images} images, or the captions, no grad"),
            ),
        ),
        Phase("training", tuple(training)),
        Phase("optimizer step", (*_gradients(s), _optimizer_transient(s))),
    ]
