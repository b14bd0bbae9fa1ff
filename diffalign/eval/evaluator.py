"""Evaluation during training: ODE samples of held-out prompts at fixed seeds, mean rewards, a PNG grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.adapters import DiffusionAdapter
from diffalign.data.prompts import load_prompts_and_metadata
from diffalign.eval.grid import image_grid
from diffalign.rewarding import score_with_parts
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import rollout


class Evaluator:
    """Callable ``evaluator(step) -> metrics``: samples every prompt at every seed with the ODE, scores, saves a grid.

    Args:
        adapter: the model.
        reward: the reward used for scoring (a ``rewards.Reward``).
        prompts: held-out prompts (rows of the grid).
        seeds: seeds (columns); every prompt uses the same seeds.
        num_steps: ODE steps.
        guidance_scale: CFG scale.
        output_dir: grids go to ``<output_dir>/eval/step-<step>.png``.
        batch_size: images per denoiser batch.
        metadata: one dict per prompt (a JSONL prompt record's fields), passed with every image of that prompt to a
            reward that takes metadata; ``None``: none.
    """

    def __init__(
        self,
        adapter: DiffusionAdapter,
        reward: Any,
        prompts: list[str],
        seeds: list[int],
        num_steps: int,
        guidance_scale: float,
        output_dir: str | Path | None = None,
        batch_size: int = 8,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(
                f"Evaluator: {len(metadata)} metadata dicts for {len(prompts)} prompts; give one per prompt"
            )
        self.adapter, self.reward = adapter, reward
        self.prompts, self.seeds = prompts, seeds
        self.metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in prompts]
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config: Any, adapter: DiffusionAdapter, reward: Any, output_dir: Path) -> Evaluator | None:
        """From ``config.eval``; ``None`` when evaluation is off.

        Unset steps and guidance follow the training sampler (``config.sampling``) for trainers that sample,
        else the model family's defaults (``adapter.default_num_steps`` / ``default_guidance_scale``: an offline
        DPO run is evaluated with CFG, as its model is used).
        """
        evaluation = config.eval
        if evaluation.every <= 0 or evaluation.prompts is None:
            return None
        sampling = getattr(config, "sampling", None)
        num_steps = evaluation.num_steps or getattr(sampling, "num_steps", adapter.default_num_steps)
        guidance = evaluation.guidance_scale
        if guidance is None:
            guidance = getattr(sampling, "guidance_scale", adapter.default_guidance_scale)
        prompts, metadata = load_prompts_and_metadata(evaluation.prompts)
        return cls(
            adapter,
            reward,
            prompts,
            list(evaluation.seeds),
            num_steps,
            guidance,
            output_dir,
            evaluation.batch_size,
            metadata=metadata,
        )

    def text_uses(self) -> list[tuple[list[str], str | None, bool]]:
        """How the evaluation encodes its prompts, ``[(prompts, negative_prompt, with_negative)]``, for a trainer's
        text-embedding cache (:meth:`~diffalign.trainers.common.TrainingRun.cache_text_embeddings`)."""
        return [(list(self.prompts), None, self.guidance_scale > 1)]

    def sample(self) -> torch.Tensor:
        """``[P * S, 3, H, W]`` images, prompt-major."""
        seeds = [seed for _ in self.prompts for seed in self.seeds]
        trajectory = rollout(
            self.adapter,
            self.prompts,
            ode_plan(self.num_steps),
            num_images_per_prompt=len(self.seeds),
            guidance_scale=self.guidance_scale,
            seeds=seeds,
            chunk_size=self.batch_size,
        )
        return trajectory.images

    def score(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`sample`, and every image's scores by part (each ``[P * S]``, prompt-major); each image's prompt
        metadata goes with it to a reward that takes metadata."""
        images = self.sample()
        prompts = [p for p in self.prompts for _ in self.seeds]
        metadata = [m for m in self.metadata for _ in self.seeds]
        return images, score_with_parts(self.reward, images, prompts, metadata)

    def __call__(self, step: int) -> dict[str, float]:
        images, scores = self.score()
        if self.output_dir is not None:
            folder = self.output_dir / "eval"
            folder.mkdir(parents=True, exist_ok=True)
            captions = [f"{v:.2f}" for v in scores["reward"].tolist()]
            grid = image_grid(images, len(self.seeds), captions=captions, row_labels=self.prompts)
            grid.save(folder / f"step-{step:06d}.png")
        return {f"eval/{name}_mean": values.mean().item() for name, values in scores.items()}
