"""The one sampling loop: every trainer and every evaluation samples through :func:`rollout`.

A rollout runs ``plan.num_steps`` denoiser calls over prompts x ``num_images_per_prompt`` images. Each step uses
the plan's stochastic kernel where its noise level is > 0 and the ODE step elsewhere (see :mod:`.plan`), in fp32;
the transitions of the plan's *stored* steps are kept with their log-probs in a :class:`Trajectory`.
:func:`transition_log_probs` scores stored transitions again under the current parameters (the PPO ratio), with
the same guidance scale and the same kernel.

Reproducibility: image ``i`` owns a generator seeded with ``seeds[i]``; its initial noise and every stochastic
step's noise come from it, so results do not depend on the chunk size. With ``same_noise_per_prompt`` all images
of a prompt start from the noise of the group's first image (Flow-GRPO's ``same_latent``, :class:`InitialNoise`),
and differ only by the SDE noise.

Reward backprop uses the same loop: a :class:`GradientPath` names the steps whose denoiser call keeps its graph
(optionally under activation checkpointing), the others run without grad, and the decode keeps the graph when any
step does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from diffalign.adapters.base import Conditioning, DiffusionAdapter, Schedule
from diffalign.samplers.plan import StepPlan, union_plan
from diffalign.samplers.steps import (
    KERNELS,
    StepOutput,
    ddim_step,
    dpm_solver_2m_step,
    ode_step,
    predict_x0,
    widened_step,
)


__all__ = [
    "GradientPath",
    "InitialNoise",
    "Trajectory",
    "encode_prompts",
    "make_generators",
    "prompt_conditioning",
    "rollout",
    "step_stds",
    "step_transition",
    "text_use",
    "transition_log_probs",
]


@dataclass(frozen=True)
class GradientPath:
    """Which denoiser calls of a rollout keep their graph (reward backprop); by default none do.

    Attributes:
        steps: step indices whose denoiser call runs with grad; the decode then keeps the graph too.
        checkpointing: recompute those calls' activations (and the decode's) in backward instead of storing them.
    """

    steps: frozenset[int] = frozenset()
    checkpointing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", frozenset(int(step) for step in self.steps))


@dataclass(frozen=True)
class InitialNoise:
    """Where the images' starting noise comes from when not from each image's own seed.

    Attributes:
        same_per_prompt: every image of a prompt starts from the noise of the prompt's first image (Flow-GRPO's
            ``same_latent``).
        seeds: the seed of each image's starting noise (equal seeds, equal noise: e.g. a group spread over
            processes that shares its noise).
    """

    same_per_prompt: bool = False
    seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.same_per_prompt == (self.seeds is not None):
            raise ValueError("InitialNoise takes same_per_prompt=True or seeds=..., exactly one of them")
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))

    def resolve(self, seeds: list[int], num_images_per_prompt: int) -> list[int]:
        """The starting-noise seed of each of the ``len(seeds)`` images (prompt-major)."""
        if self.seeds is None:
            return [seeds[i - i % num_images_per_prompt] for i in range(len(seeds))]
        if len(self.seeds) != len(seeds):
            raise ValueError(f"got {len(self.seeds)} initial noise seeds for {len(seeds)} images")
        return list(self.seeds)


@dataclass
class Trajectory:
    """What a rollout returns. ``B`` images, ``S = len(plan.stored)`` stored steps.

    Attributes:
        prompts: ``[B]`` the prompt of each image (prompt-major: all images of prompt 0 first).
        prompt_ids: ``[B]`` index of each image's prompt in the unique prompt list (the group id).
        conditioning: ``[B]`` the text conditioning each image was sampled with (reused for re-scoring).
        seeds: ``[B]`` the seed of each image's generator.
        step_indices: ``[S]`` plan indices of the stored steps.
        timesteps: ``[S]`` denoiser timesteps of the stored steps.
        latents: ``[B, S, ...]`` fp32 latents entering each stored step.
        next_latents: ``[B, S, ...]`` fp32 latents each stored step produced.
        log_probs: ``[B, S]`` fp32 log-probs of the stored transitions at sampling time.
        final_latents: ``[B, ...]`` latents after the last step that ran.
        images: ``[B, 3, H, W]`` decoded images in ``[0, 1]``, or ``None`` when not decoded.
        guidance_scale: the CFG scale used (re-scoring must use the same).
        plan: the step plan sampled with.
        schedule: the timestep schedule sampled with.
        means: ``[B, S, ...]`` fp32 means of the stored transitions at sampling time (GRPO-Guard's ``mu_old``), or
            ``None`` unless the rollout was asked to store them.
        trained_steps: ``[B, n]`` int64 plan indices of each image's own trained steps when the chunks were sampled
            with plans of their own (``plan`` is then their :func:`~diffalign.samplers.plan.union_plan`; at a stored
            step outside an image's own plan the transition was deterministic and its log-prob is NaN); ``None``
            when every image has ``plan.trained``.
        row_steps: ``[B, S]`` int64 plan index of each row's own step at each stored position, when rows differ
            (a tree rollout's edges, :mod:`~diffalign.samplers.branching`); ``None``: ``step_indices`` for every row.
    """

    prompts: list[str]
    prompt_ids: Tensor
    conditioning: Conditioning
    seeds: list[int]
    step_indices: tuple[int, ...]
    timesteps: Tensor
    latents: Tensor
    next_latents: Tensor
    log_probs: Tensor
    final_latents: Tensor
    images: Tensor | None
    guidance_scale: float
    plan: StepPlan
    schedule: Schedule
    means: Tensor | None = None
    trained_steps: Tensor | None = None
    row_steps: Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def steps_at(self, positions: Tensor, samples: slice | Tensor | None = None) -> Tensor:
        """Plan step indices of stored ``positions`` (int64 ``[b, n]``) of the rows ``samples`` (default all)."""
        if self.row_steps is not None:
            rows = self.row_steps[slice(None) if samples is None else samples]
            return rows.gather(1, positions.to(rows.device))
        return torch.tensor(self.step_indices, dtype=torch.long)[positions]

    @property
    def trained_positions(self) -> list[int]:
        """Positions in the stored axis ``S`` of the plan's trained steps (with per-chunk plans, of their union's:
        each image's own steps are ``trained_steps``)."""
        return [self.step_indices.index(i) for i in self.plan.trained]


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per image."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


TextUse = tuple[list[str], str | None, bool]
"""``(prompts, negative_prompt, with_negative)``: how prompts are encoded, the key of a text-embedding cache entry."""


def text_use(prompts: Sequence[str], guidance_scale: float, negative_prompt: str | None = None) -> TextUse:
    """How :func:`rollout` encodes ``prompts`` at ``guidance_scale``: the CFG branch is built only above 1. A trainer
    precomputing text embeddings asks for the same (``adapter.precompute_text_embeddings(*use)``)."""
    return list(prompts), negative_prompt, guidance_scale > 1


def encode_prompts(
    adapter: DiffusionAdapter, prompts: Sequence[str], with_negative: bool, negative_prompt: str | None = None
) -> tuple[list[str], Conditioning]:
    """Encode each distinct prompt once; returns ``(unique_prompts, conditioning [U])`` in first-seen order."""
    unique = list(dict.fromkeys(prompts))
    return unique, adapter.encode_prompt(unique, negative_prompt=negative_prompt, with_negative=with_negative)


def prompt_conditioning(
    adapter: DiffusionAdapter,
    prompts: Sequence[str],
    guidance_scale: float,
    negative_prompt: str | None = None,
    conditioning: Conditioning | None = None,
) -> Conditioning:
    """``[P]`` conditioning of ``prompts`` as :func:`rollout` encodes them at ``guidance_scale`` (each distinct prompt
    once), or the given ``conditioning`` after checking its batch."""
    if conditioning is not None:
        if len(conditioning) != len(prompts):
            raise ValueError(f"conditioning has batch {len(conditioning)} for {len(prompts)} prompts")
        return conditioning
    _, negative, with_negative = text_use(prompts, guidance_scale, negative_prompt)
    unique, unique_cond = encode_prompts(adapter, prompts, with_negative, negative)
    return unique_cond[[unique.index(p) for p in prompts]]


def step_transition(
    adapter: DiffusionAdapter,
    plan: StepPlan,
    schedule: Schedule,
    index: int | Sequence[int],
    model_output: Tensor,
    sample: Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_x0: Tensor | None = None,
) -> StepOutput:
    """Step ``index`` of ``plan`` from ``sample`` given the model output; scores ``prev_sample`` when given.

    Stochastic steps use ``KERNELS[plan.kernel]`` with ``plan.noise_levels[index]``; deterministic ones the ODE
    step (Euler / DDIM eta=0, or DPM-Solver++(2M) with ``prev_x0``, the previous step's x0 prediction).
    ``index`` may also hold one stochastic step index per row of the batch, so that transitions of several steps
    are scored in one call (the kernels take per-sample coefficients).
    """
    if isinstance(index, int):
        rows, level = index, plan.noise_levels[index]
    else:
        rows = torch.as_tensor(list(index), device=schedule.timesteps.device)
        level = torch.tensor([plan.noise_levels[i] for i in index], dtype=torch.float32)
        if not bool((level > 0).all()):
            raise ValueError("per-row steps must all be stochastic (deterministic steps have no log-prob)")
    stochastic_step = not isinstance(index, int) or level > 0
    if adapter.prediction_type != "flow":
        stochastic = schedule.stochastic_alphas_cumprod_prev
        # A stochastic step's target keeps noise at the end (see Schedule); per-row steps are all stochastic.
        a_prev = (stochastic if stochastic is not None and stochastic_step else schedule.alphas_cumprod_prev)[rows]
        ddim = functools.partial(
            ddim_step,
            model_output,
            sample,
            schedule.alphas_cumprod[rows],
            a_prev,
            level,
            adapter.prediction_type,
            clip_sample_range=adapter.clip_sample_range,
        )
        return _draw(ddim, _std_scale(plan, index) if stochastic_step else None, sample, prev_sample, generator)
    sigma, sigma_next = schedule.sigmas[rows], schedule.sigmas[rows + 1]
    if stochastic_step:
        options = {"unnormalized_log_prob": True} if plan.log_prob == "unnormalized" else {}
        kernel = functools.partial(KERNELS[plan.kernel], model_output, sample, sigma, sigma_next, level, **options)
        return _draw(kernel, _std_scale(plan, index), sample, prev_sample, generator)
    if plan.ode_solver == "dpm_solver_2m":
        sigma_prev = schedule.sigmas[index - 1] if prev_x0 is not None else None
        return dpm_solver_2m_step(model_output, sample, sigma, sigma_next, prev_x0=prev_x0, sigma_prev=sigma_prev)
    return ode_step(model_output, sample, sigma, sigma_next)


def _draw(kernel: Callable[..., StepOutput], scale, sample: Tensor, prev_sample, generator) -> StepOutput:
    """The kernel's transition (drawn, or ``prev_sample`` scored), its std widened by ``scale`` when not None."""
    if scale is None:
        return kernel(prev_sample=prev_sample, generator=generator)
    # The kernel's mean and std (scoring the input itself, so nothing is drawn), then the widened transition.
    return widened_step(kernel(prev_sample=sample), scale, prev_sample=prev_sample, generator=generator)


def _std_scale(plan: StepPlan, index: int | Sequence[int]) -> float | Tensor | None:
    """The std multiplier of a step (or ``[B]`` per-row steps), ``None`` when it is 1 (the kernel's own draw)."""
    if not plan.std_scales:
        return None
    if isinstance(index, int):
        scale = plan.std_scale(index)
        return None if scale == 1.0 else scale
    scales = torch.tensor([plan.std_scale(i) for i in index], dtype=torch.float32)
    return None if bool((scales == 1.0).all()) else scales


def step_stds(adapter: DiffusionAdapter, plan: StepPlan, schedule: Schedule, steps: Sequence[int]) -> Tensor:
    """``[len(steps)]`` transition std of the plan's stochastic ``steps``: schedule quantities, read from the kernel
    without a model call (TempFlow-GRPO's noise-aware weights)."""
    zero = torch.zeros(1, 1, device=schedule.timesteps.device)
    stds = []
    for i in steps:
        if plan.noise_levels[i] == 0:
            raise ValueError(f"step {i} is deterministic: it has no transition std")
        std = step_transition(adapter, plan, schedule, int(i), zero, zero, prev_sample=zero).std
        stds.append(float(torch.as_tensor(std).flatten()[0]))
    return torch.tensor(stds)


def _check_plan(adapter: DiffusionAdapter, plan: StepPlan) -> None:
    is_ddim = plan.kernel == "ddim"
    if plan.stochastic and is_ddim != (adapter.prediction_type != "flow"):
        expected = "'ddim'" if adapter.prediction_type != "flow" else "one of 'sde', 'cps', 'const'"
        raise ValueError(
            f"plan kernel {plan.kernel!r} does not fit a {adapter.prediction_type} model ({adapter.family}); "
            f"use {expected}"
        )


def _predict(adapter, latents, t, cond, guidance_scale, grad: bool, use_checkpoint: bool) -> Tensor:
    if not grad:
        with torch.no_grad():
            return adapter.predict(latents, t, cond, guidance_scale)
    if use_checkpoint:
        return checkpoint(adapter.predict, latents, t, cond, guidance_scale, use_reentrant=False)
    return adapter.predict(latents, t, cond, guidance_scale)


@dataclass
class _SampledChunk:
    """One chunk's stored transitions (each ``[S]`` tensors of ``[b, ...]``) and its final latents ``[b, ...]``."""

    entering: list[Tensor]
    produced: list[Tensor]
    log_probs: list[Tensor]
    final: Tensor
    means: list[Tensor] | None = None


def _sample_chunk(
    adapter: DiffusionAdapter,
    plan: StepPlan,
    stored_steps: Sequence[int],
    schedule: Schedule,
    cond: Conditioning,
    latents: Tensor,
    generators: list[torch.Generator],
    guidance_scale: float,
    grad: GradientPath,
    stop_after: int,
    store_means: bool = False,
    start_step: int = 0,
) -> _SampledChunk:
    stored = set(stored_steps)
    chunk = _SampledChunk([], [], [], latents.float(), [] if store_means else None)
    latents = chunk.final
    prev_x0 = None
    for i in range(start_step, stop_after):
        t = schedule.timesteps[i]
        with_grad = i in grad.steps
        output = _predict(adapter, latents, t, cond, guidance_scale, with_grad, grad.checkpointing)
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            step = step_transition(adapter, plan, schedule, i, output, latents, generator=generators, prev_x0=prev_x0)
        if i in stored:
            chunk.entering.append(latents.detach())
            chunk.produced.append(step.prev_sample.detach())
            # A step stored for another chunk's plan is deterministic here: it has no log-prob.
            no_log_prob = torch.full((latents.shape[0],), float("nan"), device=latents.device)
            chunk.log_probs.append(no_log_prob if step.log_prob is None else step.log_prob.detach())
            if chunk.means is not None:
                chunk.means.append(step.mean.detach().float())
        # DPM-Solver++(2M) history is only valid along a deterministic path (restart after stochastic steps).
        deterministic = plan.noise_levels[i] == 0 and adapter.prediction_type == "flow"
        prev_x0 = predict_x0(output.detach().float(), latents.detach(), schedule.sigmas[i]) if deterministic else None
        latents = step.prev_sample
    chunk.final = latents
    return chunk


def _resolve_seeds(seeds: int | Sequence[int] | None, count: int) -> list[int]:
    if seeds is None:
        return torch.randint(0, 2**31 - 1, (count,)).tolist()
    if isinstance(seeds, int):
        return [seeds + i for i in range(count)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images (prompts x num_images_per_prompt)")
    return seeds


def rollout(
    adapter: DiffusionAdapter,
    prompts: Sequence[str],
    plan: StepPlan | Sequence[StepPlan],
    *,
    num_images_per_prompt: int = 1,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    seeds: int | Sequence[int] | None = None,
    initial_noise: InitialNoise | None = None,
    conditioning: Conditioning | None = None,
    chunk_size: int | None = None,
    grad: GradientPath = GradientPath(),
    stop_after: int | None = None,
    decode: bool = True,
    on_chunk: Callable[[slice, Tensor | None], None] | None = None,
    store_means: bool = False,
    start_step: int = 0,
    start_latents: Tensor | None = None,
) -> Trajectory:
    """Sample ``len(prompts) * num_images_per_prompt`` images with ``plan``.

    Args:
        adapter: the model family's adapter (its working resolution is used).
        prompts: ``P`` prompts; images are laid out prompt-major (``[p0, p0, ..., p1, ...]``).
        plan: which steps are stochastic / stored (:mod:`diffalign.samplers.plan`); or one plan per chunk of
            ``chunk_size`` images (Flow-GRPO-Fast's window drawn per sampling call), stored over their
            :func:`~diffalign.samplers.plan.union_plan` with each image's own trained steps in
            ``Trajectory.trained_steps``.
        num_images_per_prompt: ``K``, the group size.
        guidance_scale: CFG scale (FLUX: the guidance embedding).
        negative_prompt: CFG's unconditional text (default: the pipeline's default).
        seeds: an int (image ``i`` gets ``seed + i``), ``P*K`` seeds, or ``None`` (random).
        initial_noise: where the starting noise comes from when not from each image's seed (shared per prompt,
            or given seeds).
        conditioning: precomputed ``[P]`` conditioning of ``prompts`` (skips the text encoders).
        chunk_size: images per denoiser batch (memory bound); default all at once.
        grad: the denoiser calls that keep their graph (reward backprop); none by default.
        stop_after: run only the first ``stop_after`` steps (ReFL); the final latents are then at that step.
        decode: decode the final latents into images.
        on_chunk: called as ``on_chunk(images_slice, images)`` after each chunk is sampled and decoded, so that
            the caller can score it (e.g. in a thread) while the next chunk samples.
        store_means: also keep each stored transition's mean (``Trajectory.means``, GRPO-Guard); one more
            latent per stored step.
        start_step: begin at this step of the schedule (steps before it are skipped): with ``start_latents``, a
            rollout continued from given latents (TempFlow-GRPO's branch completion, ImageReFL's start from a noised
            real image).
        start_latents: ``[P*K, ...]`` latents at ``start_step`` instead of the initial noise (needs ``start_step``
            > 0 or the step-0 noise it replaces; the generators then draw only the stochastic steps' noise).

    Returns:
        A :class:`Trajectory`.
    """
    prompts = list(prompts)
    count = len(prompts) * num_images_per_prompt
    chunk = chunk_size or count
    chunk_plans = _chunk_plans(plan, -(-count // chunk))
    plan = union_plan(chunk_plans)
    _check_plan(adapter, plan)
    stop_after = plan.num_steps if stop_after is None else stop_after
    if not 0 < stop_after <= plan.num_steps:
        raise ValueError(f"stop_after must be in [1, {plan.num_steps}], got {stop_after}")
    if any(i >= stop_after for i in plan.stored):
        raise ValueError(f"plan stores steps {plan.stored} but the rollout stops after {stop_after} steps")
    if not 0 <= start_step < stop_after:
        raise ValueError(f"start_step must be in [0, {stop_after}), got {start_step}")
    if any(i < start_step for i in plan.stored):
        raise ValueError(f"plan stores steps {plan.stored} but the rollout starts at step {start_step}")
    if start_step > 0 and start_latents is None:
        raise ValueError(f"a rollout starting at step {start_step} needs the latents there (start_latents)")
    seeds = _resolve_seeds(seeds, count)
    generators = make_generators(seeds, adapter.device)

    prompt_cond = prompt_conditioning(adapter, prompts, guidance_scale, negative_prompt, conditioning)
    unique = list(dict.fromkeys(prompts))
    image_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    cond = prompt_cond.repeat_interleave(num_images_per_prompt)
    if start_latents is not None:
        if start_latents.shape[0] != count:
            raise ValueError(f"start_latents has batch {start_latents.shape[0]} for {count} images")
        latents = start_latents.to(adapter.device)
    elif initial_noise is None:
        latents = adapter.prepare_latents(count, generators)
    else:
        noise_seeds = initial_noise.resolve(seeds, num_images_per_prompt)
        latents = adapter.prepare_latents(count, make_generators(noise_seeds, adapter.device))
    schedule = adapter.set_timesteps(plan.num_steps)

    parts: list[_SampledChunk] = []
    decoded = []
    for start, chunk_plan in zip(range(0, count, chunk), chunk_plans):
        sl = slice(start, start + chunk)
        part = _sample_chunk(
            adapter,
            chunk_plan,
            plan.stored,
            schedule,
            cond[sl],
            latents[sl],
            generators[sl],
            guidance_scale,
            grad,
            stop_after,
            store_means,
            start_step,
        )
        parts.append(part)
        chunk_images = _decode(adapter, part.final, grad) if decode else None
        decoded.append(chunk_images)
        if on_chunk is not None:
            on_chunk(sl, chunk_images)
    final_latents = torch.cat([p.final for p in parts])
    images = torch.cat(decoded) if decode else None

    def stack(field: str) -> Tensor:
        """``[B, S, ...]`` of one stored quantity over the chunks."""
        if not plan.stored:
            return torch.empty(count, 0)
        return torch.cat([torch.stack(getattr(p, field), dim=1) for p in parts])

    return Trajectory(
        prompts=image_prompts,
        prompt_ids=torch.tensor([unique.index(p) for p in image_prompts]),
        conditioning=cond,
        seeds=seeds,
        step_indices=tuple(plan.stored),
        timesteps=schedule.timesteps[list(plan.stored)],
        latents=stack("entering"),
        next_latents=stack("produced"),
        log_probs=stack("log_probs"),
        final_latents=final_latents,
        images=images,
        guidance_scale=guidance_scale,
        plan=plan,
        schedule=schedule,
        means=stack("means") if store_means else None,
        trained_steps=_own_trained_steps(chunk_plans, count, chunk),
    )


def _chunk_plans(plan: StepPlan | Sequence[StepPlan], num_chunks: int) -> list[StepPlan]:
    """The plan of each chunk: ``plan`` for all, or the given per-chunk plans (one per chunk, same trained count)."""
    if isinstance(plan, StepPlan):
        return [plan] * num_chunks
    plans = list(plan)
    if len(plans) != num_chunks:
        raise ValueError(f"got {len(plans)} plans for {num_chunks} chunks of images")
    if len({len(p.trained) for p in plans}) > 1:
        raise ValueError("per-chunk plans must train the same number of steps")
    return plans


def _own_trained_steps(chunk_plans: list[StepPlan], count: int, chunk: int) -> Tensor | None:
    """``[B, n]`` each image's trained steps when the chunks' plans differ, else ``None``."""
    if len(set(chunk_plans)) <= 1:
        return None
    starts = range(0, count, chunk)
    rows = [plan.trained for start, plan in zip(starts, chunk_plans) for _ in range(min(chunk, count - start))]
    return torch.tensor(rows, dtype=torch.long)


def _decode(adapter: DiffusionAdapter, latents: Tensor, grad: GradientPath) -> Tensor:
    if not grad.steps:
        with torch.no_grad():
            return adapter.decode(latents)
    if grad.checkpointing:
        return checkpoint(adapter.decode, latents, use_reentrant=False)
    return adapter.decode(latents)


def transition_log_probs(
    adapter: DiffusionAdapter,
    trajectory: Trajectory,
    positions: Sequence[int] | int | Tensor,
    conditioning: Conditioning | None = None,
    samples: slice | Tensor | None = None,
    uncond_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """Log-probs of stored transitions under the adapter's *current* parameters (with grad).

    The denoiser is re-run on the stored ``latents`` with the trajectory's guidance scale and the step scored on
    the stored ``next_latents`` with the same kernel, so with unchanged parameters the result equals
    ``trajectory.log_probs`` (ratio 1) up to float rounding.

    Args:
        adapter: the model (LoRA on, or inside ``adapter.lora_disabled()`` for the reference).
        trajectory: a rollout's result.
        positions: position(s) on the stored axis ``S`` to score, the same for every sample; or an int64 ``[b, n]``
            tensor of each sample's own positions (DDPO's per-sample random steps).
        conditioning: override the trajectory's conditioning (e.g. a training sub-batch's).
        samples: a sub-batch of images (slice or index tensor); default all.
        uncond_grad: with CFG, let the gradient flow through the unconditional branch too; ``False`` detaches it
            (flow_grpo) and skips its backward (:meth:`DiffusionAdapter._predict`).

    Returns:
        ``(log_probs [b, n], means [b, n, ...], stds)`` for the ``n`` positions; the means and the transition
        stds serve the KL term. ``stds`` is ``[n]`` for shared positions, ``[b, n]`` for per-sample ones and for
        trajectories whose rows have steps of their own (``row_steps``).
    """
    per_sample = isinstance(positions, Tensor)
    samples = slice(None) if samples is None else samples
    cond = conditioning if conditioning is not None else trajectory.conditioning[samples]
    stored, next_stored = trajectory.latents[samples], trajectory.next_latents[samples]
    if not per_sample:
        shared = [positions] if isinstance(positions, int) else list(positions)
        positions = torch.tensor(shared, dtype=torch.long).expand(stored.shape[0], len(shared))
    # All positions in one denoiser call: rows are sample-major (sample 0 at each of its positions, then sample 1).
    rows_of = torch.arange(stored.shape[0]).unsqueeze(1)
    latents = stored[rows_of, positions]
    batch, count = latents.shape[:2]
    rows = latents.flatten(0, 1)
    indices = trajectory.steps_at(positions, samples).flatten().tolist()
    timesteps = trajectory.schedule.timesteps[indices]
    output = adapter.predict(
        rows, timesteps, cond.repeat_interleave(count), trajectory.guidance_scale, uncond_grad=uncond_grad
    )
    step = step_transition(
        adapter,
        trajectory.plan,
        trajectory.schedule,
        indices,
        output,
        rows,
        prev_sample=next_stored[rows_of, positions].flatten(0, 1),
    )
    stds = torch.as_tensor(step.std, dtype=torch.float32).flatten()
    stds = (stds.expand(batch * count) if stds.numel() == 1 else stds).view(batch, count)
    return (
        step.log_prob.view(batch, count),
        step.mean.view(batch, count, *step.mean.shape[1:]),
        stds if per_sample or trajectory.row_steps is not None else stds[0],
    )
