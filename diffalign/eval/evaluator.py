"""Evaluation during training: ODE samples of held-out prompts at fixed seeds, mean rewards, a PNG grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.adapters import DiffusionAdapter
from diffalign.data.edits import SourceImages, resolve_source_images, source_conditioning
from diffalign.data.prompts import load_prompts_and_metadata
from diffalign.eval.grid import image_grid
from diffalign.rewarding import score_with_parts
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import TextUse, rollout, text_use


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
        accelerator: with several processes, each samples and scores its contiguous share of the (prompt, seed)
            images, the results are gathered, and only the main process writes the grid; ``None``: one process.
        sources: an editing model's source images, one per prompt (docs/architecture.md#editing): each edit is
            sampled from its prompt's source, and the grid shows the source left of the edits; ``None``: none.
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
        accelerator: Any | None = None,
        sources: SourceImages | None = None,
    ) -> None:
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(
                f"Evaluator: {len(metadata)} metadata dicts for {len(prompts)} prompts; give one per prompt"
            )
        if sources is not None and len(sources) != len(prompts):
            raise ValueError(
                f"Evaluator: {len(sources)} source images for {len(prompts)} prompts; give one per prompt"
            )
        self.sources = sources
        self.adapter, self.reward = adapter, reward
        self.prompts, self.seeds = prompts, seeds
        self.metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in prompts]
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.batch_size = batch_size
        self.accelerator = accelerator

    @classmethod
    def from_config(
        cls, config: Any, adapter: DiffusionAdapter, reward: Any, output_dir: Path, accelerator: Any | None = None
    ) -> Evaluator | None:
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
        paths = resolve_source_images(metadata, evaluation.prompts, key="eval.prompts")
        if paths is not None and not adapter.edits_images:
            raise ValueError(
                f"eval.prompts name source images ('image') but {adapter.family} does not edit; use prompts without "
                "images, or an editing model"
            )
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
            accelerator=accelerator,
            sources=None if paths is None else SourceImages(paths, adapter.height, adapter.width),
        )

    def text_uses(self) -> list[TextUse]:
        """How the evaluation encodes its prompts, ``[(prompts, negative_prompt, with_negative)]``, for a trainer's
        text-embedding cache (:meth:`~diffalign.trainers.common.TrainingRun.cache_text_embeddings`)."""
        return [text_use(self.prompts, self.guidance_scale)]

    def sample(self) -> torch.Tensor:
        """``[P * S, 3, H, W]`` images, prompt-major (every process's share, gathered)."""
        items, share, images = self._sample_share()
        return self._gathered(images, len(items))

    def score(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every image, prompt-major ``[P * S, 3, H, W]``, and its scores by part (each ``[P * S]``); each image's
        prompt metadata goes with it to a reward that takes metadata. Each process samples and scores its share."""
        items, share, images = self._sample_share()
        prompts = [self.prompts[p] for p, _ in share]
        scores = score_with_parts(self.reward, images, prompts, [self.metadata[p] for p, _ in share])
        gathered = {name: self._gathered(values, len(items)) for name, values in scores.items()}
        return self._gathered(images, len(items)), gathered

    def _sample_share(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], torch.Tensor]:
        """All ``(prompt, seed)`` items, this process's share of them, and its images ``[share, 3, H, W]``."""
        items = [(p, seed) for p in range(len(self.prompts)) for seed in self.seeds]
        share = self._share(items)
        prompts, conditioning = [self.prompts[p] for p, _ in share], None
        if self.sources is not None:  # an edit: each prompt's source, encoded once for all its seeds
            indices = [p for p, _ in share]
            conditioning = source_conditioning(
                self.adapter, self.prompts, self.sources, indices, self.guidance_scale, batch_size=self.batch_size
            )
        trajectory = rollout(
            self.adapter,
            prompts,
            ode_plan(self.num_steps),
            conditioning=conditioning,
            guidance_scale=self.guidance_scale,
            seeds=[seed for _, seed in share],
            chunk_size=self.batch_size,
        )
        return items, share, trajectory.images

    @property
    def _sharded(self) -> bool:
        """Whether several processes share the evaluation."""
        return self.accelerator is not None and self.accelerator.num_processes > 1

    def _share(self, items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """This process's contiguous share of the ``(prompt, seed)`` items, padded with the last item to the size
        of the largest share (gathering needs equal shapes; only the last shares can be short, so the padding
        gathers at the end and :meth:`_gathered` cuts it off)."""
        if not self._sharded:
            return items
        per = -(-len(items) // self.accelerator.num_processes)
        start = self.accelerator.process_index * per
        share = items[start : start + per]
        return share + [items[-1]] * (per - len(share))

    def _gathered(self, local: torch.Tensor, count: int) -> torch.Tensor:
        """``local`` (this process's share) gathered over processes, in item order, on the CPU; ``[count, ...]``."""
        if not self._sharded:
            return local.cpu()
        return self.accelerator.gather(local.to(self.accelerator.device).contiguous())[:count].cpu()

    def __call__(self, step: int) -> dict[str, float]:
        images, scores = self.score()
        main = self.accelerator is None or self.accelerator.is_main_process
        if self.output_dir is not None and main:
            folder = self.output_dir / "eval"
            folder.mkdir(parents=True, exist_ok=True)
            captions = [f"{v:.2f}" for v in scores["reward"].tolist()]
            columns = len(self.seeds)
            if self.sources is not None:  # each row: the source, then its edits
                images, captions = self._with_source_column(images, captions)
                columns += 1
            grid = image_grid(images, columns, captions=captions, row_labels=self.prompts)
            grid.save(folder / f"step-{step:06d}.png")
        return {f"eval/{name}_mean": values.mean().item() for name, values in scores.items()}

    def _with_source_column(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Prompt-major ``[P * S]`` edits and captions with each prompt's source image put first in its row."""
        seeds, rows, labels = len(self.seeds), [], []
        for p in range(len(self.prompts)):
            rows += [self.sources.get(p), *images[p * seeds : (p + 1) * seeds]]
            labels += ["source", *captions[p * seeds : (p + 1) * seeds]]
        return torch.stack(rows), labels
