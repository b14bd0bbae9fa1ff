"""AI feedback for Diffusion-DPO: preference pairs made by sampling the model and ranking with a reward.

Algorithm (docs/methods/dpo.md#ai-feedback-pairs: Salesforce's ``--choice_model`` and flow_grpo's Flow-DPO, done
offline): for every prompt, sample ``K`` images with the deterministic ODE sampler (DDIM eta = 0 for epsilon / v
models, Euler for flow models) from ``K`` seeded noises, score them with the reward, and write pairs in the
Pick-a-Pic layout that :func:`~diffalign.data.preference.load_preference_dataset` reads:

- ``pairing="best_worst"``: one pair per prompt, the highest-scoring image against the lowest (flow_grpo's DPO
  stat tracker keeps exactly these two);
- ``pairing="all"``: every pair ``(i, j)`` with ``reward_i > reward_j``, i.e. ``K (K - 1) / 2`` pairs per prompt
  without ties.

The preferred image is always written as ``image_0`` with ``label_0 = 1.0``; pairs whose two rewards are equal carry
no preference and are not written (counted in ``summary.json``).

Deviations from the references: the Salesforce repository relabels Pick-a-Pic pairs on the fly with a scorer
(batch size 1) and flow_grpo samples its candidates with the SDE sampler online; here the candidates are sampled
once, with the ODE sampler, and stored, so any offline DPO run (and its resume) reads the same data.

Command line (wired in ``diffalign.cli``)::

    diffalign pairs --model M --prompts prompts.txt --reward pickscore --num-per-prompt 8 --out pairs/
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.adapters import DiffusionAdapter, load_adapter
from diffalign.data.preference import PreferenceRecord, write_preference_dataset
from diffalign.data.prompts import load_prompts
from diffalign.rewarding import RewardLike, build_reward
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import rollout
from diffalign.seeding import derive_seed


__all__ = ["SUMMARY_NAME", "candidate_seed", "make_preference_pairs", "rank_pairs"]

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
"""Side file written next to the data: settings, counts and the reward of every sampled image."""

Pairing = Literal["best_worst", "all"]


def rank_pairs(rewards: Tensor, pairing: Pairing = "best_worst") -> list[tuple[int, int]]:
    """Pairs ``(preferred, rejected)`` of indices into one prompt's ``K`` images.

    Args:
        rewards: ``[K]`` rewards of the images of one prompt.
        pairing: ``"best_worst"`` (one pair: argmax vs argmin) or ``"all"`` (every pair with different rewards,
            ordered by decreasing reward of the preferred image, then of the rejected one).

    Returns:
        The pairs; empty when every reward is equal (no preference to learn).
    """
    values = rewards.detach().float().cpu()
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"need rewards of shape [K] with K >= 2, got {tuple(values.shape)}")
    order = torch.argsort(values, descending=True, stable=True).tolist()
    if pairing == "best_worst":
        best, worst = order[0], order[-1]
        return [(best, worst)] if values[best] > values[worst] else []
    if pairing == "all":
        return [(i, j) for a, i in enumerate(order) for j in order[a + 1 :] if values[i] > values[j]]
    raise ValueError(f"pairing must be 'best_worst' or 'all', got {pairing!r}")


def candidate_seed(seed: int, prompt_index: int, candidate: int) -> int:
    """The sampling seed of candidate ``candidate`` of prompt ``prompt_index`` (see :mod:`diffalign.seeding`)."""
    return derive_seed(seed, "pairs/candidate", prompt_index, candidate)


def _as_adapter(model: DiffusionAdapter | str | os.PathLike) -> DiffusionAdapter:
    return model if isinstance(model, DiffusionAdapter) else load_adapter(model)


def _prompt_blocks(prompts: Sequence[str], block: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(prompts), block):
        yield start, list(prompts[start : start + block])


def make_preference_pairs(
    adapter: DiffusionAdapter | str | os.PathLike,
    prompts: Sequence[str] | str | os.PathLike,
    reward: RewardLike,
    num_per_prompt: int,
    out_dir: str | os.PathLike,
    *,
    pairing: Pairing = "best_worst",
    num_steps: int = 20,
    guidance_scale: float = 4.5,
    seed: int = 0,
    batch_size: int = 8,
    format: Literal["jsonl", "parquet"] = "jsonl",
    negative_prompt: str | None = None,
) -> Path:
    """Sample ``num_per_prompt`` images per prompt, rank them with ``reward`` and write a preference dataset.

    Image ``k`` of prompt ``p`` is sampled from :func:`candidate_seed` ``(seed, p, k)``, so the data does not
    depend on ``batch_size`` and a prompt's candidates can be re-created.

    Args:
        adapter: a model adapter, or a hub id / local pipeline folder to load.
        prompts: a list of prompts, or a text file (a ``str`` or path) with one prompt per line.
        reward: a ``rewards`` reward (``score(images [B, 3, H, W] in [0, 1], prompts) -> [B]``), a plain scoring
            function ``fn(images, prompts) -> [B]``, or a spec for :func:`diffalign.rewarding.build_reward`
            (name, ``module:fn``, ``{name: weight}``).
        num_per_prompt: ``K >= 2`` candidates per prompt.
        out_dir: output folder (``data.jsonl`` + ``images/``, or ``data.parquet``; plus ``summary.json``).
        pairing: ``"best_worst"`` or ``"all"`` (see :func:`rank_pairs`).
        num_steps: ODE sampling steps.
        guidance_scale: CFG scale (FLUX: the guidance embedding).
        seed: base seed of the candidates.
        batch_size: images per denoiser batch; prompts are sampled ``max(1, batch_size // K)`` at a time.
        format: data format of :func:`~diffalign.data.preference.write_preference_dataset`.
        negative_prompt: CFG's unconditional text (default: the pipeline's).

    Returns:
        The data file written (``out_dir/data.jsonl`` or ``out_dir/data.parquet``).
    """
    if num_per_prompt < 2:
        raise ValueError(f"num_per_prompt must be >= 2 to form pairs, got {num_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapter = _as_adapter(adapter)
    prompt_list = load_prompts(prompts if not isinstance(prompts, str) else Path(prompts))
    scorer = build_reward(reward, device=adapter.device)
    plan = ode_plan(num_steps)
    summary: dict[str, Any] = {
        "num_prompts": len(prompt_list),
        "num_per_prompt": num_per_prompt,
        "pairing": pairing,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "num_pairs": 0,
        "num_prompts_without_preference": 0,
        "rewards": [],
    }

    def records() -> Iterator[PreferenceRecord]:
        block = max(1, batch_size // num_per_prompt)
        for start, chunk in _prompt_blocks(prompt_list, block):
            trajectory = rollout(
                adapter,
                chunk,
                plan,
                num_images_per_prompt=num_per_prompt,
                guidance_scale=guidance_scale,
                seeds=[candidate_seed(seed, start + p, k) for p in range(len(chunk)) for k in range(num_per_prompt)],
                chunk_size=batch_size,
                negative_prompt=negative_prompt,
            )
            with torch.no_grad():
                scores = scorer.score(trajectory.images, trajectory.prompts).float().cpu()
            for p, prompt in enumerate(chunk):
                images = trajectory.images[p * num_per_prompt : (p + 1) * num_per_prompt].cpu()
                group = scores[p * num_per_prompt : (p + 1) * num_per_prompt]
                summary["rewards"].append({"prompt": prompt, "rewards": group.tolist()})
                pairs = rank_pairs(group, pairing)
                summary["num_prompts_without_preference"] += not pairs
                summary["num_pairs"] += len(pairs)
                for winner, loser in pairs:
                    yield PreferenceRecord(prompt, images[winner], images[loser], 1.0)

    path = write_preference_dataset(records(), out_dir, format=format)
    if summary["num_pairs"] == 0:
        raise ValueError(
            f"no preference pair: the reward gave equal scores to all {num_per_prompt} images of every prompt "
            "(a constant reward, or identical samples); check the reward and raise num_per_prompt"
        )
    (Path(out_dir) / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    logger.info(
        "%d preference pairs from %d prompts x %d images -> %s",
        summary["num_pairs"],
        len(prompt_list),
        num_per_prompt,
        path,
    )
    return path
