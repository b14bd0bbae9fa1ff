"""Self-NPO: a negative model from the model's own outputs, for CFG's unconditional branch; docs/methods/self-npo.md.

Self-NPO (Wang et al. 2025, "Self-NPO: Data-Free Diffusion Model Enhancement via Truncated Diffusion Fine-Tuning";
code G-U-N/Diffusion-NPO, ``Self-NPO/train.py``) trains a LoRA that makes the model *worse* in the direction CFG
pushes away from. Sampling then puts it on the unconditional half of classifier-free guidance
(``diffalign sample --negative-lora``, :attr:`~diffalign.adapters.base.DiffusionAdapter.negative_lora`). It needs
no preference labels and no reward: only image-caption pairs to start the truncated walks from.

Per micro-batch of real image-caption pairs (``data.real_images``), "truncated diffusion fine-tuning":

1. Draw a start level on a grid of ``self_npo.num_grid_steps`` points (``(k + 1) 1000 / N - 1``: 39 ... 999 for
   25) and noise the image's latent there (fresh Gaussian noise).
2. The teacher, an EMA of the trained LoRA (``self_npo.teacher_decay`` per optimizer step, starting at the base
   model), walks ``self_npo.truncation_steps`` deterministic steps down the grid (stopping at the clean end) with
   guidance ``text + w (text - uncond)``, ``w = self_npo.teacher_guidance`` (-1: the unconditional output alone,
   SD1.5's setting; SDXL's -5). Its guided clean-image prediction at the point reached is the target.
3. That point is re-noised to a level drawn uniformly above it (the forward transition, :func:`~diffalign.losses.
   npo.renoise`), and the student predicts the clean image there *with the caption*; the loss is the pseudo-Huber
   distance to the target (``self_npo.loss``).

So the negative model learns to turn any caption into what the teacher makes with none: exactly the direction CFG
then steers away from. Steps are taken on the adapter's own forward process (:mod:`diffalign.samplers.inversion`),
so epsilon, v and flow families share them. During training ``adapter.negative_lora = "default"``: the periodic
evaluation samples the base model with the trained LoRA on CFG's unconditional half, as it will be used.

Resume is exact: the teacher is written to every checkpoint (``self_npo_teacher.safetensors``). Processes: each draws
its own pairs (seeded by step, micro-batch and process). FSDP sharding is not supported (the teacher swaps whole
tensors); a LoRA is required (the negative branch at sampling is a LoRA) and so is CFG (FLUX.1-dev has none).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning
from diffalign.config import ConfigError, TrainerConfig
from diffalign.data.image_captions import load_real_image, load_real_pairs
from diffalign.eval.evaluator import Evaluator
from diffalign.losses.npo import guided_output, previous_level, pseudo_huber, renoise, truncation_grid
from diffalign.rewarding import RewardLike, build_reward
from diffalign.samplers.inversion import forward_coefficients, split_prediction, step_to
from diffalign.seeding import derive_seed
from diffalign.trainers.common import TrainingRun


logger = logging.getLogger(__name__)

TEACHER_STATE = "self_npo_teacher"
"""The teacher's file in a checkpoint, ``self_npo_teacher.safetensors``."""


@dataclasses.dataclass(kw_only=True)
class SelfNPODataConfig:
    """The image-caption pairs the truncated walks start from."""

    real_images: Path
    """A JSONL of ``{"prompt": ..., "image": <path>}`` records (paths relative to the file) or a folder of images
    each with a ``<stem>.txt`` caption (Self-NPO's loader: a folder of LAION images with captions)."""
    resolution: int | None = None
    """Image side (default: the model's native resolution)."""
    batch_size: int = 20
    """Pairs per micro-batch on each process (Self-NPO's SD1.5 launcher: 20; SDXL: 10)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.batch_size}", key="batch_size")


@dataclasses.dataclass(kw_only=True)
class SelfNPOLossConfig:
    """Truncated diffusion fine-tuning."""

    num_grid_steps: int = 25
    """Points of the DDIM grid the walks start on and step along (Self-NPO: 25)."""
    truncation_steps: int = 5
    """Teacher steps down the grid before its prediction becomes the target (Self-NPO: 5)."""
    teacher_guidance: float = -1.0
    """``w`` of the teacher's ``text + w (text - uncond)``: -1 = the unconditional output (Self-NPO's SD1.5); its
    SDXL script uses -5 (anti-guidance)."""
    teacher_decay: float = 0.999
    """EMA rate of the teacher per optimizer step (Self-NPO: 0.999, no warm-up)."""
    loss: Literal["huber", "l2"] = "huber"
    """Distance of the student's clean-image prediction to the target: pseudo-Huber (the launchers) or mean squared
    error (the script's default)."""
    huber_c: float = 0.001
    """``c`` of the pseudo-Huber loss (Self-NPO: 0.001)."""

    def __post_init__(self) -> None:
        for key in ("num_grid_steps", "truncation_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        if not 0.0 <= self.teacher_decay < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.teacher_decay}", key="teacher_decay")
        if self.huber_c <= 0:
            raise ConfigError(f"must be > 0, got {self.huber_c}", key="huber_c")


@dataclasses.dataclass(kw_only=True)
class SelfNPOConfig(TrainerConfig):
    """Config of the ``self_npo`` trainer (:mod:`diffalign.trainers.self_npo`)."""

    method: Literal["self_npo"] = "self_npo"
    """Trainer name."""
    max_steps: int = 1000
    """Optimizer steps (Self-NPO's launchers: 1000)."""
    data: SelfNPODataConfig
    """The image-caption pairs."""
    self_npo: SelfNPOLossConfig = dataclasses.field(default_factory=SelfNPOLossConfig)
    """The objective."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.lora.rank <= 0:
            raise ConfigError(
                "self_npo trains a negative LoRA (CFG's unconditional branch takes a LoRA at sampling): set "
                "model.lora.rank > 0",
                key="model.lora.rank",
            )
        if self.model.offload_text_encoders != "keep":
            raise ConfigError(
                "self_npo encodes its captions as it trains, so the text encoders must stay: set "
                "model.offload_text_encoders: keep",
                key="model.offload_text_encoders",
            )
        if self.eval.every > 0 and self.reward is None:
            raise ConfigError(
                "evaluation scores its images with a reward: set reward, or eval.every = 0",
                key=("reward", "eval.every"),
            )


class SelfNPOTrainer:
    """Self-NPO trainer; see the module docstring.

    Args:
        config: a :class:`SelfNPOConfig`.
        run: an existing :class:`TrainingRun` (tests, the Python API); built from the config by default.
        reward: the evaluation reward instead of ``config.reward``.
    """

    def __init__(self, config: SelfNPOConfig, run: TrainingRun | None = None, reward: RewardLike | None = None):
        self.config = config
        size = config.data.resolution
        self.run = run or TrainingRun(config, adapter_kwargs={"height": size, "width": size} if size else {})
        if self.run.sharded:
            raise ConfigError("self_npo does not support FSDP sharding yet: train on one GPU per process")
        self.adapter = adapter = self.run.adapter
        if adapter.guidance_embedded:
            raise ConfigError(
                f"{adapter.family} samples without CFG (its guidance is an input), so a negative model has no "
                "unconditional branch to act in",
                key="model.path",
            )
        reward = reward if reward is not None else config.reward
        self.reward = build_reward(reward, device=self.run.device) if reward is not None else None
        self.pairs = load_real_pairs(config.data.real_images, key="data.real_images")
        self.num_train = adapter.scheduler.config.num_train_timesteps
        if config.self_npo.num_grid_steps > self.num_train // 2:
            raise ConfigError(
                f"{config.self_npo.num_grid_steps} grid steps do not fit the {self.num_train} train timesteps: use "
                f"at most {self.num_train // 2} (Self-NPO: 25)",
                key="self_npo.num_grid_steps",
            )
        self.grid = truncation_grid(config.self_npo.num_grid_steps, self.num_train)
        if adapter.prediction_type == "flow":
            self.grid = self.grid.float()
        self.teacher = {name: p.detach().float().clone() for name, p in self.run.named_trainables()}
        self.run.state_tensors[TEACHER_STATE] = (lambda: self.teacher, self._load_teacher)
        adapter.negative_lora = "default"  # sampling (the evaluation): the trained LoRA on CFG's unconditional half
        self.evaluator = Evaluator.from_config(config, adapter, self.reward, self.run.output_dir, self.run.accelerator)

    def _load_teacher(self, tensors: dict[str, Tensor]) -> None:
        if sorted(tensors) != sorted(self.teacher):
            raise ConfigError(
                "the checkpoint's Self-NPO teacher does not match this run's LoRA (other rank or targets): resume "
                "with the config it was trained with",
                key="model.lora",
            )
        self.teacher = {name: value.to(self.run.device) for name, value in tensors.items()}

    def _seed(self, purpose: str, *parts: int) -> int:
        return derive_seed(self.config.seed, f"self_npo/{purpose}", *parts)

    # --- the loss ---------------------------------------------------------------------------------------------------

    def micro_batch(self, step: int, micro: int) -> list[int]:
        """Indices of this process's pairs for one micro-batch (drawn with replacement, seeded)."""
        rng = random.Random(self._seed("batch", step, micro, self.run.accelerator.process_index))
        return rng.choices(range(len(self.pairs)), k=self.config.data.batch_size)

    def encode(self, indices: list[int], generator: torch.Generator) -> Tensor:
        """``[B, ...]`` latents of the pairs' images (a VAE posterior sample each)."""
        height, width = self.adapter.height, self.adapter.width
        pixels = [load_real_image(self.pairs[i][1], height, width, key="data.real_images") for i in indices]
        with torch.no_grad():
            return self.adapter.encode_images(torch.stack(pixels).to(self.run.device), generator=generator)

    def _teacher_output(self, sample: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """The teacher's guided output at ``(sample, level)`` (no CFG batching: one or two plain calls)."""
        weight = self.config.self_npo.teacher_guidance
        uncond = self.adapter.predict(sample, level, cond.unconditional())
        text = None if weight == -1.0 else self.adapter.predict(sample, level, cond.without_negative())
        return guided_output(text, uncond, weight).float()

    def teacher_walk(
        self, x0: Tensor, cond: Conditioning, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-2 of the module docstring, without gradient, on the EMA teacher.

        Returns:
            ``(target, sample, level)``: the teacher's guided clean-image prediction ``[B, ...]`` at the point its
            walk reached, that point ``[B, ...]`` and its level ``[B]``.
        """
        settings, adapter = self.config.self_npo, self.adapter
        index = torch.randint(0, len(self.grid), (x0.shape[0],), generator=generator)
        level = self.grid[index].to(adapter.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        sample = adapter.add_noise(x0, noise, level).float()
        with torch.no_grad(), self.run.weights_swapped(self.teacher), self.run.autocast():
            for _ in range(settings.truncation_steps):
                output = self._teacher_output(sample, level, cond)
                below = previous_level(level, settings.num_grid_steps, self.num_train)
                source, target = (forward_coefficients(adapter, t, sample) for t in (level, below))
                sample, level = step_to(output, sample, source, target), below
            output = self._teacher_output(sample, level, cond)
            target = split_prediction(output, sample, forward_coefficients(adapter, level, sample))[0]
        return target, sample, level

    def renoise_level(self, level: Tensor, generator: torch.Generator) -> Tensor:
        """``[B]`` levels drawn uniformly above ``level`` up to ``T - 1`` (integers for epsilon / v models)."""
        top = self.num_train - 1
        if level.is_floating_point():
            u = 1.0 - torch.rand(level.shape, generator=generator).to(level.device)  # (0, 1]
            return level + u * (top - level)
        span = (top - level).cpu()
        return level + 1 + (torch.rand(level.shape, generator=generator) * span).long().clamp(max=span - 1).to(level)

    def loss(self, indices: list[int], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """The truncated-diffusion loss of one micro-batch (the module docstring) and its metrics."""
        adapter, settings = self.adapter, self.config.self_npo
        x0 = self.encode(indices, generator)
        cond = adapter.encode_prompt([self.pairs[i][0] for i in indices], with_negative=True)
        target, sample, level = self.teacher_walk(x0, cond, generator)
        higher = self.renoise_level(level, generator)
        noise = torch.randn(sample.shape, generator=generator).to(sample)
        source, dest = (forward_coefficients(adapter, t, sample)[:2] for t in (level, higher))
        noisy = renoise(sample, source, dest, noise)
        with self.run.autocast():
            output = adapter.predict(noisy, higher, cond.without_negative())
        pred = split_prediction(output, noisy, forward_coefficients(adapter, higher, noisy))[0]
        if settings.loss == "huber":
            loss = pseudo_huber(pred, target, settings.huber_c)
        else:
            loss = (pred - target.float()).pow(2).mean()
        metrics = {
            "loss": loss.detach(),
            "level_reached": level.float().mean(),
            "level_trained": higher.float().mean(),
        }
        return loss, metrics

    # --- training ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self) -> None:
        """The teacher's EMA step toward the trained weights (after each optimizer step)."""
        rate = self.config.self_npo.teacher_decay
        for name, param in self.run.named_trainables():
            self.teacher[name].lerp_(param.detach().float(), 1 - rate)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step, then the teacher's EMA step."""
        process = self.run.accelerator.process_index

        def micro_loss(micro: int) -> tuple[Tensor, dict[str, Tensor]]:
            generator = torch.Generator().manual_seed(self._seed("draw", step, micro, process))
            return self.loss(self.micro_batch(step, micro), generator)

        metrics = self.run.accumulate_micro_batches(step, self.config.optim.gradient_accumulation_steps, micro_loss)
        metrics.update(self.run.optimizer_step(step=step))
        self.update_teacher()
        return metrics

    def train(self) -> dict[str, float]:
        """Run to ``max_steps`` optimizer steps (resuming when ``checkpoint.resume_from`` is set), or until
        ``max_minutes`` are spent.

        Returns:
            The metrics of the last step.
        """
        return self.run.run_steps(
            self.train_step, lambda: {}, self.evaluator, desc="self_npo", postfix=("loss", "level_reached")
        )
