"""Self-play rounds: RAFT, SPIN-Diffusion and SePPO, docs/methods/self-play.md.

All three alternate two phases. At the start of each round (every ``self_play.steps_per_round`` optimizer
steps) the model as it is then, ``theta_k``, samples images with the deterministic ODE; the round's optimizer steps
then train on what it sampled:

- ``method: raft`` (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment"):
  ``self_play.samples_per_prompt`` images of each prompt are scored by the reward; the best
  ``self_play.keep_per_prompt`` of each prompt are kept (local ranking), then the best ``self_play.keep_share`` of
  those over all prompts (global ranking); the round trains the plain denoising loss on the kept images. No
  reference model and no KL: the filter is the only alignment signal.
- ``method: spin`` (Yuan et al. 2024, "Self-Play Fine-Tuning of Diffusion Models for Text-to-Image Generation"):
  ``theta_k`` samples one image for each caption of real image-caption pairs (``sampling.real_images``); the round
  trains Diffusion-DPO with the real image as the winner, the model's own image as the loser, and ``theta_k`` itself
  as the reference (not the base model): ``-logsigmoid(-0.5 beta ((mse_w - mse_w^k) - (mse_l - mse_l^k)))``, the
  paper's approximate objective, whose fixed point is the data distribution.
- ``method: seppo`` (Zhang, Lan et al. 2024, "SePPO: Semi-Policy Preference Optimization for Diffusion
  Alignment"): as spin, but the round's reference (and sampler of its "reference samples") is a *previous* round's
  model drawn uniformly (round 0: the initial model), and each pair's reference-sample term is signed by the winner,
  the anchor (:func:`~diffalign.losses.dpo.anchored_dpo_loss_from_mse`): when the reference fits the winner better
  than the policy does, the reference sample counts as a winner too.

Each image's noise and timestep are drawn as Diffusion-DPO draws them (``dpo.timestep_sampling``; a winner and its
loser share both). Samples are kept as the sampler's final latents: the round trains on exactly what ``theta_k``
generated, without a VAE decode and re-encode (the references fine-tune on decoded images; for a VAE that
reconstructs its own latents the two agree up to its reconstruction error).

Round data and the reference: ``theta_k``'s trainable weights are written to
``<output_dir>/self_play/round-<r>.safetensors`` when round ``r`` starts (older rounds' files are removed once no
checkpoint lies in them); a resumed run reads its round's back, samples the round's data again with them (the same
seeds, the same images) and uses them as SPIN's reference, so a resumed run trains what an uninterrupted one does.

Processes: each process samples and trains on its own share of the round's prompts (every ``num_processes``-th;
a round must draw at least one per process); RAFT's global ranking gathers the scores (not the images) so that every
process applies the same threshold, and a process whose share the cut empties keeps its own best sample. Each
process draws its micro-batches from its own kept samples, so with several processes the mix of a step can differ
from what one process would draw. FSDP sharding is not supported (the reference swaps whole weight tensors).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from diffalign.config import ConfigError, TrainerConfig
from diffalign.data.edits import refuse_source_images
from diffalign.data.image_captions import load_real_image, load_real_pairs
from diffalign.data.prompts import load_prompts_and_metadata
from diffalign.eval.evaluator import Evaluator
from diffalign.losses.dpo import anchored_dpo_loss_from_mse, diffusion_dpo_loss, diffusion_sft_loss, per_sample_mse
from diffalign.rewarding import RewardLike, build_reward, score_with_parts
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import rollout
from diffalign.seeding import derive_seed
from diffalign.trainers.common import TrainingRun
from diffalign.trainers.diffusion_dpo import TimestepDensityConfig, sample_training_timesteps


logger = logging.getLogger(__name__)

ROUNDS_FOLDER = "self_play"
"""Each round's starting weights, ``<output_dir>/self_play/round-<r>.safetensors``."""


@dataclasses.dataclass(kw_only=True)
class SelfPlaySamplingConfig:
    """How each round's images are sampled (the deterministic ODE of the family)."""

    prompts: list[str] | Path | None = None
    """``raft``: the prompts to sample: a list, a text file with one prompt per line, or a JSONL of
    ``{"prompt": ...}`` records. Required for raft."""
    real_images: Path | None = None
    """``spin``: the real image-caption pairs, a JSONL of ``{"prompt": ..., "image": <path>}`` records (paths relative
    to the file) or a folder of images each with a ``<stem>.txt`` caption. Required for spin."""
    num_steps: int = 20
    """ODE steps of the round's samples (RAFT's notebook: the pipeline's 50 DPM-Solver steps)."""
    guidance_scale: float | None = None
    """CFG scale of the round's samples (FLUX: the guidance embedding); null = the family's default (7.5 SD1.5)."""
    resolution: int | None = None
    """Image side (default: the model's native resolution; RAFT's notebook: 256 on SD1.5)."""
    negative_prompt: str | None = None
    """CFG's unconditional text (default: the pipeline's)."""
    batch_size: int = 8
    """Images per denoiser batch while sampling a round."""

    def __post_init__(self) -> None:
        for key in ("num_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)


@dataclasses.dataclass(kw_only=True)
class SelfPlayRoundConfig:
    """The rounds."""

    steps_per_round: int = 80
    """Optimizer steps trained on one round's samples before the model samples again (RAFT's notebook: 80 per
    stage; SPIN-Diffusion: 500 per iteration)."""
    prompts_per_round: int | None = None
    """Prompts (raft) or real pairs (spin) drawn for a round, without replacement; null = all of them."""
    samples_per_prompt: int = 10
    """``raft``: images sampled per prompt and round, K (RAFT's notebook: 10). spin samples one per caption."""
    keep_per_prompt: int = 1
    """``raft``: the best this many of each prompt's K are kept (local ranking; the notebook: best-of-10)."""
    keep_share: float = 1.0
    """``raft``: then the best this share of the kept images over all the round's prompts (global ranking; the
    notebook keeps the top 8 of 10 prompts: 0.8). 1 = no global ranking."""
    batch_size: int = 8
    """Training images (raft) or pairs (spin) per micro-batch on each process (RAFT's notebook: 8)."""

    def __post_init__(self) -> None:
        for key in ("steps_per_round", "samples_per_prompt", "keep_per_prompt", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ConfigError(f"must be >= 1 or null (all), got {self.prompts_per_round}", key="prompts_per_round")
        if not 0.0 < self.keep_share <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.keep_share}", key="keep_share")
        if self.keep_per_prompt > self.samples_per_prompt:
            raise ConfigError(
                f"keeps {self.keep_per_prompt} of {self.samples_per_prompt} samples per prompt: keep_per_prompt must "
                "be <= samples_per_prompt",
                key=("keep_per_prompt", "samples_per_prompt"),
            )


@dataclasses.dataclass(kw_only=True)
class SelfPlayLossConfig(TimestepDensityConfig):
    """The training objective's settings: the noise levels (:class:`TimestepDensityConfig`, as Diffusion-DPO draws
    them), SPIN's beta, and FLUX's guidance input."""

    beta: float | None = None
    """``spin``: the DPO temperature in the -0.5 * beta convention (docs/methods/dpo.md#beta); null = the family's
    Diffusion-DPO default (5000 SD1.x/2.x and SDXL, 100 SD3/FLUX). raft refuses it (it has no reference)."""
    anchor: Literal["sign", "indicator"] = "sign"
    """``seppo``: how the winner decides the reference sample's role: ``sign`` flips its term when the reference fits
    the winner better (SePPO's anchor-based adaptive flipper), ``indicator`` drops it then (the paper's ablation);
    docs/methods/self-play.md#seppo. Other methods ignore it."""
    flux_guidance: float | None = None
    """Guidance value fed to guidance-embedded denoisers (FLUX.1-dev) in training; null = the guidance of the
    round's samples (``sampling.guidance_scale``, else the family default). Other families ignore it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"must be > 0 or null (family default), got {self.beta}", key="beta")


@dataclasses.dataclass(kw_only=True)
class SelfPlayConfig(TrainerConfig):
    """Config of the ``raft``, ``spin`` and ``seppo`` trainers (self-play rounds,
    :mod:`diffalign.trainers.self_play`)."""

    resume_safe_keys: ClassVar[tuple[str, ...]] = ("sampling.batch_size",)
    """The sampling batch changes no draw (each image has its own seed)."""

    method: Literal["raft", "spin", "seppo"] = "raft"
    """``raft`` (reward-ranked fine-tuning), ``spin`` (SPIN-Diffusion) or ``seppo`` (SePPO)."""
    max_steps: int = 800
    """Optimizer steps over all rounds (RAFT's notebook: 10 stages of 80; SPIN-Diffusion: 500 per iteration)."""
    sampling: SelfPlaySamplingConfig = dataclasses.field(default_factory=SelfPlaySamplingConfig)
    """The round's samples."""
    self_play: SelfPlayRoundConfig = dataclasses.field(default_factory=SelfPlayRoundConfig)
    """The rounds."""
    dpo: SelfPlayLossConfig = dataclasses.field(default_factory=SelfPlayLossConfig)
    """The objective's settings (raft trains the denoising loss, spin Diffusion-DPO)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "raft":
            if self.sampling.prompts is None:
                raise ConfigError("raft samples prompts: set sampling.prompts", key="sampling.prompts")
            if self.reward is None:
                raise ConfigError("raft ranks its samples by a reward: set reward (e.g. pickscore)", key="reward")
            if self.dpo.beta is not None:
                raise ConfigError("raft trains the denoising loss, which has no beta: leave it null", key="dpo.beta")
        if self.method in ("spin", "seppo") and self.sampling.real_images is None:
            raise ConfigError(
                f"{self.method} plays real images against the model's own: set sampling.real_images to a JSONL of "
                '{"prompt", "image"} records or a folder of images with .txt captions',
                key="sampling.real_images",
            )
        if self.model.offload_text_encoders != "keep":
            raise ConfigError(
                f"{self.method} encodes its captions as it trains, so the text encoders must stay: set "
                "model.offload_text_encoders: keep",
                key="model.offload_text_encoders",
            )
        if self.eval.every > 0 and self.reward is None:
            raise ConfigError(
                "evaluation scores its images with a reward: set reward, or eval.every = 0",
                key=("reward", "eval.every"),
            )


@dataclasses.dataclass
class RoundData:
    """One round's training examples on this process (``N`` of them).

    Attributes:
        captions: ``N`` captions.
        latents: ``[N, ...]`` raft: the kept samples; spin: the model's own samples (the losers).
        real: spin: ``[N, ...]`` the real images' latents (the winners); raft: None.
        stats: what the round measured (logged with every step of the round).
    """

    captions: list[str]
    latents: Tensor
    real: Tensor | None = None
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


def raft_keep(
    scores: Tensor, keep_per_prompt: int, keep_share: float, all_kept_scores: Tensor | None = None
) -> Tensor:
    """RAFT's selection over ``[P, K]`` scores (P prompts, K samples each): the best ``keep_per_prompt`` of each
    prompt, then of those only the ones at or above the ``keep_share`` quantile of ``all_kept_scores`` (the kept
    scores of every process; default: this one's).

    Returns:
        ``[P, K]`` bool, the kept samples. The global cut keeps ``ceil(keep_share * M)`` of the ``M`` locally kept
        scores (ties at the cut are all kept).
    """
    top = scores.topk(keep_per_prompt, dim=1).indices  # [P, keep]
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
    if keep_share >= 1.0:
        return kept
    pool = all_kept_scores if all_kept_scores is not None else scores[kept]
    count = max(1, math.ceil(keep_share * pool.numel()))
    threshold = pool.sort(descending=True).values[count - 1]
    return kept & (scores >= threshold)


class SelfPlayTrainer:
    """RAFT / SPIN-Diffusion trainer; see the module docstring.

    Args:
        config: a :class:`SelfPlayConfig`.
        run: an existing :class:`TrainingRun` (tests, the Python API); built from the config by default.
        reward: the reward instead of ``config.reward`` (raft ranks by it; both evaluate with it).
    """

    def __init__(self, config: SelfPlayConfig, run: TrainingRun | None = None, reward: RewardLike | None = None):
        self.config = config
        reward = reward if reward is not None else config.reward
        self.reward = build_reward(reward, device=run.device if run is not None else None) if reward else None
        size = config.sampling.resolution
        self.run = run or TrainingRun(config, adapter_kwargs={"height": size, "width": size} if size else {})
        if self.run.sharded:
            raise ConfigError(f"{config.method} does not support FSDP sharding yet: train on one GPU per process")
        self.adapter = self.run.adapter
        if config.method == "raft":
            prompts, metadata = load_prompts_and_metadata(config.sampling.prompts)
            refuse_source_images(metadata, "self-play")
            self.items: list[Any] = prompts
        else:
            self.items = load_real_pairs(config.sampling.real_images, key="sampling.real_images")
        per_round = min(config.self_play.prompts_per_round or len(self.items), len(self.items))
        if per_round < self.run.accelerator.num_processes:
            raise ConfigError(
                f"a round draws {per_round} prompts or pairs for {self.run.accelerator.num_processes} processes: "
                "each process needs at least one; add data or raise self_play.prompts_per_round",
                key="self_play.prompts_per_round",
            )
        guidance = config.sampling.guidance_scale
        self.guidance = guidance if guidance is not None else self.adapter.default_guidance_scale
        self.beta = config.dpo.beta if config.dpo.beta is not None else self.adapter.default_dpo_beta
        flux_guidance = config.dpo.flux_guidance
        self.training_guidance = flux_guidance if flux_guidance is not None else self.guidance
        self.evaluator = Evaluator.from_config(
            config, self.adapter, self.reward, self.run.output_dir, self.run.accelerator
        )
        self.rounds_folder = self.run.output_dir / ROUNDS_FOLDER
        self.round_index = -1  # the round whose data is loaded
        self.data: RoundData | None = None
        self.reference: dict[str, Tensor] = {}  # theta_k's trainable weights

    # --- rounds -----------------------------------------------------------------------------------------------------

    def _seed(self, purpose: str, *parts: int) -> int:
        return derive_seed(self.config.seed, f"self_play/{purpose}", *parts)

    def round_items(self, round_index: int) -> list[int]:
        """Indices of this process's prompts (raft) or real pairs (spin) in a round: the round's draw (all, or
        ``prompts_per_round`` without replacement), every ``num_processes``-th of it."""
        count = self.config.self_play.prompts_per_round
        order = list(range(len(self.items)))
        if count is not None and count < len(order):
            order = random.Random(self._seed("items", round_index)).sample(order, count)
        accelerator = self.run.accelerator
        return order[accelerator.process_index :: accelerator.num_processes]

    def round_file(self, round_index: int) -> Path:
        return self.rounds_folder / f"round-{round_index}.safetensors"

    def start_round(self, round_index: int, step: int) -> None:
        """Keep ``theta_k`` (written to :meth:`round_file`, or read from it when a resumed run starts at ``step``
        inside the round) and sample the round."""
        from safetensors.torch import load_file, save_file

        path = self.round_file(round_index)
        if step % self.config.self_play.steps_per_round:  # resumed inside the round: theta_k is on disk
            if not path.is_file():
                raise FileNotFoundError(
                    f"resuming inside round {round_index} needs its starting weights {path}; they are gone, so "
                    "resume from a checkpoint at a round boundary or start afresh"
                )
            self.reference = {k: v.to(self.run.device) for k, v in load_file(str(path)).items()}
        else:
            self.reference = {name: p.detach().clone() for name, p in self.run.named_trainables()}
            if self.run.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous().cpu() for k, v in self.reference.items()}, str(path))
                self._prune_rounds(round_index)
        if self.config.method == "seppo":
            self.reference = self._seppo_reference(round_index, self.reference)
        with self.run.weights_swapped(self.reference), torch.no_grad():
            self.data = (
                self._raft_round(round_index) if self.config.method == "raft" else self._spin_round(round_index)
            )
        self.round_index = round_index

    def reference_round(self, round_index: int) -> int:
        """SePPO's reference for a round: one of the checkpoints kept so far, the starting models of rounds
        ``0..round_index`` (the latest is this round's own, SPIN's choice), drawn uniformly and seeded by the round."""
        return random.Random(self._seed("reference", round_index)).randrange(round_index + 1)

    def _seppo_reference(self, round_index: int, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """The trainable weights of :meth:`reference_round` (``current`` when it is this round's own)."""
        from safetensors.torch import load_file

        chosen = self.reference_round(round_index)
        if chosen == round_index:
            return current
        return {k: v.to(self.run.device) for k, v in load_file(str(self.round_file(chosen))).items()}

    def _prune_rounds(self, current: int) -> None:
        """Remove the starting weights of rounds before the oldest checkpoint's (no resume can need them); SePPO
        keeps every round's (each may become a later round's reference)."""
        from diffalign.trainers.checkpoints import checkpoint_step, list_checkpoints

        if self.config.method == "seppo":
            return

        steps = [checkpoint_step(path) for path in list_checkpoints(self.run.output_dir)]
        needed = min([current, *(step // self.config.self_play.steps_per_round for step in steps)])
        for path in self.rounds_folder.glob("round-*.safetensors"):
            if int(path.stem.split("-")[1]) < needed:
                path.unlink(missing_ok=True)

    def _sample(self, captions: list[str], seeds: list[int]) -> tuple[Tensor, Tensor | None]:
        """``theta_k``'s ODE samples of ``captions``: ``(final latents [N, ...], images [N, 3, H, W] or None)``."""
        sampling = self.config.sampling
        trajectory = rollout(
            self.adapter,
            captions,
            ode_plan(sampling.num_steps),
            guidance_scale=self.guidance,
            negative_prompt=sampling.negative_prompt,
            seeds=seeds,
            chunk_size=sampling.batch_size,
            decode=self.config.method == "raft",
        )
        return trajectory.final_latents, trajectory.images

    def _raft_round(self, round_index: int) -> RoundData:
        """Sample K images of each of this process's prompts, score them, keep RAFT's selection."""
        settings = self.config.self_play
        indices, k = self.round_items(round_index), settings.samples_per_prompt
        prompts = [self.items[i] for i in indices]
        captions = [p for p in prompts for _ in range(k)]
        seeds = [self._seed("sample", round_index, i, j) for i in indices for j in range(k)]
        latents, images = self._sample(captions, seeds)
        batch_size = self.config.sampling.batch_size
        scores = score_with_parts(self.reward, images, captions, batch_size=batch_size)["reward"].view(len(prompts), k)
        if not torch.isfinite(scores).all():
            raise ValueError(f"the reward returned NaN or inf for a round-{round_index} sample; check the reward")
        local = scores.topk(settings.keep_per_prompt, dim=1).values.flatten()
        pool = self._gather(local)
        kept = raft_keep(scores, settings.keep_per_prompt, settings.keep_share, pool).flatten()
        if not kept.any():  # the global cut left this process nothing: it keeps its best sample to train on
            kept[scores.flatten().argmax()] = True
        stats = {
            "round/reward_sampled": float(self._gather(scores.flatten()).mean()),
            "round/reward_kept": float(self._gather(scores.flatten()[kept]).mean()),
            "round/num_kept": float(self._gather(kept.float()).sum()),
        }
        return RoundData([c for c, keep in zip(captions, kept.tolist()) if keep], latents[kept], None, stats)

    def _spin_round(self, round_index: int) -> RoundData:
        """Encode this process's real images and sample ``theta_k``'s image of each caption."""
        indices = self.round_items(round_index)
        pairs = [self.items[i] for i in indices]
        captions = [caption for caption, _ in pairs]
        height, width = self.adapter.height, self.adapter.width
        generator = torch.Generator().manual_seed(self._seed("vae", round_index, self.run.accelerator.process_index))
        chunk, real = self.config.sampling.batch_size, []
        for start in range(0, len(pairs), chunk):  # the VAE sees one sampling batch of images at a time
            pixels = torch.stack([load_real_image(path, height, width) for _, path in pairs[start : start + chunk]])
            real.append(self.adapter.encode_images(pixels.to(self.run.device), generator=generator))
        real = torch.cat(real)
        seeds = [self._seed("sample", round_index, i) for i in indices]
        latents, _ = self._sample(captions, seeds)
        return RoundData(captions, latents, real)

    def _gather(self, values: Tensor) -> Tensor:
        """``values`` of every process, concatenated (this one's alone on one process)."""
        accelerator = self.run.accelerator
        if accelerator.num_processes == 1:
            return values.cpu()
        from accelerate.utils import gather_object

        return torch.tensor([v for part in gather_object([values.cpu().tolist()]) for v in part])

    # --- the loss ---------------------------------------------------------------------------------------------------

    def sample_timesteps(self, count: int, generator: torch.Generator) -> Tensor:
        """``[count]`` training timesteps (``dpo.timestep_sampling`` and its density)."""
        return sample_training_timesteps(self.adapter, self.config.dpo, count, generator)

    def micro_batch(self, step: int, micro: int) -> list[int]:
        """Indices into the round's examples on this process (drawn with replacement, seeded)."""
        size, count = self.config.self_play.batch_size, len(self.data.captions)
        rng = random.Random(self._seed("batch", step, micro, self.run.accelerator.process_index))
        return rng.choices(range(count), k=size)

    def loss(self, indices: list[int], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """raft: the denoising loss on the kept samples; spin: Diffusion-DPO of real (winner) against own (loser)
        images with ``theta_k`` as the reference; seppo: the anchored loss of real images against the reference
        model's own. Noise and timestep shared by a pair."""
        adapter, data = self.adapter, self.data
        own = data.latents[indices]
        x0 = own if data.real is None else torch.cat([data.real[indices], own])
        copies, shape = x0.shape[0] // len(indices), own.shape[1:]
        noise = torch.randn((len(indices), *shape), generator=generator).to(x0).repeat(copies, *[1] * len(shape))
        timesteps = self.sample_timesteps(len(indices), generator)
        timesteps = timesteps.to(adapter.device).repeat(copies)
        noisy = adapter.add_noise(x0, noise, timesteps)
        target = adapter.training_target(x0, noise, timesteps)
        cond = adapter.encode_prompt([data.captions[i] for i in indices] * copies, with_negative=False)
        guidance = self.training_guidance if adapter.guidance_embedded else 1.0
        if data.real is None:
            with self.run.autocast():
                loss = diffusion_sft_loss(adapter.predict(noisy, timesteps, cond, guidance), target)
            return loss, {"loss": loss.detach()}
        # The reference first: the policy's graph is then built on the live weights alone, never on swapped ones.
        with torch.no_grad(), self.run.weights_swapped(self.reference), self.run.autocast():
            ref = adapter.predict(noisy, timesteps, cond, guidance)
        with self.run.autocast():
            pred = adapter.predict(noisy, timesteps, cond, guidance)
        if self.config.method == "seppo":
            mse = per_sample_mse(pred, target)
            with torch.no_grad():
                ref_mse = per_sample_mse(ref, target)
            return anchored_dpo_loss_from_mse(*mse.chunk(2), *ref_mse.chunk(2), self.beta, self.config.dpo.anchor)
        pred_w, pred_l = pred.chunk(2)
        ref_w, ref_l = ref.chunk(2)
        target_w, target_l = target.chunk(2)
        return diffusion_dpo_loss(pred_w, pred_l, ref_w, ref_l, target_w, target_l, self.beta)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; a new round first when ``step`` starts one (or the run resumes inside one)."""
        round_index = step // self.config.self_play.steps_per_round
        if round_index != self.round_index:
            self.start_round(round_index, step)
        process = self.run.accelerator.process_index

        def micro_loss(micro: int) -> tuple[Tensor, dict[str, Tensor]]:
            generator = torch.Generator().manual_seed(self._seed("noise", step, micro, process))
            return self.loss(self.micro_batch(step, micro), generator)

        metrics = self.run.accumulate_micro_batches(step, self.config.optim.gradient_accumulation_steps, micro_loss)
        metrics.update(self.data.stats, **{"round": float(round_index)})
        metrics.update(self.run.optimizer_step(step=step))
        return metrics

    def train(self) -> dict[str, float]:
        """Run to ``max_steps`` optimizer steps (resuming when ``checkpoint.resume_from`` is set), or until
        ``max_minutes`` are spent.

        Returns:
            The metrics of the last step.
        """
        return self.run.run_steps(
            self.train_step,
            lambda: {"round": self.round_index},
            self.evaluator,
            desc=self.config.method,
            postfix=("loss", "round/reward_kept", "implicit_acc"),
        )
