"""Diffusion-DPO (Wallace et al. 2023): offline alignment from pairwise preferences, docs/methods/dpo.md.

Algorithm, per micro-batch of ``data.batch_size`` pairs (preferred ``w`` first, rejected ``l``):

1. Both images are VAE-encoded (a posterior sample, as the references) into latents ``x0_w, x0_l``.
2. One noise ``eps`` and one timestep ``t`` per pair, *shared* by ``w`` and ``l``
   (docs/methods/dpo.md#shared-noise-and-timestep). ``t`` is uniform over the train timesteps for epsilon / v models
   and ``sigma`` is logit-normal(0, 1) for flow models, with ``t = 1000 sigma`` (flow_grpo's ``train_sd3_dpo.py``;
   docs/methods/dpo.md#timestep-sampling). ``x_t = adapter.add_noise(x0, eps, t)`` and the target is the family's
   (epsilon, v, or velocity ``eps - x0``).
3. The policy (LoRA on, or the trained weights) and the reference (LoRA disabled; or a frozen copy of the
   initial denoiser for full fine-tuning; docs/methods/dpo.md#reference-model) predict the target; with per-sample
   MSEs,
   ``loss = -logsigmoid(-0.5 beta ((mse_w - ref_w) - (mse_l - ref_l)))``
   (:func:`diffalign.losses.dpo.diffusion_dpo_loss`; beta defaults per family, ``adapter.default_dpo_beta``), plus an
   optional ``sft_weight * mse_w``; ``dpo.loss: sft`` trains the plain denoising loss on ``w`` only (Salesforce's
   ``--train_method sft``).
4. One optimizer step per ``optim.gradient_accumulation_steps`` micro-batches; ``max_steps`` counts optimizer
   steps (the references' effective batch is ``batch_size x accumulation x processes``, 2048 in the paper,
   docs/methods/dpo.md#published-hyperparameters).

Conditioning: captions are emptied with probability ``data.empty_caption_prob`` (0.2,
docs/methods/dpo.md#caption-dropout) by the dataset; SDXL's micro-conditioning uses each pair's true original size
and crop (docs/methods/dpo.md#sdxl-micro-conditioning), not the Salesforce constant.

Data order: parquet data is streamed (docs/methods/dpo.md#streaming): the row groups are dealt into
``data.num_streams`` fixed streams (one per process by default), each process reads only its own, and each epoch
visits a stream's row groups in a seeded order through a shuffle buffer (``data.shuffle_buffer``); a batch takes
the same number of pairs from every stream, so the global batch does not depend on the number of processes that
share the streams. jsonl and ``datasets`` folders are read into memory, and each epoch is a seeded permutation of
the pairs, split over processes. Either way incomplete batches are dropped, the position (epoch, batch) is in every
checkpoint, and each pair's VAE sample, noise and timestep come from a generator seeded by (seed, epoch, the pair's
data-set index), so a resumed run sees exactly the batches, noise and timesteps of an uninterrupted one, and any
number of processes trains what one does at the same global batch.

Captions: ``data.precompute_text_embeddings`` encodes each unique caption of the process's share once before
training (the caption column only), so that ``model.offload_text_encoders`` can free the text encoders. Logged
metrics are means over processes, and ``num_train_pairs`` the pairs trained in the step over all of them.

Bad data (docs/methods/dpo.md#data): rows dropped at load time may be at most ``data.max_bad_fraction`` of the rows
read. Pairs whose images fail to decode during training are skipped and counted over all processes
(``data/num_skipped``, and the pairs drawn, in every checkpoint); training stops with a
:class:`~diffalign.data.preference.PreferenceDataError` naming the first unreadable records when an optimizer step
has no readable pair at all (it would train nothing), or when the skipped share of the pairs drawn exceeds
``data.max_bad_fraction``, judged from the end of the first step on once :data:`MIN_PAIRS_FOR_SHARE` pairs (or a
whole epoch, for smaller data sets) were drawn.

Deviations from the references: SFT can be added to the DPO loss (``dpo.sft_weight``); flow models map the drawn
``sigma`` through the scheduler's static shift continuously (diffusers' SD3 scripts index the discrete shifted
training schedule; ``dpo.sigma_shift: none`` keeps the unshifted density); the implicit accuracy counts exact ties
as 0.5 (see :func:`~diffalign.losses.dpo.dpo_loss_from_mse`). The full fine-tuning reference stays on the training
device (the Salesforce SDXL script offloads it to the CPU).

Launch: ``diffalign train configs/dpo/sd15_pickapic.yaml`` (``accelerate launch -m diffalign.cli train ...`` on
several GPUs). AI-feedback pairs: ``diffalign pairs ...`` (:mod:`diffalign.data.ai_feedback`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning
from diffalign.config import ConfigError, TrainerConfig
from diffalign.data.preference import (
    MAX_NAMED,
    PreferenceDataError,
    PreferenceDataset,
    StreamingPreferenceDataset,
    collate_preference_batch,
    load_preference_dataset,
    parquet_files,
    stream_preference_dataset,
)
from diffalign.eval.evaluator import Evaluator
from diffalign.losses.dpo import diffusion_dpo_loss, diffusion_sft_loss, smoothed_pair_beta
from diffalign.rewarding import RewardLike, build_reward, score_with_parts
from diffalign.samplers.inversion import forward_coefficients, implied_noise, invert
from diffalign.seeding import derive_seed
from diffalign.trainers.common import TrainingRun


logger = logging.getLogger(__name__)

Batch = dict[str, Any]


def shifted_sigmas(sigmas: Tensor, scheduler_config: Any, fixed_shift: float | None = None) -> Tensor:
    """``shift * s / (1 + (shift - 1) * s)`` with ``fixed_shift`` (``model.timestep_shift``) or else the flow
    scheduler's static ``shift`` (SD3: 3); unchanged without a fixed shift when the scheduler shifts dynamically with
    the resolution (FLUX) or has no shift. ``sigmas``: any shape, in [0, 1]."""
    shift = float(scheduler_config.get("shift", 1.0)) if fixed_shift is None else fixed_shift
    if (fixed_shift is None and scheduler_config.get("use_dynamic_shifting", False)) or shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


"""Folder of the run's saved caption embeddings (``data.precompute_text_embeddings``), one file per process."""

MIN_PAIRS_FOR_SHARE = 20
"""Pairs drawn before the share of unreadable ones is compared with ``data.max_bad_fraction`` (a whole epoch of a
smaller data set is enough)."""


@dataclasses.dataclass(kw_only=True)
class DPODataConfig:
    """The preference pairs (Pick-a-Pic layout, :mod:`diffalign.data.preference`)."""

    source: Path
    """Parquet file or shards, a jsonl file or folder with data.jsonl (what ``diffalign pairs`` writes), or a
    datasets save_to_disk folder. Required."""
    split: str = "train"
    """Split to read from a datasets DatasetDict folder."""
    resolution: int | None = None
    """Training image side; null = the model's native resolution (512 SD1.5, 1024 SDXL)."""
    random_crop: bool = False
    """Random instead of center crop (the reference's --random_crop, off by default)."""
    random_flip: bool = True
    """Mirror each pair with probability 0.5 (the reference flips unless --no_hflip)."""
    keep_ties: bool = False
    """Keep label_0 = 0.5 pairs (the reference drops ties: they have no preferred image)."""
    empty_caption_prob: float = 0.2
    """Share of captions replaced by "" so that CFG keeps working (reference default 0.2,
    docs/methods/dpo.md#caption-dropout)."""
    batch_size: int = 1
    """Pairs per micro-batch on each process (reference: 1, with accumulation 128 on 16 GPUs;
    docs/methods/dpo.md#published-hyperparameters)."""
    num_workers: int = 0
    """DataLoader worker processes for image decoding; 0 decodes in the training process."""
    max_bad_fraction: float = 0.1
    """Largest share of bad data accepted before the run stops with an error naming the first bad records: of the
    rows read, those dropped at load time (unparsable records, invalid labels, missing images; ties do not count),
    and of the pairs drawn during training, those whose image fails to decode (judged once 20 pairs, or a whole
    epoch, were drawn). A step with no readable pair at all always stops the run. 0 = no bad data allowed."""
    num_streams: int | None = None
    """Parquet data (streamed, docs/methods/dpo.md#streaming): the fixed streams the row groups are dealt into; each
    process reads num_streams / processes of them. The global batch depends on the streams, not on the processes:
    fix it (e.g. 8) to get the same batches on 1, 2, 4 or 8 processes. null = one stream per process. Must be a
    multiple of the process count, and data.batch_size a multiple of the streams per process."""
    shuffle_buffer: int = 1000
    """Parquet data: pairs each stream holds for shuffling across row groups (datasets' IterableDataset.shuffle
    default); host memory grows with it (~2 encoded images a pair), not with the data set. 0 = row groups in seeded
    order, rows shuffled within each."""
    precompute_text_embeddings: bool = False
    """Encode each unique caption of this process's share (and "" for caption dropout, and the evaluation prompts)
    once before training into the adapter's text-embedding cache, reading only the caption column; with
    model.offload_text_encoders the encoders then leave the GPU (docs/performance.md#text-embedding-cache). Host
    memory: one conditioning per unique caption."""

    def __post_init__(self) -> None:
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"must be >= 1 or null, got {self.resolution}", key="resolution")
        if not 0.0 <= self.empty_caption_prob <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.empty_caption_prob}", key="empty_caption_prob")
        if self.batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.batch_size}", key="batch_size")
        if self.num_workers < 0:
            raise ConfigError(f"must be >= 0, got {self.num_workers}", key="num_workers")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.max_bad_fraction}", key="max_bad_fraction")
        if self.num_streams is not None and self.num_streams < 1:
            raise ConfigError(f"must be >= 1 or null (one per process), got {self.num_streams}", key="num_streams")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"must be >= 0, got {self.shuffle_buffer}", key="shuffle_buffer")


@dataclasses.dataclass(kw_only=True)
class TimestepDensityConfig:
    """Where the training noise levels are drawn (shared by Diffusion-DPO and the self-play trainers)."""

    timestep_sampling: Literal["auto", "uniform", "logit_normal"] = "auto"
    """``auto``: uniform over the train timesteps for epsilon / v models, logit-normal for flow
    (docs/methods/dpo.md#timestep-sampling)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density (SD3 / flow_grpo: 0)."""
    logit_std: float = 1.0
    """Std of the logit-normal timestep density (SD3 / flow_grpo: 1)."""
    sigma_shift: Literal["scheduler", "none"] = "scheduler"
    """Flow models: ``scheduler`` maps each drawn sigma through the scheduler's static shift,
    ``shift s / (1 + (shift - 1) s)``, as diffusers' SD3 scripts and flow_grpo's SD3 DPO draw from the shifted
    training schedule (median sigma 0.75 at SD3's shift 3); schedulers with dynamic shifting (FLUX) are not
    shifted unless ``model.timestep_shift`` fixes a shift. ``none``: sigma as drawn from the density."""

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ConfigError(f"must be > 0, got {self.logit_std}", key="logit_std")


@dataclasses.dataclass(kw_only=True)
class DPOLossConfig(TimestepDensityConfig):
    """The Diffusion-DPO objective (and the noise levels it trains at, :class:`TimestepDensityConfig`)."""

    loss: Literal["dpo", "sft"] = "dpo"
    """``dpo``: the Diffusion-DPO loss; ``sft``: plain denoising loss on the preferred images (--train_method sft)."""
    beta: float | None = None
    """DPO temperature in the -0.5 * beta convention; it multiplies differences of per-pixel MSEs (~1e-3), hence
    the large values. null = per family: 5000 SD1.x/2.x and SDXL, 100 SD3/FLUX (docs/methods/dpo.md#beta). A diffusers
    research-project beta must be doubled."""
    sft_weight: float = 0.0
    """Add sft_weight * MSE on the preferred image to the DPO loss (0 = pure DPO, as every reference)."""
    offload_frozen: bool = False
    """Keep the frozen text encoders, the VAE and (full fine-tuning) the reference denoiser in CPU memory, each moved
    to the GPU only for its forward (accelerate's ``cpu_offload``), as DiffusionDPO's SDXL script offloads them:
    less GPU memory, slower steps. Results are unchanged."""
    micro_conditioning: Literal["per_pair", "constant"] = "per_pair"
    """SDXL's size/crop conditioning in training: ``per_pair`` gives each pair its true original size and crop (as
    diffusers' SDXL training scripts); ``constant`` gives every pair the training resolution with no crop,
    ``(res, res, 0, 0, res, res)``, as DiffusionDPO's SDXL script (docs/methods/dpo.md#sdxl-micro-conditioning).
    Families without size conditioning refuse ``constant``."""
    flux_guidance: float | None = None
    """Guidance value fed to denoisers that take it as an input (``guidance_embedded`` families: FLUX.1-dev) during
    training; null = the guidance the model samples with (``eval.guidance_scale``, else the family default: 3.5
    for FLUX.1-dev), so that the preference is learned at the guidance it is used at. Other families train without
    CFG and ignore it."""

    noising: Literal["forward", "ddim_inversion", "renoise_inversion"] = "forward"
    """How a clean image reaches its training noise level (docs/methods/dpo.md#inversion). ``forward``: fresh
    Gaussian noise shared by the pair (Diffusion-DPO). ``ddim_inversion`` (DDIM-InPO) and ``renoise_inversion``
    (SmPO): the policy's own ODE run backwards from the image (no CFG, its caption) to the level, training on the noise
    that latent implies, one per image; epsilon and v models as published, flow models by the same step on the
    velocity (an analogue no paper has tested)."""
    inversion_steps: int = 10
    """Grid steps of the inversion over the whole noise range (InPO 10; SmPO 5 for SD1.5, 10 for SDXL); a sample
    walks the grid points below its level, then to the level. Costs that many no-grad policy calls per micro-batch
    (twice as many with ReNoise)."""
    inversion_level: Literal["auto", "destination", "source"] = "auto"
    """The level each inversion step's model call is made at: ``destination`` (the level the step heads to: the
    DDIM-inversion approximation of InPO's and SmPO's code), ``source`` (the level the latent is at: the explicit
    Euler step). ``auto``: destination for epsilon / v models, as published; source for flow models, whose first step
    would otherwise label the clean image with a noise level (docs/methods/dpo.md#inversion)."""
    inversion_eta: float = 0.0
    """InPO's stochastic term: after each inversion step add ``eta`` times the DDIM posterior std of noise (InPO:
    0.1; 0 = deterministic)."""
    smoothing: Literal["none", "reward"] = "none"
    """``reward``: SmPO's smoothed preferences (docs/methods/dpo.md#smoothed-preferences): each pair is scored by the
    config's ``reward`` under its captions, the reward's winner is trained as the winner, and beta becomes per pair
    ``beta * smoothing_scale * (2 sigmoid((r_w - r_l) / smoothing_temperature) - 1)``."""
    smoothing_temperature: float = 16.658
    """Score difference scale of the smoothed preference; SmPO's: the range of PickScore's cosine in its code
    (0.1666), 16.66 on diffalign's ``pickscore`` reward (100 x cosine)."""
    smoothing_scale: float = 10.0
    """The constant factor of the smoothed beta (SmPO's code: 10)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"must be > 0 or null (family default), got {self.beta}", key="beta")
        if self.sft_weight < 0:
            raise ConfigError(f"must be >= 0, got {self.sft_weight}", key="sft_weight")
        if self.inversion_steps < 1:
            raise ConfigError(f"must be >= 1, got {self.inversion_steps}", key="inversion_steps")
        if self.inversion_eta < 0:
            raise ConfigError(f"must be >= 0, got {self.inversion_eta}", key="inversion_eta")
        if self.inversion_eta and self.noising == "forward":
            raise ConfigError(
                "inversion_eta adds noise along an inversion: set noising: ddim_inversion (InPO), or inversion_eta: 0",
                key=("inversion_eta", "noising"),
            )
        for name in ("smoothing_temperature", "smoothing_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)}", key=name)
        if self.smoothing != "none" and self.loss != "dpo":
            raise ConfigError("smoothing reweights pairs of the DPO loss: set loss: dpo", key=("smoothing", "loss"))


@dataclasses.dataclass(kw_only=True)
class DiffusionDPOConfig(TrainerConfig):
    """Config of the ``diffusion_dpo`` trainer (offline Diffusion-DPO from preference pairs)."""

    resume_safe_keys: ClassVar[tuple[str, ...]] = (
        "reward",
        "data.num_workers",
        "data.max_bad_fraction",
        "data.precompute_text_embeddings",
    )
    """Offline DPO uses its reward for evaluation only; decoding workers, the bad-data limit and the caption cache
    change no draw."""

    method: Literal["diffusion_dpo"] = "diffusion_dpo"
    """Trainer name (``diffalign train`` picks the trainer from it)."""
    max_steps: int = 2000
    """Optimizer steps (reference launchers: 2000; docs/methods/dpo.md#published-hyperparameters)."""
    data: DPODataConfig
    """Preference data."""
    dpo: DPOLossConfig = dataclasses.field(default_factory=DPOLossConfig)
    """The objective."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.offload_text_encoders != "keep" and not self.data.precompute_text_embeddings:
            raise ConfigError(
                f"offload_text_encoders: {self.model.offload_text_encoders} needs every caption's text embeddings "
                "cached first: set data.precompute_text_embeddings: true",
                key=("model.offload_text_encoders", "data.precompute_text_embeddings"),
            )
        if self.dpo.smoothing == "reward" and self.reward is None:
            raise ConfigError(
                "smoothed preferences score every pair with a reward: set reward (SmPO: pickscore)",
                key=("reward", "dpo.smoothing"),
            )
        if self.eval.every > 0 and self.reward is None:
            raise ConfigError(
                "evaluation scores its images with a reward: set reward (e.g. pickscore), or eval.every = 0",
                key=("reward", "eval.every"),
            )


def _share_identical_images(latents: Tensor, batch: Batch) -> Tensor:
    """``[2B, ...]`` winner-then-loser latents in which each pair whose two images are the same pixels (a text
    preference pair) uses the winner's VAE sample for the loser too, so that the pair differs by its captions alone
    (docs/methods/dpo.md#text-preference-pairs)."""
    size = len(batch["captions"])
    same = [torch.equal(win, lose) for win, lose in zip(batch["pixel_values_w"], batch["pixel_values_l"])]
    if not any(same):
        return latents
    latents = latents.clone()
    for i in (i for i, equal in enumerate(same) if equal):
        latents[size + i] = latents[i]
    return latents


def _swap_pairs(batch: Batch, flip: Tensor) -> Batch:
    """``batch`` with winner and loser exchanged (images and captions) in the pairs where ``flip`` (``[B]`` bool)."""
    mask = flip.view(-1, 1, 1, 1)
    swapped = dict(batch)
    swapped["pixel_values_w"] = torch.where(mask, batch["pixel_values_l"], batch["pixel_values_w"])
    swapped["pixel_values_l"] = torch.where(mask, batch["pixel_values_w"], batch["pixel_values_l"])
    captions_l = batch.get("captions_l", batch["captions"])
    pairs = list(zip(batch["captions"], captions_l, batch["judged_captions"], flip.tolist(), strict=True))
    swapped["captions"] = [loser if f else winner for winner, loser, _, f in pairs]
    swapped["captions_l"] = [winner if f else loser for winner, loser, _, f in pairs]
    swapped["judged_captions"] = [judged[::-1] if f else judged for _, _, judged, f in pairs]
    return swapped


def sample_training_timesteps(
    adapter: Any, dpo: TimestepDensityConfig, batch_size: int, generator: torch.Generator
) -> Tensor:
    """``[batch_size]`` training timesteps on the scheduler's 0..1000 scale, as ``dpo.timestep_sampling`` says:
    integers uniform over the train timesteps for epsilon / v models, ``1000 sigma`` with ``sigma`` logit-normal (then
    shifted per ``dpo.sigma_shift``) for flow models (docs/methods/dpo.md#timestep-sampling)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    num_train = adapter.scheduler.config.num_train_timesteps
    flow = adapter.prediction_type == "flow"
    scheme = dpo.timestep_sampling
    if scheme == "auto":
        scheme = "logit_normal" if flow else "uniform"
    if scheme == "uniform" and not flow:
        return torch.randint(0, num_train, (batch_size,), generator=generator)
    u = compute_density_for_timestep_sampling(
        "logit_normal" if scheme == "logit_normal" else "uniform",
        batch_size,
        logit_mean=dpo.logit_mean,
        logit_std=dpo.logit_std,
        generator=generator,
    )
    if flow and dpo.sigma_shift == "scheduler":
        u = shifted_sigmas(u, adapter.scheduler.config, adapter.timestep_shift)
    return u * num_train if flow else (u * num_train).long().clamp(max=num_train - 1)


# ---------------------------------------------------------------------------------------------------------------------


class DiffusionDPOTrainer:
    """Diffusion-DPO trainer; see the module docstring.

    Args:
        config: a :class:`DiffusionDPOConfig`.
        run: an existing :class:`TrainingRun` (tests, the Python API); built from the config by default.
        reward: the evaluation reward instead of ``config.reward``: a :class:`rewards.Reward`, a scoring function
            ``fn(images, prompts) -> Tensor[B]``, or anything ``config.reward`` may hold.
    """

    def __init__(
        self, config: DiffusionDPOConfig, run: TrainingRun | None = None, reward: RewardLike | None = None
    ) -> None:
        self.config = config
        resolution = config.data.resolution
        kwargs = {"height": resolution, "width": resolution} if resolution else {}
        self.run = run or TrainingRun(config, adapter_kwargs=kwargs)
        self.adapter = self.run.adapter
        self.resolution = self._check_resolution(resolution)
        self.beta = config.dpo.beta if config.dpo.beta is not None else self.adapter.default_dpo_beta
        if config.dpo.micro_conditioning == "constant" and self.adapter.family != "sdxl":
            raise ConfigError(
                f"only SDXL is conditioned on image size and crop; {self.adapter.family} has nothing to make constant",
                key="dpo.micro_conditioning",
            )
        sampled_at = config.eval.guidance_scale or self.adapter.default_guidance_scale
        self.training_guidance = config.dpo.flux_guidance if config.dpo.flux_guidance is not None else sampled_at
        """The guidance-embedding value in training (``dpo.flux_guidance``; guidance-embedded families only)."""
        level = config.dpo.inversion_level
        self.inversion_level = (
            level if level != "auto" else "source" if self.adapter.prediction_type == "flow" else "destination"
        )
        """Where each inversion step's model call is made (``dpo.inversion_level`` resolved for the family)."""
        self.dataset = self._load_dataset()
        self.num_batches = self._num_batches()
        reward = reward if reward is not None else config.reward
        self.reward = build_reward(reward, device=self.run.device) if reward is not None else None
        self.evaluator = Evaluator.from_config(
            config, self.adapter, self.reward, self.run.output_dir, self.run.accelerator
        )
        if config.data.precompute_text_embeddings:
            self.cache_captions()
        if config.dpo.loss == "dpo":
            self.run.snapshot_reference()  # full fine-tuning: freeze the initial weights (a no-op with LoRA)
        if config.dpo.offload_frozen:
            self.run.offload_frozen()
        self.position = (0, 0)  # (epoch, index of the next batch in that epoch)
        # Over all processes, so every process holds (and a checkpoint stores) the same values.
        self.num_skipped = 0  # pairs drawn whose image failed to decode
        self.num_seen = 0  # pairs drawn
        self.bad_examples: list[str] = []  # the first MAX_NAMED distinct unreadable records

    def _check_resolution(self, resolution: int | None) -> int:
        height, width = self.adapter.height, self.adapter.width
        if height != width or (resolution is not None and resolution != height):
            raise ValueError(
                f"the model works at {height}x{width} but the data is cut to squares of "
                f"{resolution or height}: set data.resolution to the adapter's square resolution"
            )
        return height

    def _load_dataset(self) -> PreferenceDataset | StreamingPreferenceDataset:
        """The pairs: parquet is streamed, this process reading its own streams (docs/methods/dpo.md#streaming);
        jsonl and ``datasets`` folders are read into memory on every process."""
        data = self.config.data
        options = {
            "resolution": self.resolution,
            "random_crop": data.random_crop,
            "random_flip": data.random_flip,
            "keep_ties": data.keep_ties,
            "empty_caption_prob": data.empty_caption_prob,
            "seed": self.config.seed,
            "max_bad_fraction": data.max_bad_fraction,
        }
        if parquet_files(data.source) is None:
            return load_preference_dataset(data.source, split=data.split, **options)
        world, rank = self.run.accelerator.num_processes, self.run.accelerator.process_index
        streams = data.num_streams or world
        per_process = streams // world
        if streams % world or data.batch_size % per_process:  # a multiple of world is >= world: no zero
            raise ConfigError(
                f"{streams} data streams cannot be shared by {world} process(es) with data.batch_size "
                f"{data.batch_size}: data.num_streams must be a multiple of the process count, and data.batch_size "
                "a multiple of the streams per process (null streams = one per process)",
                key=("data.num_streams", "data.batch_size"),
            )
        return stream_preference_dataset(
            data.source,
            num_streams=streams,
            streams=range(rank * per_process, (rank + 1) * per_process),
            stream_batch_size=data.batch_size // per_process,
            shuffle_buffer=data.shuffle_buffer,
            **options,
        )

    def _num_batches(self) -> int:
        world, size = self.run.accelerator.num_processes, self.config.data.batch_size
        if isinstance(self.dataset, StreamingPreferenceDataset):
            if self.dataset.num_batches == 0:
                pairs, streams = min(self.dataset.stream_pairs), len(self.dataset.stream_pairs)
                raise ValueError(
                    f"the smallest of the {streams} data streams holds {pairs} usable pairs, fewer than one batch "
                    f"({self.dataset.stream_batch_size} pairs of each stream): lower data.batch_size or "
                    "data.num_streams, or add data"
                )
            return self.dataset.num_batches
        num_batches = len(self.dataset) // world // size
        if num_batches == 0:
            raise ValueError(
                f"{len(self.dataset)} usable pairs are fewer than one batch ({size} pairs x {world} processes): "
                "lower data.batch_size or add data"
            )
        return num_batches

    def cache_captions(self) -> int:
        """``data.precompute_text_embeddings``: encode each unique caption this process trains on (``""`` too when
        captions are dropped) and the evaluation prompts once into the adapter's text-embedding cache, then release
        the text encoders as ``model.offload_text_encoders`` says (:meth:`TrainingRun.cache_text_embeddings`, which
        also saves the cache for a resume). Returns how many encodings were made."""
        # DPO trains without CFG: captions are encoded without the unconditional branch, as text_use at guidance 1.
        no_guidance = SimpleNamespace(guidance_scale=1.0, negative_prompt=None)
        return self.run.cache_text_embeddings(self._unique_captions(), no_guidance, self.evaluator, shared=False)

    def _unique_captions(self) -> list[str]:
        """Every caption this process may train on, once: its streams' (reading only the caption and label columns),
        or the whole in-memory set's; ``""`` as well when captions are dropped."""
        if isinstance(self.dataset, StreamingPreferenceDataset):
            captions = self.dataset.captions()
        else:
            table = self.dataset.table
            own = table.captions_1 or [None] * len(table.captions)  # text pairs: the losers' captions too
            captions = (c for row in self.dataset.rows for c in (table.captions[row], own[row]) if c is not None)
        unique = dict.fromkeys(captions)
        if self.config.data.empty_caption_prob > 0:
            unique[""] = None
        return list(unique)

    # --- data -------------------------------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches for ``epoch``: dataset indices (in-memory data), or the data-set rows of the pairs
        (streamed parquet; the order alone, no image read).

        In memory, every process draws the same seeded permutation and takes every ``num_processes``-th index;
        incomplete batches are dropped so that all processes run the same number of micro-batches. Streamed, each
        process takes ``batch_size / streams per process`` pairs of each of its streams
        (:class:`~diffalign.data.preference.StreamingPreferenceDataset`).
        """
        if isinstance(self.dataset, StreamingPreferenceDataset):
            return [[item.index for item in batch] for batch in self.dataset.batches(epoch, images=False)]
        accelerator = self.run.accelerator
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "dpo/order", epoch))
        order = torch.randperm(len(self.dataset), generator=generator)
        world, size = accelerator.num_processes, self.config.data.batch_size
        local = order[accelerator.process_index :: world][: len(order) // world].tolist()
        return [local[i : i + size] for i in range(0, self.num_batches * size, size)]

    def _epoch_sampler(self, epoch: int, start: int) -> Iterable[list[Any]]:
        """What the DataLoader hands the dataset from batch ``start`` of ``epoch`` on: lists of indices, or of
        streamed items (the stream reads row groups in this process; DataLoader workers decode)."""
        if isinstance(self.dataset, StreamingPreferenceDataset):
            return self.dataset.batches(epoch, start)
        self.dataset.set_epoch(epoch)
        return self.epoch_batches(epoch)[start:]

    def batch_stream(self, epoch: int, start: int) -> Iterator[tuple[int, int, Batch]]:
        """Endless ``(epoch, batch_index, batch)`` from position ``(epoch, start)``, epoch after epoch."""
        from torch.utils.data import DataLoader

        while True:
            loader = DataLoader(
                self.dataset,
                batch_sampler=self._epoch_sampler(epoch, start),
                collate_fn=collate_preference_batch,
                num_workers=self.config.data.num_workers,
            )
            for index, batch in enumerate(loader, start=start):
                yield epoch, index, batch
            epoch, start = epoch + 1, 0

    def _advance(self, epoch: int, index: int) -> None:
        """Record that batch ``index`` of ``epoch`` was consumed."""
        self.position = (epoch + 1, 0) if index + 1 >= self.num_batches else (epoch, index + 1)

    # --- the loss ---------------------------------------------------------------------------------------------------

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """``[batch_size]`` timesteps on the scheduler's 0..1000 scale (:func:`sample_training_timesteps`)."""
        return sample_training_timesteps(self.adapter, self.config.dpo, batch_size, generator)

    def conditioning(self, batch: Batch, key: str = "captions") -> Conditioning:
        """``[B]`` text conditioning of the captions (``key="captions_l"``: the losers' own captions), with each pair's
        original size and crop for the families conditioned on them (SDXL)."""
        cond = self.adapter.encode_prompt(batch[key], with_negative=False)
        if self.config.dpo.micro_conditioning == "constant":  # the encoder's default: the training size, no crop
            return cond
        return self.adapter.with_size_conditioning(cond, batch["original_sizes"], batch["crop_top_lefts"])

    def pair_generators(self, epoch: int, indices: Tensor) -> list[torch.Generator]:
        """One CPU generator per pair, seeded by (seed, epoch, the pair's data-set index): a pair's VAE sample, noise
        and timestep do not depend on the process that trains it nor on the pairs beside it, so any number of
        processes trains what one process does at the same global batch."""
        seed = self.config.seed
        return [torch.Generator().manual_seed(derive_seed(seed, "dpo/pair", epoch, int(i))) for i in indices]

    def loss(
        self, batch: Batch, generator: torch.Generator | list[torch.Generator]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch of ``B`` pairs and its metrics (see the module docstring).

        Args:
            batch: a :func:`~diffalign.data.preference.collate_preference_batch` batch with ``B >= 1``:
                ``pixel_values_w``/``pixel_values_l`` ``[B, 3, R, R]`` in [0, 1], ``captions`` and (SDXL)
                ``original_sizes``/``crop_top_lefts`` ``[B, 2]``.
            generator: CPU generator for the VAE posterior samples, the noises and the timesteps; or one per pair
                (:meth:`pair_generators`), each drawing its pair's.

        Returns:
            ``(loss, metrics)``: the scalar loss and detached 0-d metric tensors.
        """
        adapter, run = self.adapter, self.run
        size = len(batch["captions"])
        sft_only = self.config.dpo.loss == "sft"
        beta, smoothing = self.beta, {}
        if self.config.dpo.smoothing == "reward":
            batch, beta, smoothing = self.smoothed_pairs(batch)
        pixels = batch["pixel_values_w"] if sft_only else torch.cat([batch["pixel_values_w"], batch["pixel_values_l"]])
        copies = pixels.shape[0] // size
        per_pair = isinstance(generator, list)
        with torch.no_grad():
            latents = adapter.encode_images(pixels, generator=generator * copies if per_pair else generator)
            if not sft_only:
                latents = _share_identical_images(latents, batch)
        # Same noise and timestep for the winner and the loser of a pair
        # (docs/methods/dpo.md#shared-noise-and-timestep).
        shape = latents.shape[1:]
        if per_pair:
            noise = torch.stack([torch.randn(shape, generator=g) for g in generator])
            timesteps = torch.cat([self.sample_timesteps(1, g) for g in generator])
        else:
            noise = torch.randn((size, *shape), generator=generator)
            timesteps = self.sample_timesteps(size, generator)
        noise = noise.to(latents).repeat(copies, *[1] * len(shape))
        timesteps = timesteps.to(adapter.device).repeat(copies)
        cond = self.conditioning(batch)
        if not sft_only:  # the losers under their own captions when they have them (text preference pairs)
            own = batch.get("captions_l", batch["captions"]) != batch["captions"]
            cond = Conditioning.cat([cond, self.conditioning(batch, "captions_l") if own else cond])
        guidance = self.training_guidance if adapter.guidance_embedded else 1.0
        if self.config.dpo.noising != "forward":  # the drawn noise stays where the level is clean (flow sigma 0)
            noise = self.inverted_noise(latents, timesteps, cond, guidance, generator, copies, fallback=noise)
        noisy = adapter.add_noise(latents, noise, timesteps)
        target = adapter.training_target(latents, noise, timesteps)
        with run.autocast():
            pred = adapter.predict(noisy, timesteps, cond, guidance)
        if sft_only:
            loss = diffusion_sft_loss(pred, target)
            return loss, {"loss": loss.detach(), "sft_loss": loss.detach()}
        with torch.no_grad(), run.reference(), run.autocast():
            ref = adapter.predict(noisy, timesteps, cond, guidance)
        loss, metrics = diffusion_dpo_loss(
            pred[:size],
            pred[size:],
            ref[:size],
            ref[size:],
            target[:size],
            target[size:],
            beta,
            sft_weight=self.config.dpo.sft_weight,
        )
        return loss, {**metrics, **smoothing}

    def inverted_noise(
        self,
        latents: Tensor,
        timesteps: Tensor,
        cond: Conditioning,
        guidance: float,
        generator: torch.Generator | list[torch.Generator],
        copies: int,
        fallback: Tensor | None = None,
    ) -> Tensor:
        """``[N, ...]`` the noise each clean latent implies after the policy's inversion to its timestep (InPO /
        SmPO, ``dpo.noising``; docs/methods/dpo.md#inversion): one per image, no longer shared by a pair.

        Args:
            latents: ``[N, ...]`` clean latents (``N = copies * B``, winners first).
            timesteps: ``[N]`` their training levels.
            cond: ``[N]`` their captions' conditioning (the inversion runs without CFG).
            guidance: the guidance-embedding value of guidance-embedded families.
            generator: as :meth:`loss` (the noise of ``dpo.inversion_eta``).
            copies: images per pair in ``latents``.
            fallback: ``[N, ...]`` the noise of a latent whose level is clean (flow sigma 0: any noise fits).
        """
        dpo, adapter = self.config.dpo, self.adapter

        def predict(sample: Tensor, levels: Tensor) -> Tensor:
            with self.run.autocast():
                return adapter.predict(sample, levels, cond, guidance)

        def draw_noise(shape: torch.Size) -> Tensor:
            if isinstance(generator, list):
                return torch.stack([torch.randn(shape[1:], generator=g) for g in generator * copies])
            return torch.randn(shape, generator=generator)

        inverted = invert(
            predict,
            adapter,
            latents,
            timesteps,
            dpo.inversion_steps,
            renoise=dpo.noising == "renoise_inversion",
            eta=dpo.inversion_eta,
            draw_noise=draw_noise,
            at=self.inversion_level,
        )
        coefficients = forward_coefficients(adapter, timesteps, latents)
        return implied_noise(latents, inverted, coefficients, fallback).to(latents)

    def smoothed_pairs(self, batch: Batch) -> tuple[Batch, Tensor, dict[str, Tensor]]:
        """SmPO's smoothed preferences (``dpo.smoothing: reward``; docs/methods/dpo.md#smoothed-preferences).

        Both images of each pair are scored by the reward under their captions before caption dropout; a pair the
        reward prefers the other way round is relabelled (winner and loser swap, as SmPO's preprocessing relabels
        by PickScore), and each pair gets its own beta (:func:`~diffalign.losses.dpo.smoothed_pair_beta`).

        Returns:
            ``(batch, beta, metrics)``: the relabelled batch, ``[B]`` per-pair betas, and detached metrics
            ``smoothing/beta`` (mean) and ``smoothing/relabelled`` (share of pairs swapped).
        """
        dpo = self.config.dpo
        judged = batch["judged_captions"]
        images = torch.cat([batch["pixel_values_w"], batch["pixel_values_l"]])
        prompts = [pair[0] for pair in judged] + [pair[1] for pair in judged]
        scores = score_with_parts(self.reward, images, prompts)["reward"]
        if not torch.isfinite(scores).all():
            bad = prompts[int(torch.nonzero(~torch.isfinite(scores))[0])]
            raise ValueError(
                f"the reward returned NaN or inf for a preference image of {bad!r}: smoothing needs finite scores; "
                "check the reward, or set dpo.smoothing: none"
            )
        score_w, score_l = scores.chunk(2)
        flip = score_l > score_w  # [B]
        batch = _swap_pairs(batch, flip) if bool(flip.any()) else batch
        beta = smoothed_pair_beta(
            self.beta,
            torch.maximum(score_w, score_l),
            torch.minimum(score_w, score_l),
            dpo.smoothing_temperature,
            dpo.smoothing_scale,
        ).to(self.run.device)
        return batch, beta, {"smoothing/beta": beta.mean().detach(), "smoothing/relabelled": flip.float().mean()}

    # --- training ---------------------------------------------------------------------------------------------------

    def _pair_counts(self, batch: Batch) -> tuple[int, int, int]:
        """``(fewest, kept, skipped)`` pairs of this micro-batch over all processes, the same on every process.

        ``fewest`` is the least number of readable pairs on one process: when it is 0 every process skips the
        micro-batch together. ``kept`` and ``skipped`` are sums over processes.
        """
        counts = torch.tensor([[len(batch["captions"]), int(batch["num_skipped"])]], device=self.run.device)
        if self.run.accelerator.num_processes > 1:
            counts = self.run.accelerator.gather(counts)  # [processes, 2]
        return int(counts[:, 0].min()), int(counts[:, 0].sum()), int(counts[:, 1].sum())

    def _gather_notes(self, notes: list[str]) -> list[str]:
        """The descriptions of unreadable pairs of every process (call on all processes together)."""
        if self.run.accelerator.num_processes == 1:
            return notes
        from accelerate.utils import gather_object

        return gather_object(notes)

    def _min_pairs_for_share(self) -> int:
        """Pairs drawn before the unreadable share is judged: MIN_PAIRS_FOR_SHARE, or one epoch if fewer."""
        per_epoch = self.num_batches * self.config.data.batch_size * self.run.accelerator.num_processes
        return min(MIN_PAIRS_FOR_SHARE, per_epoch)

    def _check_data(self, step: int, kept: int, skipped: int, notes: list[str]) -> None:
        """Count an optimizer step's pairs (all processes) and stop if it has none readable or too many are bad.

        Args:
            step: the 0-based optimizer step.
            kept, skipped: the step's readable and unreadable pairs, summed over processes.
            notes: this process's descriptions of the step's unreadable pairs.

        Raises:
            PreferenceDataError: on every process together (the decisions use counts gathered over processes).
        """
        self.num_seen += kept + skipped
        self.num_skipped += skipped
        step_notes = list(dict.fromkeys(self._gather_notes(notes[:MAX_NAMED]))) if skipped else []
        for note in step_notes:
            if len(self.bad_examples) < MAX_NAMED and note not in self.bad_examples:
                self.bad_examples.append(note)
        if kept == 0:
            raise PreferenceDataError(self._empty_step_message(step, skipped, step_notes))
        share, limit = self.num_skipped / self.num_seen, self.config.data.max_bad_fraction
        if self.num_seen >= self._min_pairs_for_share() and share > limit:
            raise PreferenceDataError(
                f"{self.num_skipped} of the {self.num_seen} pairs drawn by optimizer step {step + 1} ({share:.0%}) "
                f"had an unreadable image, more than data.max_bad_fraction = {limit}. First unreadable records: "
                f"{'; '.join(self.bad_examples)}. Repair or remove these records, or raise data.max_bad_fraction "
                "to train on the readable pairs."
            )

    def _empty_step_message(self, step: int, skipped: int, notes: list[str]) -> str:
        """Why a step with no readable pair stops the run, naming its unreadable records."""
        data, accumulation = self.config.data, self.config.optim.gradient_accumulation_steps
        world = self.run.accelerator.num_processes
        return (
            f"optimizer step {step + 1} has no readable pair: all {skipped} of its pairs ({data.batch_size} per "
            f"micro-batch x {accumulation} micro-batch(es) x {world} process(es)) have an unreadable image, so it "
            f"would train nothing. Unreadable records: {'; '.join(notes[:MAX_NAMED])}. Repair or remove them (if "
            "few records are bad, a larger data.batch_size or optim.gradient_accumulation_steps also avoids "
            "steps made only of bad pairs)."
        )

    def _sync_gradients(self) -> None:
        """Average the gradients over processes by hand: the step's last micro-batch, which syncs, was skipped."""
        accelerator = self.run.accelerator
        for param in self.run.params:
            if param.grad is not None:
                param.grad = accelerator.reduce(param.grad, reduction="mean")

    def train_step(self, stream: Iterator[tuple[int, int, Batch]], step: int) -> dict[str, float]:
        """One optimizer step over ``optim.gradient_accumulation_steps`` micro-batches; returns the mean metrics."""
        accumulation = self.config.optim.gradient_accumulation_steps
        totals: dict[str, float] = {}
        count, synced, kept, skipped, notes, trained = 0, True, 0, 0, [], 0
        for micro in range(accumulation):
            epoch, index, batch = next(stream)
            self._advance(epoch, index)
            fewest, batch_kept, batch_skipped = self._pair_counts(batch)
            kept, skipped, notes = kept + batch_kept, skipped + batch_skipped, notes + batch["skipped"]
            if fewest == 0:
                where = " on some process" if self.run.accelerator.num_processes > 1 else ""
                logger.warning("micro-batch %d of epoch %d has no readable pair%s; skipped", index, epoch, where)
                continue
            synced = micro == accumulation - 1
            with self.run.accumulate(sync=synced):
                loss, metrics = self.loss(batch, self.pair_generators(epoch, batch["indices"]))
                self.run.backward(loss / accumulation, step=step)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
            trained += len(batch["captions"])
        self._check_data(step, kept, skipped, notes)  # raises before an update when the data is too bad
        if count == 0:  # some process lacked a pair in every micro-batch (the same decision everywhere)
            raise PreferenceDataError(
                f"optimizer step {step + 1} trains nothing: in each of its micro-batches some process has no readable "
                f"pair. First unreadable records: {'; '.join(self.bad_examples)}. Repair or remove them, or use a "
                "larger data.batch_size"
            )
        if not synced and self.run.accelerator.num_processes > 1:
            self._sync_gradients()
        local = {key: value / count for key, value in totals.items()}
        local["num_train_pairs"] = float(trained)
        # Each process's means and pair count, over all processes (the optimizer's metrics are global already).
        metrics = self.run.reduce_metrics(local, sums=("num_train_pairs",))
        metrics.update(self.run.optimizer_step(step=step))
        metrics.update({"data/num_skipped": float(self.num_skipped), "data/epoch": float(self.position[0])})
        return metrics

    def train(self) -> dict[str, float]:
        """Run to ``max_steps`` optimizer steps (resuming when ``checkpoint.resume_from`` is set), or until
        ``max_minutes`` of wall-clock time are spent (the step running then completes and is saved).

        Returns:
            The metrics of the last step.
        """
        state = self.run.resume()
        self.position = (int(state.get("epoch", 0)), int(state.get("batch", 0)))
        self.num_skipped = int(state.get("num_skipped", 0))
        self.num_seen = int(state.get("num_seen", 0))
        self.bad_examples = list(state.get("bad_examples", []))
        stream = self.batch_stream(*self.position)
        return self.run.run_steps(
            lambda step: self.train_step(stream, step),
            self.trainer_state,
            self.evaluator,
            desc="diffusion_dpo",
            postfix=("loss", "implicit_acc"),
            log_mean=True,
            resumed=state,
        )

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the runtime's state: the data position and the bad-data counters."""
        epoch, batch = self.position
        return {
            "epoch": epoch,
            "batch": batch,
            "num_skipped": self.num_skipped,
            "num_seen": self.num_seen,
            "bad_examples": list(self.bad_examples),
        }
