"""Alignment at sampling time by choosing the starting noise: best-of-N and a reward-guided noise search.

A deterministic (ODE) sampler makes the image a function of its starting noise, so a reward can pick the noise.
:func:`search_initial_noise` draws ``N`` candidate noises for each ``(prompt, seed)`` cell, samples and scores them,
and keeps the best (best-of-N, the random search of Ma et al. 2025, "Inference-Time Scaling for Diffusion Models
beyond Scaling Denoising Steps"). With ``rounds > 1`` each later round searches around the best noise so far (their
zero-order search): ``N - 1`` neighbours ``(pivot + r * xi) / sqrt(1 + r^2)`` with fresh ``xi`` (the division keeps
each neighbour a standard normal draw), and the pivot moves to the best of them when that beats it. Every
candidate's reward is reported. docs/methods/sampling-alignment.md explains the method and its settings.

Candidate 0 of round 0 is the cell's own seed, so best-of-1 is plain sampling at that seed; the other candidates'
noises come from :func:`~diffalign.seeding.derive_seed` of the cell's seed and are the same in every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffalign.rewarding import RewardLike, build_reward, score_with_parts
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import make_generators, rollout
from diffalign.seeding import derive_seed


__all__ = ["NoiseSearch", "NoiseSearchResult", "search_initial_noise"]


@dataclass(frozen=True)
class NoiseSearch:
    """How :func:`search_initial_noise` chooses each cell's noise.

    Attributes:
        candidates: ``N``, noises sampled and scored per cell and round (``N = 1``, one round: plain sampling).
        rounds: ``1`` = best-of-N; more = that many rounds, each later one sampling ``N - 1`` neighbours of the best
            noise so far (zero-order search).
        radius: ``r > 0``, how far a neighbour lies from its pivot (small: close to it; large: nearly a fresh
            draw).
        reward: the label (in the ``rewards`` passed along) of the reward to maximise; ``None``: the first one.
    """

    candidates: int = 4
    rounds: int = 1
    radius: float = 0.5
    reward: str | None = None

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"best-of-N needs N >= 1 candidates, got {self.candidates}")
        if self.rounds < 1:
            raise ValueError(f"the noise search needs rounds >= 1, got {self.rounds}")
        if self.rounds > 1 and self.candidates < 2:
            raise ValueError("a search of several rounds needs candidates >= 2 (the pivot and its neighbours)")
        if not self.radius > 0:
            raise ValueError(f"the search radius must be > 0, got {self.radius}")

    @property
    def samples_per_cell(self) -> int:
        """Images sampled per cell: ``N`` in round 0, ``N - 1`` neighbours in each later round."""
        return self.candidates + (self.rounds - 1) * (self.candidates - 1)


@dataclass
class NoiseSearchResult:
    """What :func:`search_initial_noise` returns for ``C`` cells (prompt-major: ``[p0 s0, p0 s1, ..., p1 s0]``).

    Attributes:
        images: ``[C, 3, H, W]`` the chosen image of each cell.
        noise: ``[C, ...]`` the chosen starting noise of each cell.
        candidates: per cell, one record per sampled candidate in sampling order:
            ``{"round", "index", "reward", "chosen"}`` (``reward`` under the search reward).
    """

    images: Tensor
    noise: Tensor
    candidates: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def best_rewards(self) -> list[float]:
        """The search reward of each cell's chosen image."""
        return [next(c["reward"] for c in cell if c["chosen"]) for cell in self.candidates]


def _noise(adapter: Any, seeds: Sequence[int]) -> Tensor:
    """Standard starting noise of the family (``[len(seeds), ...]``), one seeded draw per entry."""
    return adapter.prepare_latents(len(seeds), make_generators(seeds, adapter.device))


def _score(
    adapter: Any, noise: Tensor, prompts: list[str], reward: Any, settings: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """Sample from ``noise`` with the ODE and score: ``(images [B, 3, H, W], rewards [B])``."""
    with torch.no_grad():
        images = rollout(
            adapter,
            prompts,
            ode_plan(settings["num_steps"]),
            guidance_scale=settings["guidance_scale"],
            chunk_size=settings["batch_size"],
            negative_prompt=settings["negative_prompt"],
            start_latents=noise,
        ).images
    scores = score_with_parts(reward, images, prompts, batch_size=settings["batch_size"])["reward"]
    if not torch.isfinite(scores).all():
        bad = [prompts[i] for i in torch.nonzero(~torch.isfinite(scores)).flatten().tolist()]
        raise ValueError(f"the search reward returned NaN or inf for {len(bad)} image(s), e.g. of {bad[0]!r}")
    return images, scores


def search_initial_noise(
    adapter: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    reward: RewardLike,
    search: NoiseSearch,
    *,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    batch_size: int | None = None,
    negative_prompt: str | None = None,
) -> NoiseSearchResult:
    """Choose each ``(prompt, seed)`` cell's starting noise by ``reward`` (see the module docstring).

    Args:
        adapter: the model, as it is to sample (LoRA, :attr:`alignment_scale` and all).
        prompts: ``P`` prompts.
        seeds: ``S`` seeds; cell ``(p, s)``'s candidates derive from seed ``s``, so the same cell searches the
            same noises in any grid.
        reward: the reward to maximise (a ``rewards.Reward``, a name, or a callable ``(images, prompts) -> [B]``:
            :data:`~diffalign.rewarding.RewardLike`).
        search: how many candidates and rounds, and the radius.
        num_steps, guidance_scale, batch_size, negative_prompt: the ODE sampler's settings.

    Returns:
        The chosen images and noises of the ``P * S`` cells, prompt-major, and every candidate's reward.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    reward = build_reward(reward, device=adapter.device)
    cell_prompts = [p for p in prompts for _ in seeds]
    cell_seeds = [s for _ in prompts for s in seeds]
    settings = {
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "negative_prompt": negative_prompt,
    }
    n, cells = search.candidates, len(cell_prompts)
    # Round 0: candidate 0 is the cell's own seed, the others derived from it; candidate-major within each cell.
    candidate_seeds = [s if k == 0 else derive_seed(s, "noise-search", 0, k) for s in cell_seeds for k in range(n)]
    noise = _noise(adapter, candidate_seeds)
    images, scores = _score(adapter, noise, [p for p in cell_prompts for _ in range(n)], reward, settings)
    records = [[{"round": 0, "index": k, "reward": float(scores[c * n + k])} for k in range(n)] for c in range(cells)]
    best = scores.view(cells, n).argmax(dim=1)  # [C]
    rows = torch.arange(cells) * n + best
    best_noise, best_images, best_scores = noise[rows], images[rows], scores[rows]
    best_record = [cell[int(k)] for cell, k in zip(records, best)]

    scale = 1.0 / math.sqrt(1.0 + search.radius**2)
    for round_ in range(1, search.rounds):
        m = n - 1
        xi = _noise(adapter, [derive_seed(s, "noise-search", round_, k) for s in cell_seeds for k in range(1, n)])
        pivots = best_noise.repeat_interleave(m, dim=0)
        neighbours = ((pivots.float() + search.radius * xi.float()) * scale).to(noise.dtype)
        images, scores = _score(adapter, neighbours, [p for p in cell_prompts for _ in range(m)], reward, settings)
        for c in range(cells):
            cell_scores = scores[c * m : (c + 1) * m]
            new = [{"round": round_, "index": k + 1, "reward": float(v)} for k, v in enumerate(cell_scores)]
            records[c].extend(new)
            k = int(cell_scores.argmax())
            if cell_scores[k] > best_scores[c]:  # the pivot moves only on a strict improvement
                best_noise[c], best_images[c], best_scores[c] = (
                    neighbours[c * m + k],
                    images[c * m + k],
                    cell_scores[k],
                )
                best_record[c] = new[k]
    for cell, chosen in zip(records, best_record):
        for record in cell:
            record["chosen"] = record is chosen
    return NoiseSearchResult(best_images, best_noise, records)
