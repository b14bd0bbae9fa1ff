"""Reward backpropagation: AlignProp, DRaFT-K, DRaFT-LV, ReFL, Direct-Align / SRPO and ImageReFL on the one rollout
loop.

See docs/methods/reward-backprop.md.

A differentiable reward ``r(decode(x0), prompt)`` is maximised by backpropagating through (part of) the sampler.
Every optimizer step accumulates ``optim.gradient_accumulation_steps`` micro-batches of ``sampling.batch_size``
images per process; each micro-batch runs one of six modes (``backprop.mode``):

- ``alignprop`` (docs/methods/reward-backprop.md#alignprop): sample with DDIM (eta ``sampling.eta``, AlignProp 1.0)
  and CFG; ``K`` is drawn **once per trajectory** (``backprop.truncation``: ``fixed``, ``uniform`` or
  ``gaussian``, the last being AlignProp's ``backprop_timestep ~ N(42, 5)`` at 50 steps), the first ``T - K``
  denoiser calls run without grad and the last ``K`` with grad; the decode keeps the graph. Not TRL's per-step
  re-draw (docs/methods/reward-backprop.md#truncation).
- ``draft_k`` (docs/methods/reward-backprop.md#draft-k): the same with a fixed ``K = backprop.k`` (``K = T`` is
  full DRaFT).
- ``draft_lv`` (docs/methods/reward-backprop.md#draft-lv): sample ``x0`` without grad, re-noise it
  ``n = backprop.num_renoise`` times to the lowest noise level of the schedule (``adapter.add_noise`` at the last
  step's timestep), predict ``x0`` from each copy with one denoiser call *with* grad, decode and score all
  ``n * B`` images.
- ``refl`` (docs/methods/reward-backprop.md#refl): sample steps ``0 .. mid-1`` without grad
  (``rollout(..., stop_after=mid)``), ``mid`` uniform in ``backprop.refl_step_range`` (default the last quarter of
  the steps: ``(30, 39)`` of 40), then one denoiser call with grad at ``x_mid`` and its single-step ``x0``
  prediction.
- ``direct_align`` (docs/methods/reward-backprop.md#direct-align-and-srpo; Direct-Align / SRPO): ODE ``x0`` without
  grad, the rollout's own starting noise injected into it at a level drawn on a fine grid, one denoiser call with
  grad per branch (denoise: inject above the recovery level and step down; inversion: inject below and step up; one
  batch), the known-noise recovery ``x0 = (x_t - sigma_t eps) / (1 - sigma_t)``, and the reward or SRPO's Semantic
  Relative Preference ``(1 + k_t) s(x, c+) - s(x, c-)`` with control words on the reward side.
- ``image_refl`` (docs/methods/reward-backprop.md#imagerefl; ImageReFL): real image-caption pairs
  (``sampling.real_images``) encoded and noised to step ``start``, steps ``start .. mid-1`` without grad, ReFL's grad
  step at ``mid``, plus the diffusion loss on the real image; ``backprop.switch_step`` gives the combined generation
  (base model before the switch, LoRA after) at evaluation and in the saved LoRA.

The single-call ``x0`` prediction serves every parameterisation (:func:`predict_original`,
docs/methods/reward-backprop.md#x0-prediction): flow ``x0 = x - sigma v``, epsilon
``(x - sqrt(1 - a) eps) / sqrt(a)``, v ``sqrt(a) x - sqrt(1 - a) v``.
The loss is :func:`diffalign.losses.reward_backprop.reward_loss` (``negative``: ``-w mean r``; ``hinge``:
``w mean relu(target - r)`` (ReFL); ``target``: ``w mean |target - r|`` (AlignProp aesthetic)), computed on the
decoded images through the reward's own differentiable torch preprocessing.

Memory: with ``gradient_checkpointing: true`` every grad-enabled denoiser call and the VAE decode run under
``torch.utils.checkpoint`` (AlignProp's ``checkpoint(unet, ..., use_reentrant=False)``), so a backprop step keeps
only each call's inputs and peak memory stays near-flat in ``K``. ``backprop.checkpoint_blocks`` additionally
keeps the denoiser's own per-block checkpointing (what the runtime switches on for other trainers): it lowers the
peak of the one call recomputed at a time further, at the cost of a third forward pass per grad step.

Deviations from the references: ``K`` (and ReFL's ``mid``) is drawn per micro-batch, which *is* the trajectory
here; DRaFT-LV averages over the ``n`` copies (``reward_loss`` takes the mean) where the paper sums -- set
``backprop.weight: n`` to match it; ReFL's reference samples with DDPM ancestral steps, here DDIM with
``sampling.eta: 1`` (DDPM's ancestral step on the sampler's sub-grid); ReFL's no-CFG choice is a config value
(``sampling.guidance_scale: 1``). DRaFT-LV's final denoise predicts ``x0`` directly instead of taking the sampler's
last step, which for the last step differs only by the ``alpha_prod_prev`` of the final DDIM step.

Every draw (prompts, seeds, ``K``, ``mid``, re-noising) is seeded from ``(seed, step, micro-batch, process)``, so a
resumed run reproduces the losses of an uninterrupted one exactly; prompts and image seeds are drawn for the global
micro-batch, so several processes train on what one process with their total batch would.

Launch: ``diffalign train configs/backprop/sd15_aesthetic.yaml`` (``accelerate launch -m diffalign.cli train ...``
for several GPUs); ``configs/backprop/tiny_cpu.yaml`` runs on a laptop CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import rewards
from diffalign.adapters.base import Conditioning, DiffusionAdapter, Schedule
from diffalign.config import ConfigError, TrainerConfig
from diffalign.config.groups import RewardSpec
from diffalign.data.edits import refuse_source_images
from diffalign.data.image_captions import load_real_image, load_real_pairs
from diffalign.data.prompts import load_prompts_and_metadata
from diffalign.eval.evaluator import Evaluator
from diffalign.losses.reward_backprop import (
    DIRECT_ALIGN_EDGE,
    SRPO_NEGATIVE_WORDS,
    SRPO_POSITIVE_WORDS,
    DirectAlignLevels,
    diffusion_regulariser,
    direct_align_grid,
    direct_align_levels,
    direct_align_recover,
    direct_align_recover_vp,
    image_refl_loss,
    interpolate_alphas_cumprod,
    is_plain_refl_batch,
    refl_step_range,
    relative_preference,
    reward_loss,
    sample_direct_align_index,
    sample_refl_step,
    sample_truncation_steps,
    srp_captions,
    srp_discount,
    switch_timestep,
    truncated_grad_steps,
)
from diffalign.rewarding import RewardLike, build_reward
from diffalign.samplers.plan import StepPlan
from diffalign.samplers.rollout import GradientPath, make_generators, prompt_conditioning, rollout
from diffalign.samplers.steps import predict_x0
from diffalign.seeding import derive_seed
from diffalign.trainers.common import TrainingRun, check_text_cache


logger = logging.getLogger(__name__)

Mode = Literal["alignprop", "draft_k", "draft_lv", "refl", "direct_align", "image_refl"]


@dataclasses.dataclass(kw_only=True)
class BackpropSamplingConfig:
    """How the training trajectories are sampled."""

    prompts: list[str] | Path
    """Training prompts: a list, a text file with one prompt per line, or a JSONL file of records
    ``{"prompt": ..., <metadata>}`` whose fields reach rewards that take metadata."""
    num_steps: int = 50
    """Denoising steps T (AlignProp and DRaFT: 50 DDIM steps; ReFL: 40)."""
    guidance_scale: float = 5.0
    """CFG scale while sampling, also used by the grad-enabled calls (AlignProp 5.0; ReFL 1.0, i.e. no CFG;
    FLUX: the guidance embedding)."""
    eta: float | None = None
    """Sampler noise: DDIM eta for epsilon / v models (AlignProp ``sample_eta`` 1.0), the Flow-GRPO SDE noise level
    for flow models (0 = the Euler ODE). Null: 1.0 for epsilon / v models, 0.0 for flow models."""
    batch_size: int = 4
    """Images per micro-batch on each process (AlignProp: 8 per GPU)."""
    resolution: int | None = None
    """Image side (default: the model's native resolution)."""
    negative_prompt: str | None = None
    """CFG's unconditional text (default: the pipeline's)."""
    precompute_text_embeddings: bool = False
    """Encode every training and evaluation prompt once at the start and answer the rollouts from that cache
    (docs/performance.md#text-embedding-cache); with ``model.offload_text_encoders`` the encoders then leave the
    GPU. Off: prompts are encoded at every rollout."""
    real_images: Path | None = None
    """``image_refl``: the real image-caption pairs, a JSONL file of ``{"prompt": ..., "image": <path>}`` records
    (paths relative to the file) or a folder of images each with a ``<stem>.txt`` caption. A missing or unreadable
    image is an error naming the file."""

    def __post_init__(self) -> None:
        for key in ("num_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        if self.eta is not None and self.eta < 0:
            raise ConfigError(f"must be >= 0 or null, got {self.eta}", key="eta")


@dataclasses.dataclass(kw_only=True)
class BackpropConfig:
    """Which steps receive gradients, and the loss."""

    mode: Mode = "alignprop"
    """``alignprop`` (random truncation), ``draft_k`` (last k steps), ``draft_lv`` (re-noised final step),
    ``refl`` (one late step's x0 prediction), ``direct_align`` (Direct-Align / SRPO: known noise injected into the
    ODE sample, one step with grad, recovered in one step), ``image_refl`` (ReFL from noised real images plus a
    diffusion loss on them)."""
    k: int = 1
    """``draft_k``, and ``alignprop`` with ``truncation: fixed``: number of final steps with grad (DRaFT: K=1
    works well; K = num_steps is full DRaFT)."""
    truncation: Literal["fixed", "uniform", "gaussian"] = "gaussian"
    """``alignprop``: how K is drawn once per trajectory (AlignProp's default ``gaussian``)."""
    gaussian_mean: float = 8.0
    """``gaussian``: mean of K (AlignProp's ``backprop_timestep`` mean 42 at 50 steps = K 8)."""
    gaussian_std: float = 5.0
    """``gaussian``: std of K (AlignProp: 5)."""
    uniform_range: tuple[int, int] = (1, 49)
    """``uniform``: inclusive range of K, intersected with ``[1, num_steps - 1]`` (AlignProp's ``{min: 0, max:
    50}`` at 50 steps: K in 1..49)."""
    num_renoise: int = 2
    """``draft_lv``: re-noised copies n of the final sample (paper: n = 2)."""
    refl_step_range: tuple[int, int] | None = None
    """``refl``: inclusive range of the grad step index ``mid``; null = the last quarter of the steps
    (ReFL's ``randint(30, 39)`` of 40)."""
    loss: Literal["negative", "hinge", "target"] = "negative"
    """``negative``: -w r (DRaFT, AlignProp HPS); ``hinge``: w relu(target - r) (ReFL); ``target``: w |target - r|
    (AlignProp aesthetic)."""
    weight: float = 1.0
    """Loss scale (AlignProp ``grad_scale x loss_coeff`` = 0.01; ReFL ``grad_scale`` = 1e-3). With AdamW it acts
    mainly through gradient clipping."""
    target: float | None = None
    """``hinge`` margin (ReFL: 2.0 on ImageReward) or ``target`` value (AlignProp aesthetic: 10)."""
    checkpoint_blocks: bool = False
    """With ``gradient_checkpointing``, also checkpoint inside the denoiser (per block): lower peak for very large
    models (FLUX at 1024 px), one more forward per grad step."""
    direct_align_schedule_steps: int = 50
    """``direct_align``: steps of the coarse schedule the training levels are read from (SRPO
    ``vis_sampling_step`` 50, with the model's shift)."""
    direct_align_step_range: tuple[int, int] = (5, 25)
    """``direct_align``: the coarse steps ``(a, b)`` whose levels bound the fine grid (SRPO ``train_timestep``:
    (5, 25) in the HPS script, sigma 0.964 .. 0.750 at shift 3; (5, 30) for PickScore)."""
    direct_align_grid_size: int = 1000
    """``direct_align``: points ``L`` of the fine grid between those levels (SRPO ``timestep_length``)."""
    direct_align_offset: int = 100
    """``direct_align``: grid points between the injection and the recovery level (SRPO: ``int((1 -
    groundtruth_ratio) L) + 1`` = 100 for ratio 0.9), clipped near the grid's ends."""
    direct_align_inversion: bool = True
    """``direct_align``: also train the inversion branch (inject below the recovery level, step up; its reward
    swaps the control words). Needs ``srp``: with the plain reward that branch would lower it."""
    srp: bool = True
    """``direct_align``: Semantic Relative Preference ``(1 + k_t) s(x, c+) - s(x, c-)`` with control words prepended
    to the prompt on the reward side; false: the plain reward ``s(x, prompt)`` (plain Direct-Align)."""
    srp_positive_words: tuple[str, ...] = SRPO_POSITIVE_WORDS
    """``srp``: positive control words, word ``step % n`` at optimizer step ``step`` (SRPO's realism words)."""
    srp_negative_words: tuple[str, ...] = SRPO_NEGATIVE_WORDS
    """``srp``: negative control words, cycled the same way (SRPO's "CG / oily" words)."""
    srp_discount: tuple[float, float] = (0.1, 0.25)
    """``srp``: the denoise branch's ``k_t``, linear in the fine-grid draw from the first value (m = 0, least
    noise) to the second (m = L - 1) (SRPO HPS ``discount_pos``; PickScore (0.1, 0.5))."""
    srp_inversion_discount: tuple[float, float] = (0.3, 0.01)
    """``srp``: the inversion branch's ``k_t`` ramp (SRPO HPS ``discount_inv``; PickScore (0.6, 0.01))."""
    image_refl_start: int | None = None
    """``image_refl``: the step the real image is noised to (ImageReFL ``start_timestep_index`` 30 of 40); null =
    the low end of the ``refl_step_range``. ``mid`` is drawn from ``refl_step_range`` at or after it."""
    image_refl_mse_weight: float = 0.01
    """``image_refl``: weight of the diffusion loss on the real image relative to the reward loss (ImageReFL
    ``mse_loss_scale``); the total is ``weight * (L_R + image_refl_mse_weight * L_D)``."""
    image_refl_plain_every: int | None = None
    """``image_refl``: every this many micro-batches is a plain ReFL one from noise with the training prompts
    (ImageReFL ``state_del``, off by default); null: never."""
    switch_step: int | None = None
    """Combined generation (ImageReFL): at evaluation and in the saved LoRA the base model runs steps ``0 .. s-1``
    of the evaluation schedule and the LoRA the rest (``adapter.lora_max_timestep``, kept in the LoRA's scope file);
    training always uses the LoRA. Null: the LoRA at every step."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"must be >= 1, got {self.k}", key="k")
        if self.num_renoise < 1:
            raise ConfigError(f"must be >= 1, got {self.num_renoise}", key="num_renoise")
        if self.gaussian_std <= 0:
            raise ConfigError(f"must be > 0, got {self.gaussian_std}", key="gaussian_std")
        low, high = self.uniform_range
        if not 1 <= low <= high:
            raise ConfigError(f"must satisfy 1 <= low <= high, got {self.uniform_range}", key="uniform_range")
        if self.loss != "negative" and self.target is None:
            raise ConfigError(f"loss {self.loss!r} needs a target", key=("loss", "target"))
        if self.refl_step_range is not None and not 1 <= self.refl_step_range[0] <= self.refl_step_range[1]:
            raise ConfigError(
                f"must satisfy 1 <= low <= high (step 0 has nothing to sample before it), got {self.refl_step_range}",
                key="refl_step_range",
            )
        self._check_direct_align()
        self._check_image_refl()

    def _check_direct_align(self) -> None:
        if self.direct_align_schedule_steps < 2:
            raise ConfigError(
                f"must be >= 2, got {self.direct_align_schedule_steps}", key="direct_align_schedule_steps"
            )
        first, last = self.direct_align_step_range
        if not 0 <= first < last < self.direct_align_schedule_steps:
            raise ConfigError(
                f"must satisfy 0 <= a < b < direct_align_schedule_steps ({self.direct_align_schedule_steps}), got "
                f"{self.direct_align_step_range}",
                key=("direct_align_step_range", "direct_align_schedule_steps"),
            )
        if self.direct_align_grid_size < 2 * DIRECT_ALIGN_EDGE:
            raise ConfigError(
                f"must be >= {2 * DIRECT_ALIGN_EDGE} (the grid draw keeps {DIRECT_ALIGN_EDGE} points from each end), "
                f"got {self.direct_align_grid_size}",
                key="direct_align_grid_size",
            )
        if not 1 <= self.direct_align_offset < self.direct_align_grid_size:
            raise ConfigError(
                f"must be in [1, direct_align_grid_size), got {self.direct_align_offset}", key="direct_align_offset"
            )
        if self.mode == "direct_align" and self.direct_align_inversion and not self.srp:
            raise ConfigError(
                "the inversion branch steps against the model's estimate, so with the plain reward it would lower "
                "it; set direct_align_inversion: false (plain Direct-Align) or srp: true",
                key=("direct_align_inversion", "srp"),
            )
        for key in ("srp_positive_words", "srp_negative_words"):
            words = getattr(self, key)
            if not words or not all(isinstance(word, str) and word.strip() for word in words):
                raise ConfigError(f"must be a non-empty list of non-empty words, got {list(words)}", key=key)
        for key in ("srp_discount", "srp_inversion_discount"):
            if any(value < 0 for value in getattr(self, key)):
                raise ConfigError(
                    f"must be >= 0 (k_t weights the preferred prompt), got {getattr(self, key)}", key=key
                )

    def _check_image_refl(self) -> None:
        if self.image_refl_start is not None and self.image_refl_start < 0:
            raise ConfigError(f"must be >= 0 or null, got {self.image_refl_start}", key="image_refl_start")
        if self.image_refl_mse_weight < 0:
            raise ConfigError(f"must be >= 0, got {self.image_refl_mse_weight}", key="image_refl_mse_weight")
        if self.image_refl_plain_every is not None and self.image_refl_plain_every < 1:
            raise ConfigError(
                f"must be >= 1 or null (off), got {self.image_refl_plain_every}", key="image_refl_plain_every"
            )
        if self.switch_step is not None and self.switch_step < 0:
            raise ConfigError(f"must be >= 0 or null, got {self.switch_step}", key="switch_step")


@dataclasses.dataclass(kw_only=True)
class RewardBackpropConfig(TrainerConfig):
    """Config of the ``reward_backprop`` trainer (AlignProp, DRaFT-K, DRaFT-LV, ReFL)."""

    resume_safe_keys: ClassVar[tuple[str, ...]] = ("sampling.precompute_text_embeddings",)
    """Caching the prompts' text embeddings changes how a step is computed, not its result."""
    method: Literal["reward_backprop"] = "reward_backprop"
    """Trainer name (``diffalign train`` picks the trainer from it)."""
    reward: RewardSpec = "aesthetic"
    """A differentiable reward: a registered name, ``module:fn`` / ``file.py:fn``, or a mapping of those to weights
    or to term options (``{pickscore: {scale: 0.038461538461538464, dtype: bf16}}``, docs/rewards.md#weighted-sums)."""
    max_steps: int = 100
    """Optimizer steps."""
    sampling: BackpropSamplingConfig
    backprop: BackpropConfig = dataclasses.field(default_factory=BackpropConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_text_cache(self.model.offload_text_encoders, self.sampling.precompute_text_embeddings)
        steps, backprop = self.sampling.num_steps, self.backprop
        uses_k = backprop.mode == "draft_k" or (backprop.mode == "alignprop" and backprop.truncation == "fixed")
        if uses_k and backprop.k > steps:
            raise ConfigError(f"k={backprop.k} exceeds sampling.num_steps={steps}", key=("backprop.k",))
        if backprop.mode == "alignprop" and backprop.truncation != "fixed" and steps < 2:
            raise ConfigError("random truncation needs sampling.num_steps >= 2", key=("backprop.truncation",))
        if backprop.mode in ("refl", "image_refl"):
            low, high = resolve_refl_range(steps, backprop.refl_step_range)
            if not 1 <= low <= high < steps:
                raise ConfigError(
                    f"ReFL step range ({low}, {high}) must lie in [1, {steps - 1}] (needs num_steps >= 2)",
                    key=("backprop.refl_step_range", "sampling.num_steps"),
                )
        if backprop.mode == "image_refl":
            self._check_image_refl_steps(steps)
        if backprop.switch_step is not None and self.model.lora.rank == 0:
            raise ConfigError(
                "combined generation switches the LoRA off for the early steps, and full fine-tuning keeps no base "
                "model to switch to: train a LoRA (model.lora.rank > 0) or leave switch_step null",
                key=("backprop.switch_step", "model.lora.rank"),
            )
        eval_steps = self.eval.num_steps or steps
        if backprop.switch_step is not None and backprop.switch_step > eval_steps:
            raise ConfigError(
                f"switch_step {backprop.switch_step} exceeds the {eval_steps} evaluation steps (eval.num_steps, else "
                "sampling.num_steps); use 0 .. steps (steps: the base model throughout)",
                key=("backprop.switch_step", "eval.num_steps"),
            )

    def _check_image_refl_steps(self, steps: int) -> None:
        backprop = self.backprop
        if self.sampling.real_images is None:
            raise ConfigError(
                "mode image_refl trains on real image-caption pairs: set sampling.real_images to a JSONL of "
                '{"prompt": ..., "image": ...} records or a folder of images with <stem>.txt captions',
                key=("sampling.real_images", "backprop.mode"),
            )
        low, high = resolve_refl_range(steps, backprop.refl_step_range)
        start = image_refl_start(steps, backprop)
        if not 0 <= start <= low:
            raise ConfigError(
                f"image_refl_start {start} must lie in [0, {low}], at or before the ReFL step range ({low}, {high})",
                key=("backprop.image_refl_start", "backprop.refl_step_range"),
            )


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------------


def resolve_refl_range(num_steps: int, step_range: tuple[int, int] | None) -> tuple[int, int]:
    """ReFL's inclusive ``mid`` range: the configured one, or the last quarter of ``num_steps``
    (docs/methods/reward-backprop.md#refl)."""
    if step_range is not None:
        return tuple(step_range)
    return refl_step_range(num_steps) if num_steps >= 1 else (0, 0)


def image_refl_start(num_steps: int, backprop: BackpropConfig) -> int:
    """ImageReFL's start step: the configured one, or the low end of the ReFL step range (30 of 40)."""
    if backprop.image_refl_start is not None:
        return backprop.image_refl_start
    return resolve_refl_range(num_steps, backprop.refl_step_range)[0]


def predict_original(
    model_output: Tensor, sample: Tensor, prediction_type: str, schedule: Schedule, index: int
) -> Tensor:
    """Single-call data prediction ``x0_hat`` at step ``index`` of ``schedule``, fp32, differentiable.

    See docs/methods/reward-backprop.md#x0-prediction.

    - ``flow``: ``x0 = x - sigma v`` (:func:`~diffalign.samplers.steps.predict_x0`);
    - ``epsilon``: ``x0 = (x - sqrt(1 - a) eps) / sqrt(a)`` with ``a = alphas_cumprod[t]`` (ReFL's
      ``pred_original_sample``);
    - ``v_prediction``: ``x0 = sqrt(a) x - sqrt(1 - a) v``.

    Args:
        model_output: ``[B, ...]`` velocity, epsilon or v (CFG-combined).
        sample: ``[B, ...]`` the noisy latents the model saw.
        prediction_type: ``"flow"``, ``"epsilon"`` or ``"v_prediction"``.
        schedule: the sampling schedule (``sigmas`` for flows, ``alphas_cumprod`` otherwise).
        index: the step index (0 = noisiest).

    Returns:
        ``[B, ...]`` fp32 ``x0_hat``.
    """
    if prediction_type == "flow":
        return predict_x0(model_output, sample, schedule.sigmas[index])
    output, sample = model_output.float(), sample.float()
    alpha = schedule.alphas_cumprod[index].float().to(sample.device)
    if prediction_type == "epsilon":
        return (sample - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * output
    raise ValueError(f"prediction_type must be 'flow', 'epsilon' or 'v_prediction', got {prediction_type!r}")


def sampling_plan(num_steps: int, prediction_type: str, eta: float | None) -> StepPlan:
    """The training sampler: nothing stored (no log-probs needed), every step stochastic with ``eta`` or ODE.

    Epsilon / v models: DDIM with noise ``eta`` on every step (AlignProp ``eta=1``). Flow models: the Flow-GRPO SDE
    with noise level ``eta`` on every step but the last (which lands on ``sigma = 0``), or the Euler ODE at 0.
    """
    is_flow = prediction_type == "flow"
    eta = (0.0 if is_flow else 1.0) if eta is None else float(eta)
    levels = [eta] * num_steps
    if is_flow:
        levels[-1] = 0.0
    return StepPlan(num_steps, "sde" if is_flow else "ddim", tuple(levels), (), ())


def _call(fn: Callable[..., Tensor], *args: Any, use_checkpoint: bool) -> Tensor:
    """``fn(*args)`` with its activations recomputed in backward when ``use_checkpoint`` (AlignProp;
    docs/methods/reward-backprop.md#checkpointing)."""
    if use_checkpoint:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class RewardBackpropTrainer:
    """AlignProp / DRaFT-K / DRaFT-LV / ReFL trainer; see the module docstring.

    Args:
        config: a :class:`RewardBackpropConfig`.
        run: an existing :class:`TrainingRun` (tests, the Python API); built from the config by default.
        reward: the differentiable reward instead of ``config.reward``: a :class:`rewards.Reward`, a torch scoring
            function (wrap it with ``rewards.load(fn, differentiable=True)``), or anything ``config.reward`` may hold.

    Raises:
        ValueError: the reward is not differentiable (use ``grpo`` or ``diffusion_dpo`` for such rewards).
    """

    def __init__(
        self, config: RewardBackpropConfig, run: TrainingRun | None = None, reward: RewardLike | None = None
    ) -> None:
        self.config = config
        # The reward is checked before the model loads: a wrong reward fails in seconds, not minutes.
        reward = reward if reward is not None else config.reward
        self.reward = build_reward(reward, device=run.device if run is not None else None)
        check_differentiable(self.reward)
        kwargs = {}
        if config.sampling.resolution:
            kwargs = {"height": config.sampling.resolution, "width": config.sampling.resolution}
        self.run = run or TrainingRun(config, adapter_kwargs=kwargs)
        self.adapter: DiffusionAdapter = self.run.adapter
        if config.gradient_checkpointing and not config.backprop.checkpoint_blocks:
            # The runtime turned on per-block checkpointing; per-call checkpointing alone keeps memory flat in K.
            self.adapter.enable_gradient_checkpointing(False)
        self.prompts, self.prompt_metadata = load_prompts_and_metadata(config.sampling.prompts)
        refuse_source_images(self.prompt_metadata, "reward_backprop")
        eta = config.sampling.eta
        if config.backprop.mode == "direct_align" and eta is None:
            eta = 0.0  # SRPO's rollout is the ODE, for every family
        self.plan = sampling_plan(config.sampling.num_steps, self.adapter.prediction_type, eta)
        self.real_pairs: list[tuple[str, Path]] = []
        """``image_refl``: the ``(caption, image file)`` pairs of ``sampling.real_images``."""
        if config.backprop.mode == "image_refl":
            self.real_pairs = load_real_pairs(config.sampling.real_images)
        self._direct_align_grid: Tensor | None = None
        if config.backprop.switch_step is not None:
            self.set_switch_step(config.backprop.switch_step, config.eval.num_steps or config.sampling.num_steps)
        self.evaluator = Evaluator.from_config(
            config, self.adapter, self.reward, self.run.output_dir, self.run.accelerator
        )
        if config.sampling.precompute_text_embeddings:
            captions = list(dict.fromkeys(caption for caption, _ in self.real_pairs))
            self.run.cache_text_embeddings(self.prompts + captions, config.sampling, self.evaluator)

    def set_switch_step(self, switch_step: int, num_steps: int) -> None:
        """Combined generation: the LoRA acts from step ``switch_step`` of a ``num_steps`` schedule on
        (``adapter.lora_max_timestep``; saved with the LoRA). Training steps ignore it (:meth:`train_step`)."""
        schedule = self.adapter.set_timesteps(num_steps)
        self.adapter.lora_max_timestep = switch_timestep(schedule.timesteps, switch_step)

    # --- per-micro-batch draws ---------------------------------------------------------------------------------------

    def _seed(self, purpose: str, step: int, micro: int, *more: int, process: int | None = None) -> int:
        """The seed of one draw; by default each process has its own (``process`` pins a shared one)."""
        process = self.run.accelerator.process_index if process is None else process
        return derive_seed(self.config.seed, f"backprop/{purpose}", step, micro, process, *more)

    def micro_batch(self, step: int, micro: int) -> tuple[list[str], list[dict[str, Any]], list[int]]:
        """This process's part of the micro-batch: prompts (drawn with replacement, as AlignProp's prompt functions),
        their metadata (:attr:`prompt_metadata`, aligned) and image seeds.

        The global micro-batch (``sampling.batch_size`` per process) is drawn once for all processes and each takes
        its slice, with seeds by global position, so that N processes train on what one process with N times the
        batch would (tests/trainers/test_fsdp.py). The draw is ``rng.choices`` over the prompt indices, the same
        random calls as over the prompts themselves, so runs keep the prompts they drew before.
        """
        per, world = self.config.sampling.batch_size, self.run.accelerator.num_processes
        start = self.run.accelerator.process_index * per
        rng = random.Random(self._seed("prompts", step, micro, process=0))
        indices = rng.choices(range(len(self.prompts)), k=per * world)[start : start + per]
        seeds = [self._seed("image", step, micro, start + i, process=0) for i in range(per)]
        return [self.prompts[i] for i in indices], [self.prompt_metadata[i] for i in indices], seeds

    def micro_batch_prompts(self, step: int, micro: int) -> tuple[list[str], list[int]]:
        """The micro-batch's prompts and image seeds (:meth:`micro_batch` without the metadata)."""
        prompts, _, seeds = self.micro_batch(step, micro)
        return prompts, seeds

    def num_grad_steps(self, step: int, micro: int) -> int:
        """``K`` of this trajectory (alignprop / draft_k), drawn once per micro-batch."""
        backprop, steps = self.config.backprop, self.config.sampling.num_steps
        if backprop.mode == "draft_k":
            return backprop.k
        return sample_truncation_steps(
            steps,
            backprop.truncation,
            backprop.k,
            torch.Generator().manual_seed(self._seed("truncation", step, micro)),
            gaussian_mean=backprop.gaussian_mean,
            gaussian_std=backprop.gaussian_std,
            uniform_range=tuple(backprop.uniform_range),
        )

    def refl_step(self, step: int, micro: int) -> int:
        """ReFL's ``mid`` for this micro-batch (ImageReFL: from the same range)."""
        steps = self.config.sampling.num_steps
        step_range = resolve_refl_range(steps, self.config.backprop.refl_step_range)
        return sample_refl_step(steps, torch.Generator().manual_seed(self._seed("refl", step, micro)), step_range)

    def direct_align_index(self, step: int, micro: int) -> int:
        """Direct-Align's fine-grid draw ``m`` for this micro-batch (shared by its two branches)."""
        generator = torch.Generator().manual_seed(self._seed("direct_align", step, micro))
        return sample_direct_align_index(self.config.backprop.direct_align_grid_size, generator)

    def real_batch(self, step: int, micro: int) -> tuple[list[str], list[Path]]:
        """``image_refl``: this process's captions and image files, drawn with replacement for the global
        micro-batch as :meth:`micro_batch` draws prompts."""
        per, world = self.config.sampling.batch_size, self.run.accelerator.num_processes
        start = self.run.accelerator.process_index * per
        rng = random.Random(self._seed("real_pairs", step, micro, process=0))
        indices = rng.choices(range(len(self.real_pairs)), k=per * world)[start : start + per]
        return [self.real_pairs[i][0] for i in indices], [self.real_pairs[i][1] for i in indices]

    def is_plain_refl(self, step: int, micro: int) -> bool:
        """``image_refl``: whether this micro-batch is one of the plain ReFL ones (``image_refl_plain_every``)."""
        index = step * self.config.optim.gradient_accumulation_steps + micro
        return is_plain_refl_batch(index, self.config.backprop.image_refl_plain_every)

    # --- images with a graph -----------------------------------------------------------------------------------------

    def _rollout(self, prompts: list[str], seeds: list[int], **kwargs: Any):
        sampling = self.config.sampling
        return rollout(
            self.adapter,
            prompts,
            self.plan,
            guidance_scale=sampling.guidance_scale,
            seeds=seeds,
            negative_prompt=sampling.negative_prompt,
            **kwargs,
        )

    def _predict_x0(self, latents: Tensor, index: int, schedule: Schedule, cond: Conditioning) -> Tensor:
        """One denoiser call with grad at step ``index`` and its ``x0`` prediction ``[B, ...]`` fp32."""
        use_checkpoint = self.config.gradient_checkpointing
        t = schedule.timesteps[index]
        output = _call(
            self.adapter.predict, latents, t, cond, self.config.sampling.guidance_scale, use_checkpoint=use_checkpoint
        )
        return predict_original(output, latents, self.adapter.prediction_type, schedule, index)

    def _decode(self, latents: Tensor) -> Tensor:
        return _call(self.adapter.decode, latents, use_checkpoint=self.config.gradient_checkpointing)

    def _conditioning(self, prompts: list[str]) -> Conditioning:
        """``[B]`` conditioning of ``prompts`` as a rollout with the training guidance encodes it."""
        sampling = self.config.sampling
        return prompt_conditioning(self.adapter, prompts, sampling.guidance_scale, sampling.negative_prompt)

    def truncated_images(self, prompts: list[str], seeds: list[int], num_grad: int) -> Tensor:
        """AlignProp / DRaFT-K: the last ``num_grad`` denoiser calls and the decode keep the graph.

        Returns:
            ``[B, 3, H, W]`` images in ``[0, 1]`` with a graph to the trainable parameters.
        """
        grad_steps = truncated_grad_steps(self.config.sampling.num_steps, num_grad)
        grad = GradientPath(grad_steps, checkpointing=self.config.gradient_checkpointing)
        return self._rollout(prompts, seeds, grad=grad).images

    def renoised_images(self, prompts: list[str], seeds: list[int], step: int, micro: int) -> Tensor:
        """DRaFT-LV: ``x0`` without grad, ``n`` copies re-noised to the last step's level, one call each with grad.

        Returns:
            ``[n * B, 3, H, W]`` images, copy-major (``[copy 0 of every sample, copy 1, ...]``).
        """
        trajectory = self._rollout(prompts, seeds, decode=False)
        n, schedule = self.config.backprop.num_renoise, trajectory.schedule
        x0 = trajectory.final_latents.detach()
        generator = torch.Generator().manual_seed(self._seed("renoise", step, micro))
        noise = torch.randn((n * x0.shape[0], *x0.shape[1:]), generator=generator).to(x0.device, x0.dtype)
        x0 = x0.repeat(n, *[1] * (x0.ndim - 1))
        last = schedule.timesteps.shape[0] - 1
        timesteps = schedule.timesteps[last].expand(x0.shape[0])
        noisy = self.adapter.add_noise(x0, noise, timesteps)
        cond = Conditioning.cat([trajectory.conditioning] * n)
        return self._decode(self._predict_x0(noisy, last, schedule, cond))

    def refl_images(self, prompts: list[str], seeds: list[int], mid: int) -> Tensor:
        """ReFL: steps ``0 .. mid-1`` without grad, then one call at ``x_mid`` with grad and its ``x0``.

        Returns:
            ``[B, 3, H, W]`` images decoded from the single-step ``x0`` prediction.
        """
        trajectory = self._rollout(prompts, seeds, decode=False, stop_after=mid)
        latents = trajectory.final_latents.detach()
        x0 = self._predict_x0(latents, mid, trajectory.schedule, trajectory.conditioning)
        return self._decode(x0)

    # --- Direct-Align / SRPO ---------------------------------------------------------------------------------------

    def direct_align_grid(self) -> Tensor:
        """``[L]`` the fine grid of training levels: flow sigmas, or timesteps for epsilon / v models."""
        if self._direct_align_grid is None:
            backprop = self.config.backprop
            schedule = self.adapter.set_timesteps(backprop.direct_align_schedule_steps)
            is_flow = self.adapter.prediction_type == "flow"
            levels = schedule.sigmas if is_flow else schedule.timesteps.float()
            grid = direct_align_grid(
                levels.cpu(), tuple(backprop.direct_align_step_range), backprop.direct_align_grid_size
            )
            self._direct_align_grid = grid
        return self._direct_align_grid

    def direct_align_levels_of(self, m: int, branch: str) -> DirectAlignLevels:
        """The grid positions of one branch for the draw ``m`` with this config's offset."""
        backprop = self.config.backprop
        return direct_align_levels(m, backprop.direct_align_offset, backprop.direct_align_grid_size, branch)

    def _inject(self, x0: Tensor, noise: Tensor, level: float) -> tuple[Tensor, float]:
        """``(x_level, timestep)``: the known noise injected at a grid level (off the sampling schedule)."""
        if self.adapter.prediction_type == "flow":
            return (1 - level) * x0 + level * noise, level * self.adapter.scheduler.config.num_train_timesteps
        alpha = interpolate_alphas_cumprod(self.adapter.scheduler.alphas_cumprod, level)
        return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise, level

    def _recover(self, sample: Tensor, output: Tensor, noise: Tensor, inject: float, recover: float) -> Tensor:
        """One step from ``inject`` to ``recover`` with the model's output, then the known-noise recovery."""
        if self.adapter.prediction_type == "flow":
            return direct_align_recover(sample, output, noise, inject, recover)
        table = self.adapter.scheduler.alphas_cumprod
        alpha_from, alpha_to = interpolate_alphas_cumprod(table, inject), interpolate_alphas_cumprod(table, recover)
        return direct_align_recover_vp(sample, output, noise, alpha_from, alpha_to, self.adapter.prediction_type)

    def direct_align_images(
        self, prompts: list[str], seeds: list[int], m: int
    ) -> tuple[Tensor, list[DirectAlignLevels], Tensor]:
        """Direct-Align: ODE ``x0`` and its initial noise without grad, then per branch the noise injected at the
        branch's level, one denoiser call with grad (both branches in one batch) and the one-step recovery.

        Returns:
            ``(images [n * B, 3, H, W], levels of the n branches, grid)``, branch-major (denoise first).
        """
        backprop = self.config.backprop
        trajectory = self._rollout(prompts, seeds, decode=False)
        x0 = trajectory.final_latents.detach().float()
        with torch.no_grad():  # the rollout's own starting noise, drawn again from the image seeds
            noise = self.adapter.prepare_latents(len(seeds), make_generators(seeds, self.adapter.device)).float()
        grid = self.direct_align_grid()
        branches = ["denoise", "inversion"] if backprop.direct_align_inversion else ["denoise"]
        levels = [self.direct_align_levels_of(m, branch) for branch in branches]
        injected = [self._inject(x0, noise, float(grid[level.inject])) for level in levels]
        samples = torch.cat([sample for sample, _ in injected])
        timesteps = torch.tensor([t for _, t in injected for _ in seeds], device=samples.device)
        cond = Conditioning.cat([trajectory.conditioning] * len(levels))
        output = _call(
            self.adapter.predict,
            samples,
            timesteps,
            cond,
            self.config.sampling.guidance_scale,
            use_checkpoint=self.config.gradient_checkpointing,
        )
        count = len(seeds)
        recovered = [
            self._recover(
                samples[i * count : (i + 1) * count],
                output[i * count : (i + 1) * count],
                noise,
                float(grid[level.inject]),
                float(grid[level.recover]),
            )
            for i, level in enumerate(levels)
        ]
        return self._decode(torch.cat(recovered)), levels, grid

    def direct_align_rewards(
        self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]], levels: list[Any], step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """``[n * B]`` rewards of the branches: SRP (the inversion branch preferring the negative words) or, with
        ``srp: false``, the plain reward. The reward scores one prompt list per call, so SRP scores the images
        twice."""
        backprop, count = self.config.backprop, len(prompts)
        size = backprop.direct_align_grid_size
        kwargs = rewards.metadata_kwargs(self.reward, metadata * len(levels))
        if not backprop.srp:
            return self.reward.score(images, prompts * len(levels), **kwargs), {}
        positive, negative = srp_captions(
            prompts, step, tuple(backprop.srp_positive_words), tuple(backprop.srp_negative_words)
        )
        with_positive = self.reward.score(images, positive * len(levels), **kwargs)
        with_negative = self.reward.score(images, negative * len(levels), **kwargs)
        parts, metrics = [], {}
        for i, level in enumerate(levels):
            rows = slice(i * count, (i + 1) * count)
            if i == 0:  # denoise: prefer the positive words
                k = srp_discount(tuple(backprop.srp_discount), size, level.discount_index)
                parts.append(relative_preference(with_positive[rows], with_negative[rows], k))
                metrics["srp_discount"] = k
            else:  # inversion: the words swap
                k = srp_discount(tuple(backprop.srp_inversion_discount), size, level.discount_index)
                parts.append(relative_preference(with_negative[rows], with_positive[rows], k))
                metrics["srp_inversion_discount"] = k
        metrics["srp_positive_score"] = float(with_positive.detach().float().mean())
        metrics["srp_negative_score"] = float(with_negative.detach().float().mean())
        return torch.cat(parts), metrics

    # --- ImageReFL -------------------------------------------------------------------------------------------------

    def image_refl_images(
        self, captions: list[str], files: list[Path], seeds: list[int], mid: int, step: int, micro: int
    ) -> tuple[Tensor, Tensor]:
        """ImageReFL: the real images encoded and noised to the start step with fresh noise, steps ``start ..
        mid-1`` without grad, one call with grad at ``mid`` and its ``x0``; and the diffusion loss at the start
        step (conditional prediction against the family's target, with grad).

        Returns:
            ``(images [B, 3, H, W], regulariser)``: decoded ``x0`` predictions and the 0-d MSE.
        """
        steps = self.config.sampling.num_steps
        start = image_refl_start(steps, self.config.backprop)
        generator = torch.Generator().manual_seed(self._seed("real_noise", step, micro))
        real = torch.stack([load_real_image(path, self.adapter.height, self.adapter.width) for path in files])
        with torch.no_grad():
            clean = self.adapter.encode_images(real, generator=generator).float()
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        schedule = self.adapter.set_timesteps(steps)
        t_start = schedule.timesteps[start].expand(clean.shape[0])
        noisy = self.adapter.add_noise(clean, noise, t_start).float()
        if mid > start:
            trajectory = self._rollout(
                captions, seeds, decode=False, start_step=start, stop_after=mid, start_latents=noisy
            )
            latents, cond, schedule = trajectory.final_latents.detach(), trajectory.conditioning, trajectory.schedule
        else:
            latents, cond = noisy, self._conditioning(captions)
        images = self._decode(self._predict_x0(latents, mid, schedule, cond))
        # The diffusion loss is ImageReFL's regulariser: the plain conditional training objective on the real image.
        output = _call(
            self.adapter.predict, noisy, t_start, cond, 1.0, use_checkpoint=self.config.gradient_checkpointing
        )
        target = self.adapter.training_target(clean, noise, t_start)
        return images, diffusion_regulariser(output, target)

    # --- loss -----------------------------------------------------------------------------------------------------

    def micro_batch_loss(self, step: int, micro: int) -> tuple[Tensor, dict[str, float]]:
        """Sample one micro-batch with the mode's gradient path and return ``(loss, metrics)``."""
        backprop = self.config.backprop
        prompts, metadata, seeds = self.micro_batch(step, micro)
        metrics: dict[str, float] = {}
        if backprop.mode in ("alignprop", "draft_k"):
            num_grad = self.num_grad_steps(step, micro)
            images = self.truncated_images(prompts, seeds, num_grad)
            metrics["num_grad_steps"] = float(num_grad)
        elif backprop.mode == "draft_lv":
            images = self.renoised_images(prompts, seeds, step, micro)
            prompts, metadata = prompts * backprop.num_renoise, metadata * backprop.num_renoise
        elif backprop.mode == "direct_align":
            return self.direct_align_loss(prompts, metadata, seeds, step, micro)
        elif backprop.mode == "image_refl" and not self.is_plain_refl(step, micro):
            return self.image_refl_loss(seeds, step, micro)
        else:
            mid = self.refl_step(step, micro)
            images = self.refl_images(prompts, seeds, mid)
            metrics["refl_step"] = float(mid)
        scores = self.reward.score(images, prompts, **rewards.metadata_kwargs(self.reward, metadata))
        loss, loss_metrics = reward_loss(scores, backprop.loss, backprop.weight, backprop.target)
        metrics.update({key: float(value) for key, value in loss_metrics.items()})
        return loss, metrics

    def direct_align_loss(
        self, prompts: list[str], metadata: list[dict[str, Any]], seeds: list[int], step: int, micro: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Direct-Align / SRPO: the loss form on the rewards of both branches, averaged over them (SRPO's ``1/2``
        per branch)."""
        backprop = self.config.backprop
        m = self.direct_align_index(step, micro)
        images, levels, grid = self.direct_align_images(prompts, seeds, m)
        scores, metrics = self.direct_align_rewards(images, prompts, metadata, levels, step)
        loss, loss_metrics = reward_loss(scores, backprop.loss, backprop.weight, backprop.target)
        metrics.update({key: float(value) for key, value in loss_metrics.items()})
        metrics.update(direct_align_index=float(m), direct_align_level=float(grid[levels[0].recover]))
        return loss, metrics

    def image_refl_loss(self, seeds: list[int], step: int, micro: int) -> tuple[Tensor, dict[str, float]]:
        """ImageReFL: ``weight * (L_R + image_refl_mse_weight * L_D)`` on a batch of real image-caption pairs."""
        backprop = self.config.backprop
        captions, files = self.real_batch(step, micro)
        mid = self.refl_step(step, micro)
        images, regulariser = self.image_refl_images(captions, files, seeds, mid, step, micro)
        scores = self.reward.score(images, captions)
        reward_term, metrics = reward_loss(scores, backprop.loss, 1.0, backprop.target)
        loss = image_refl_loss(reward_term, regulariser, backprop.weight, backprop.image_refl_mse_weight)
        result = {key: float(value) for key, value in metrics.items()}
        result.update(loss=float(loss.detach()), image_refl_mse=float(regulariser.detach()), refl_step=float(mid))
        return loss, result

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``optim.gradient_accumulation_steps`` micro-batches; returns averaged metrics."""
        accumulation = self.config.optim.gradient_accumulation_steps
        totals: dict[str, float] = {}
        for micro in range(accumulation):
            with self.run.accumulate(sync=micro == accumulation - 1):
                with self.run.autocast(), self.lora_at_every_step():
                    loss, metrics = self.micro_batch_loss(step, micro)
                self.run.backward(loss / accumulation, step=step)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / accumulation
        return {**self.run.reduce_metrics(totals), **self.run.optimizer_step(step=step)}

    @contextlib.contextmanager
    def lora_at_every_step(self) -> Iterator[None]:
        """Training uses the LoRA at every step; the combined generation's limit (``switch_step``) is for
        evaluation and the saved LoRA only."""
        limit, self.adapter.lora_max_timestep = self.adapter.lora_max_timestep, None
        try:
            yield
        finally:
            self.adapter.lora_max_timestep = limit

    # --- the loop ----------------------------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Run to ``max_steps`` optimizer steps (resuming when ``checkpoint.resume_from`` is set), or until
        ``max_minutes`` of wall-clock time are spent (the step running then completes and is saved)."""
        return self.run.run_steps(
            self._timed_step,
            self.trainer_state,
            self.evaluator,
            desc=f"reward_backprop[{self.config.backprop.mode}]",
            postfix=("reward_mean", "loss"),
        )

    def _timed_step(self, step: int) -> dict[str, float]:
        began = time.perf_counter()
        metrics = self.train_step(step)
        metrics["time/step_s"] = time.perf_counter() - began
        return metrics

    def trainer_state(self) -> dict[str, Any]:
        """What resuming needs beyond the runtime's state: nothing, every draw is seeded by the step."""
        return {"mode": self.config.backprop.mode}


def check_differentiable(reward: rewards.Reward) -> None:
    """Refuse a reward whose scores carry no gradient to the images.

    Raises:
        ValueError: naming the reward and the trainers that work without gradients.
    """
    if reward.differentiable:
        return
    name = reward.name
    raise ValueError(
        f"reward {name!r} is not differentiable, so reward_backprop cannot backpropagate through it; train with "
        "method 'grpo' (online RL from scalar rewards) or 'diffusion_dpo' (preference pairs, e.g. built by ranking "
        "samples with this reward) instead, or mark a custom torch reward as differentiable"
    )
