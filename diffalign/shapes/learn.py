"""Learning benchmark on the shapes world: Diffusion-DPO and reward backprop on the shipped base model.

Each runner starts from the shipped shapes base model (:data:`diffalign.shapes.demo.BASE_MODEL`), trains a LoRA
within a wall-clock budget and measures the verifier with the demo's protocol (:func:`~diffalign.shapes.demo.
demo_prompts`): the 8 *aligned* held-out compositional prompts (compositions the base model never saw), which the
runner trains on, at 16 evaluation seeds that training never draws, and 32 *unseen* held-out prompts, which nothing
trains on, at 4 seeds. Before and after use the same prompts and initial noises, so the measurements are paired
(20 Euler steps, CFG 4.5, 32 px: the protocol stored beside the weights). Evaluation time is not part of the budget.

- :func:`learn_dpo`: AI-feedback preference pairs from the base model on the aligned prompts (``K`` = 32 ODE
  candidates per prompt ranked by the ``"shapes"`` verifier, every pair with different scores), then Diffusion-DPO
  with a LoRA for the rest of the budget.
- :func:`learn_backprop`: DRaFT-K reward backprop of the shapes CLIP score (``"shapes_clip"``, differentiable) on
  the aligned prompts, a few ODE steps at 32 px, with a LoRA, for the whole budget.
- :func:`grpo_prompt_gains`: Flow-GRPO with the demo's recipe on a few prompts, paired scores per image (the CI
  learning test and ``benchmarks/shapes_grpo_margin.py``). GRPO's benchmark run is the demo itself.

Both runners write ``<output>/metrics.json`` in the demo's layout (``before``, ``after``, ``gain``: ``mean_reward``
and ``strict_accuracy`` on the aligned prompts, the same under ``unseen``; the settings and timings), the run's
``config.yaml``, ``metrics.jsonl``, the final checkpoint and ``lora/``.

Command line: ``diffalign bench learn --method dpo|backprop|grpo [--minutes M] [--output DIR]``.

Measured (1 CPU thread each, two runs sharing the 2-core machine; base: aligned strict 0.430, reward 0.772 over
8 x 16 images, unseen strict 0.336, reward 0.665 over 32 x 4; one image flips the aligned strict accuracy by
0.008, and the paired standard error of a gain is ~0.04):

- DPO, defaults (K = 32, all 2,189 pairs, LoRA 16, lr 1e-4, beta 100, 8 pairs a step, noise levels
  logit-normal(1, 1)), ``diffalign bench learn --method dpo --minutes 10``: pairs in 0.6 minutes, 2,930 steps in
  9.4; aligned strict 0.430 -> 0.578 (+0.148), reward 0.772 -> 0.834; unseen strict 0.336 -> 0.352, reward
  0.665 -> 0.700. A longer run with the held-out curve (pairs reused): aligned strict 0.430 -> 0.492 / 0.578 /
  0.570 / 0.602 / 0.617 after 400 / 800 / 1,600 / 2,400 / 3,200 steps; at the end of a 14-minute run (its
  evaluations included) 0.430 -> 0.641 (+0.211), reward +0.074, unseen unchanged (0.336 -> 0.336). Adding the
  denoising loss on the preferred images (``sft_weight=1``): +0.195 aligned, +0.039 unseen. With pairs from 304
  training prompts and a 48-prompt evaluation set instead, DPO moved it by at most +0.035: it needs a few hundred
  pairs per prompt.
- Reward backprop, defaults (DRaFT-K, 10 ODE steps, K = 10, LoRA 16, lr 3e-4, 8 images a step, ~2.4 s a step),
  ``diffalign bench learn --method backprop --minutes 10 --threads 1``: 240 steps; aligned strict 0.430 -> 0.555
  (+0.125), reward 0.772 -> 0.824; unseen strict 0.336 -> 0.344, reward 0.665 -> 0.684. Seed 1: 246 steps,
  0.430 -> 0.547 (+0.117), unseen 0.336 -> 0.320. A run with the held-out curve: 0.469 / 0.500 / 0.516 / 0.555
  after 60 / 120 / 180 / 240 steps, 0.563 (+0.133) at the end. Over 20 minutes it keeps rising: 0.523 / 0.570 /
  0.586 after 300 / 360 / 420 steps, 0.594 (+0.164) at the end, reward 0.853; unseen strict 0.336 -> 0.297, so
  what it learns stays with the prompts it trains on.

  The shapes CLIP is what made it work. On the CLIP shipped before (blind to relations, relation accuracy 0.525,
  and preferring "a green circle and a blue square" on the base model's usual drawing of "a blue circle and a
  green square", see :mod:`~diffalign.shapes.train_clip`) the same recipe gave 0.430 -> 0.422 (-0.008) in 10
  minutes: 0.492 / 0.500 / 0.461 / 0.438 after 60 / 120 / 180 / 240 steps while the CLIP score kept rising
  (62 -> 75), over-optimising a judge that could not see half of what the verifier checks. Nothing tried on the
  optimiser side helped it: an EMA of the weights (decay 0.97) peaked the same (0.508 at 120 steps); 16 images a
  step fell sooner (0.383 at 120); lr 1e-4 rose slowly (0.453 at 240); K = 2 collapsed (0.055 at 480); the LoRA
  limited to the first two of the 10 steps (``lora_min_timestep`` 778, as the GRPO demo does) lowered the verifier
  (0.359). An intermediate CLIP that saw relations (0.89) but was trained without the colour-swap and count
  negatives (1,500 steps) gave 0.484 / 0.453 after 60 / 120 steps.

DPO and reward backprop both reach the +0.10 target within 10 minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.adapters import DiffusionAdapter, load_adapter
from diffalign.config import load_config
from diffalign.shapes.demo import BASE_MODEL, EVAL_SEEDS, UNSEEN_SEEDS, compare, demo_prompts, load_protocol
from diffalign.shapes.model import repeated_context_sampling
from diffalign.trainers.common import build_reward
from diffalign.trainers.evaluation import Evaluator


__all__ = [
    "evaluate_heldout",
    "format_summary",
    "grpo_prompt_gains",
    "learn_backprop",
    "learn_dpo",
]

logger = logging.getLogger(__name__)


def evaluate_heldout(
    adapter: DiffusionAdapter,
    reward: Any,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = EVAL_SEEDS,
    protocol: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Sample every prompt at every seed with the evaluation protocol and score the images with the verifier.

    Args:
        adapter: the model (as it is: call inside an EMA swap to measure EMA weights).
        reward: the ``"shapes"`` verifier reward (anything
            :func:`~diffalign.trainers.evaluation.score_with_parts` takes; ``strict`` needs ``evaluate``).
        prompts: evaluation prompts (default: the demo's aligned prompts).
        seeds: one image per prompt and seed.
        protocol: ``num_steps`` and ``guidance_scale`` (default: the one stored beside the shipped model).
        batch_size: images per denoiser batch.

    Returns:
        ``{"mean_reward", "strict_accuracy"}`` over all ``len(prompts) * len(seeds)`` images.
    """
    prompts = list(prompts) if prompts is not None else demo_prompts()[0]
    protocol = protocol or load_protocol(BASE_MODEL)
    evaluator = Evaluator(
        adapter,
        reward,
        prompts,
        list(seeds),
        protocol["num_steps"],
        protocol["guidance_scale"],
        batch_size=batch_size,
    )
    with repeated_context_sampling(adapter), torch.no_grad():
        _, scores = evaluator.score()
    strict = scores["strict"].mean().item() if "strict" in scores else float("nan")
    return {"mean_reward": scores["reward"].mean().item(), "strict_accuracy": strict}


# ---------------------------------------------------------------------------------------------------------------------
# Shared run skeleton
# ---------------------------------------------------------------------------------------------------------------------


class _Bench:
    """The parts every runner shares: the model folder, the verifier, the two evaluation sets and the timings."""

    def __init__(
        self,
        method: str,
        model: str | Path | None,
        output: str | Path,
        prompts: Sequence[str] | None,
        unseen_prompts: Sequence[str] | None,
        eval_seeds: Sequence[int],
        unseen_seeds: Sequence[int],
    ) -> None:
        self.method = method
        self.model = Path(model) if model is not None else BASE_MODEL
        if not (self.model / "model_index.json").is_file():
            raise FileNotFoundError(
                f"no shapes base model at {self.model}: reinstall diffalign, or train one with "
                "python -m diffalign.shapes.train_base --out diffalign/shapes/assets/base_model"
            )
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.protocol = load_protocol(self.model)
        self.verifier = build_reward("shapes")
        aligned, unseen = demo_prompts()
        self.prompts = list(prompts) if prompts is not None else aligned
        self.unseen_prompts = list(unseen_prompts) if unseen_prompts is not None else unseen
        self.eval_seeds, self.unseen_seeds = tuple(eval_seeds), tuple(unseen_seeds)
        self.started = time.monotonic()
        self.eval_seconds = 0.0

    def load_base(self) -> DiffusionAdapter:
        """The base model at the protocol's resolution."""
        size = self.protocol["resolution"]
        return load_adapter(self.model, height=size, width=size)

    def evaluate(self, adapter: DiffusionAdapter, ema: Any = None) -> dict[str, dict[str, float]]:
        """:func:`evaluate_heldout` of the aligned and the unseen prompts (EMA weights swapped in when given)."""
        began = time.monotonic()
        sets = {"aligned": (self.prompts, self.eval_seeds), "unseen": (self.unseen_prompts, self.unseen_seeds)}
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            result = {
                name: evaluate_heldout(adapter, self.verifier, prompts, seeds, self.protocol)
                for name, (prompts, seeds) in sets.items()
                if prompts
            }
        self.eval_seconds += time.monotonic() - began
        return result

    def finish(self, before: dict[str, dict], after: dict[str, dict], **details: Any) -> dict[str, Any]:
        """The metrics (also written to ``<output>/metrics.json``): the demo's layout."""
        metrics: dict[str, Any] = {"method": self.method, **compare(before["aligned"], after["aligned"])}
        if "unseen" in before:
            metrics["unseen"] = compare(before["unseen"], after["unseen"])
        metrics.update(details)
        metrics["eval"] = {
            "prompts": len(self.prompts),
            "seeds": list(self.eval_seeds),
            "unseen_prompts": len(self.unseen_prompts),
            "unseen_seeds": list(self.unseen_seeds),
            **self.protocol,
            "seconds": self.eval_seconds,
        }
        metrics["wall_minutes"] = (time.monotonic() - self.started) / 60
        (self.output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics


def _common_config(
    bench: _Bench,
    seed: int,
    minutes: float,
    max_steps: int,
    rank: int,
    lr: float,
    eval_every: int,
    ema_decay: float | None,
) -> dict[str, Any]:
    """The settings both runners share (LoRA, budget, optimizer, EMA, logging, checkpoints, periodic evaluation)."""
    return {
        "ema": {"enabled": ema_decay is not None, "decay": ema_decay if ema_decay is not None else 0.9999},
        "model": {"path": str(bench.model), "lora": {"rank": rank}},  # alpha = rank; rank 0: full fine-tuning
        "output_dir": str(bench.output),
        "seed": seed,
        "max_steps": max_steps,
        "max_minutes": minutes,
        "optim": {"lr": lr, "weight_decay": 1e-4, "max_grad_norm": 1.0},
        "logging": {"log_with": "none", "log_every": 5},
        "checkpoint": {"every": 0, "keep_last": 1},
        "eval": {"every": eval_every, "prompts": bench.prompts, "seeds": list(bench.eval_seeds)},
    }


def _train(bench: _Bench, trainer: Any) -> float:
    """Train inside the sampling shortcut, held-out verifier curve every ``eval.every`` steps; returns seconds.

    The periodic evaluation (logged as ``eval/reward_mean`` and ``eval/strict_mean`` in ``metrics.jsonl``) uses the
    verifier and the evaluation protocol whatever the training reward; its time counts against the budget.
    """
    if trainer.config.eval.every > 0:
        trainer.evaluator = Evaluator(
            trainer.adapter,
            bench.verifier,
            bench.prompts,
            list(bench.eval_seeds),
            bench.protocol["num_steps"],
            bench.protocol["guidance_scale"],
            output_dir=bench.output,
            batch_size=48,
        )
    began = time.monotonic()
    with repeated_context_sampling(trainer.adapter):
        trainer.train()
    return time.monotonic() - began


# ---------------------------------------------------------------------------------------------------------------------
# Flow-GRPO on a few prompts (the CI learning test and its calibration)
# ---------------------------------------------------------------------------------------------------------------------


def grpo_prompt_gains(
    prompts: Sequence[str],
    epochs: int,
    output: str | Path,
    seed: int = 0,
    *,
    eval_seeds: Sequence[int] = EVAL_SEEDS,
    shuffle_advantages: bool = False,
    model: str | Path | None = None,
    sampling: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Flow-GRPO with the demo's recipe (:func:`~diffalign.shapes.demo.demo_config`) on ``prompts`` for ``epochs``,
    and the verifier's scores of the same evaluation images before and after.

    Every prompt is sampled at every evaluation seed with the evaluation protocol (one ODE image each), so that
    each image after training is paired with the image of the same prompt and initial noise before it.

    Args:
        prompts: the prompts to align.
        epochs: GRPO epochs (``sampling.prompts_per_epoch`` groups of 8 images each).
        output: run folder.
        seed: training seed (prompt order, noises).
        eval_seeds: evaluation seeds (training draws ``epoch * 100_003 + i``, never these).
        shuffle_advantages: the control: every epoch's advantages randomly permuted over its images, so the
            updates have the same sizes and the same samples but no credit assignment.
        model: base model folder (default: the shipped one).
        sampling: overrides of the recipe's ``sampling`` settings (e.g. the SDE window).

    Returns:
        ``{"reward_before", "reward_after", "strict_before", "strict_after"}``, each ``[len(prompts) *
        len(eval_seeds)]``, prompt-major.
    """
    from diffalign.shapes.demo import demo_config
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    model = Path(model) if model is not None else BASE_MODEL
    raw = demo_config(model, Path(output), None, seed, list(prompts))
    raw.update(max_steps=epochs, checkpoint={"every": 0, "keep_last": 1}, logging={"log_with": "none"})
    raw["sampling"].update(sampling or {})
    trainer = GRPOTrainer(load_config(GRPOConfig, raw))
    if shuffle_advantages:
        trainer.advantages = _shuffled(trainer.advantages, seed)
    protocol = load_protocol(model)
    evaluator = Evaluator(
        trainer.adapter,
        trainer.reward,
        list(prompts),
        list(eval_seeds),
        protocol["num_steps"],
        protocol["guidance_scale"],
        batch_size=64,
    )
    with repeated_context_sampling(trainer.adapter):
        _, before = evaluator.score()
        trainer.train()
        _, after = evaluator.score()
    phases = {"before": before, "after": after}
    return {f"{name}_{phase}": scores[name] for phase, scores in phases.items() for name in ("reward", "strict")}


def _shuffled(advantages_fn, seed: int):
    """``advantages_fn`` with its advantages randomly permuted (seeded), for the no-credit-assignment control."""
    generator = torch.Generator().manual_seed(seed)

    def shuffled(*args, **kwargs):
        advantages, stats = advantages_fn(*args, **kwargs)
        return advantages[torch.randperm(advantages.shape[0], generator=generator)], stats

    return shuffled


# ---------------------------------------------------------------------------------------------------------------------
# Diffusion-DPO
# ---------------------------------------------------------------------------------------------------------------------


def learn_dpo(
    minutes: float = 10.0,
    output: str | Path = "runs/bench_learn/dpo",
    seed: int = 0,
    *,
    model: str | Path | None = None,
    prompts: Sequence[str] | None = None,
    unseen_prompts: Sequence[str] | None = None,
    eval_seeds: Sequence[int] = EVAL_SEEDS,
    unseen_seeds: Sequence[int] = UNSEEN_SEEDS,
    num_candidates: int = 32,
    pairing: str = "all",
    pair_steps: int | None = None,
    pairs: str | Path | None = None,
    max_steps: int = 100_000,
    lr: float = 1e-4,
    beta: float = 100.0,
    lora_rank: int = 16,
    batch_size: int = 8,
    empty_caption_prob: float = 0.0,
    sft_weight: float = 0.0,
    loss: str = "dpo",
    logit_mean: float = 1.0,
    ema_decay: float | None = None,
    eval_every: int = 0,
) -> dict[str, Any]:
    """Diffusion-DPO on the shapes world from verifier-ranked pairs; the demo's measurements before and after.

    Args:
        minutes: the budget for pair generation and training (evaluation not counted).
        output: run folder (``metrics.json``, ``pairs/``, ``lora/``, ``config.yaml``, ``metrics.jsonl``).
        seed: seed of the candidates' noises and of training.
        model: base model folder (default: the shipped one).
        prompts: the prompts to align, pairs are built from them (default: the demo's aligned prompts).
        unseen_prompts: held-out prompts nothing trains on (default: the demo's; empty: not measured).
        eval_seeds: evaluation seeds of ``prompts``.
        unseen_seeds: evaluation seeds of ``unseen_prompts``.
        num_candidates: ``K`` ODE samples per prompt, ranked by the verifier.
        pairing: ``"all"`` (every pair with different verifier scores) or ``"best_worst"`` (one pair per prompt);
            see :func:`~diffalign.data.ai_feedback.rank_pairs`.
        pair_steps: ODE steps of the candidates (default: the evaluation protocol's).
        pairs: train on this existing preference dataset (e.g. ``<earlier output>/pairs``) instead of building one;
            its time is then not part of the budget.
        max_steps: optimizer steps at most (the budget usually ends training first).
        lr: AdamW learning rate of the LoRA.
        beta: DPO temperature (per-pixel MSE convention; 100 is the SD3/flow default).
        lora_rank: LoRA rank (alpha = rank).
        batch_size: pairs per optimizer step.
        empty_caption_prob: share of captions dropped while training.
        sft_weight: weight of the denoising loss on the preferred images added to the DPO loss.
        loss: ``"dpo"``, or ``"sft"`` (the denoising loss on the preferred images only: rejection-sampling
            fine-tuning, a baseline).
        logit_mean: mean of the logit-normal noise-level density of training (> 0 favours high noise, where the
            layout is decided).
        ema_decay: keep an EMA of the trained weights with this decay and evaluate (and export) it; None = off.
        eval_every: also evaluate (held-out verifier, logged to ``metrics.jsonl``) every this many steps; 0 = off.

    Returns:
        The metrics written to ``<output>/metrics.json``.
    """
    from diffalign.data.ai_feedback import SUMMARY_NAME, make_preference_pairs
    from diffalign.trainers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer

    bench = _Bench("dpo", model, output, prompts, unseen_prompts, eval_seeds, unseen_seeds)
    base = bench.load_base()
    before = bench.evaluate(base)
    steps = pair_steps or bench.protocol["num_steps"]
    pair_seconds = 0.0
    if pairs is None:
        pairs = bench.output / "pairs"
        began = time.monotonic()
        with repeated_context_sampling(base):
            make_preference_pairs(
                base,
                bench.prompts,
                bench.verifier,
                num_candidates,
                pairs,
                pairing=pairing,
                num_steps=steps,
                guidance_scale=bench.protocol["guidance_scale"],
                seed=seed,
                batch_size=64,
            )
        pair_seconds = time.monotonic() - began
    summary = json.loads((Path(pairs) / SUMMARY_NAME).read_text())
    del base
    train_minutes = max(minutes - pair_seconds / 60, 1e-6)  # spent: one step, then stop
    raw = _common_config(bench, seed, train_minutes, max_steps, lora_rank, lr, eval_every, ema_decay)
    raw.update(
        method="diffusion_dpo",
        reward="shapes",  # only for the periodic evaluation
        data={
            "source": str(pairs),
            "resolution": bench.protocol["resolution"],
            "batch_size": batch_size,
            "random_flip": False,  # a mirrored pair would contradict its left/right caption
            "empty_caption_prob": empty_caption_prob,
        },
        dpo={"loss": loss, "beta": beta, "sft_weight": sft_weight, "logit_mean": logit_mean},
    )
    trainer = DiffusionDPOTrainer(load_config(DiffusionDPOConfig, raw))
    train_seconds = _train(bench, trainer)
    after = bench.evaluate(trainer.adapter, trainer.run.ema)
    metrics = bench.finish(
        before,
        after,
        budget_minutes=minutes,
        pairs={
            "source": str(pairs),
            "prompts": summary["num_prompts"],
            "candidates": summary["num_per_prompt"],
            "pairing": summary["pairing"],
            "pairs": summary["num_pairs"],
            "steps": summary["num_steps"],
            "minutes": pair_seconds / 60,
        },
        train={
            "steps": trainer.run.optimizer_steps,
            "minutes": train_seconds / 60,
            "lr": lr,
            "beta": beta,
            "lora_rank": lora_rank,
            "batch_size": batch_size,
            "empty_caption_prob": empty_caption_prob,
            "sft_weight": sft_weight,
            "loss": loss,
            "logit_mean": logit_mean,
            "ema_decay": ema_decay,
        },
    )
    print(format_summary(metrics, bench.output))  # noqa: T201
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Reward backprop
# ---------------------------------------------------------------------------------------------------------------------


def learn_backprop(
    minutes: float = 10.0,
    output: str | Path = "runs/bench_learn/backprop",
    seed: int = 0,
    *,
    model: str | Path | None = None,
    prompts: Sequence[str] | None = None,
    unseen_prompts: Sequence[str] | None = None,
    eval_seeds: Sequence[int] = EVAL_SEEDS,
    unseen_seeds: Sequence[int] = UNSEEN_SEEDS,
    max_steps: int = 100_000,
    lr: float = 3e-4,
    lora_rank: int = 16,
    num_steps: int = 10,
    k: int = 10,
    batch_size: int = 8,
    guidance_scale: float | None = None,
    mode: str = "draft_k",
    refl_step_range: tuple[int, int] | None = None,
    gradient_checkpointing: bool = True,
    reward: str = "shapes_clip",
    ema_decay: float | None = None,
    eval_every: int = 0,
) -> dict[str, Any]:
    """Reward backprop (DRaFT-K) of the shapes CLIP score; the demo's verifier measurements before and after.

    Args:
        minutes: the training budget (evaluation not counted).
        output: run folder (``metrics.json``, ``lora/``, ``config.yaml``, ``metrics.jsonl``).
        seed: seed of training (prompt draws, noises).
        model: base model folder (default: the shipped one).
        prompts: the prompts to align (default: the demo's aligned prompts).
        unseen_prompts: held-out prompts nothing trains on (default: the demo's; empty: not measured).
        eval_seeds: evaluation seeds of ``prompts``.
        unseen_seeds: evaluation seeds of ``unseen_prompts``.
        max_steps: optimizer steps at most (the budget usually ends training first).
        lr: AdamW learning rate of the LoRA.
        lora_rank: LoRA rank (alpha = rank).
        num_steps: ODE steps of the training trajectories.
        k: the last ``k`` steps keep their graph (``k = num_steps``: full DRaFT).
        batch_size: images per optimizer step.
        guidance_scale: CFG while training (default: the evaluation protocol's).
        mode: ``draft_k`` or another :class:`~diffalign.trainers.reward_backprop.BackpropConfig` mode.
        refl_step_range: ``mode="refl"``: the inclusive range of the one step with grad (null: the last quarter).
        gradient_checkpointing: recompute each grad step's activations in backward (less memory, slower).
        reward: the differentiable reward (default ``"shapes_clip"``).
        ema_decay: keep an EMA of the trained weights with this decay and evaluate (and export) it; None = off.
        eval_every: also evaluate (held-out verifier, logged to ``metrics.jsonl``) every this many steps; 0 = off.

    Returns:
        The metrics written to ``<output>/metrics.json``.
    """
    from diffalign.trainers.reward_backprop import RewardBackpropConfig, RewardBackpropTrainer

    bench = _Bench("backprop", model, output, prompts, unseen_prompts, eval_seeds, unseen_seeds)
    before = bench.evaluate(bench.load_base())
    guidance = bench.protocol["guidance_scale"] if guidance_scale is None else guidance_scale
    raw = _common_config(bench, seed, minutes, max_steps, lora_rank, lr, eval_every, ema_decay)
    raw.update(
        method="reward_backprop",
        reward=reward,
        gradient_checkpointing=gradient_checkpointing,
        sampling={
            "prompts": bench.prompts,
            "num_steps": num_steps,
            "guidance_scale": guidance,
            "eta": 0.0,  # the Euler ODE, as the evaluation samples
            "batch_size": batch_size,
            "resolution": bench.protocol["resolution"],
        },
        backprop={"mode": mode, "k": min(k, num_steps), "loss": "negative", "refl_step_range": refl_step_range},
    )
    trainer = RewardBackpropTrainer(load_config(RewardBackpropConfig, raw))
    train_seconds = _train(bench, trainer)
    after = bench.evaluate(trainer.adapter, trainer.run.ema)
    metrics = bench.finish(
        before,
        after,
        budget_minutes=minutes,
        train={
            "steps": trainer.run.optimizer_steps,
            "minutes": train_seconds / 60,
            "reward": reward,
            "mode": mode,
            "refl_step_range": refl_step_range,
            "num_steps": num_steps,
            "k": min(k, num_steps),
            "lr": lr,
            "lora_rank": lora_rank,
            "batch_size": batch_size,
            "guidance_scale": guidance,
            "gradient_checkpointing": gradient_checkpointing,
            "ema_decay": ema_decay,
        },
    )
    print(format_summary(metrics, bench.output))  # noqa: T201
    return metrics


def format_summary(metrics: dict[str, Any], output: str | Path | None = None) -> str:
    """A few lines: the method, the training done, strict accuracy and mean reward before -> after."""
    before, after, gain = metrics["before"], metrics["after"], metrics["gain"]
    evaluation = metrics.get("eval", {})
    train = metrics.get("train", {})
    done = f"{train['steps']} steps in {train['minutes']:.1f} min" if "steps" in train else ""
    if "pairs" in metrics:
        pairs = metrics["pairs"]
        done = f"{pairs['pairs']} pairs in {pairs['minutes']:.1f} min, " + done
    lines = [
        f"shapes learning benchmark [{metrics.get('method', '?')}]: {done} (held-out compositions trained on, at "
        f"fresh seeds: {evaluation.get('prompts', '?')} prompts x {len(evaluation.get('seeds', []))} seeds)",
        f"  strict accuracy  {before['strict_accuracy']:.3f} -> {after['strict_accuracy']:.3f} "
        f"({gain['strict_accuracy']:+.3f})",
        f"  mean reward      {before['mean_reward']:.3f} -> {after['mean_reward']:.3f} ({gain['mean_reward']:+.3f})",
    ]
    if "unseen" in metrics:
        unseen = metrics["unseen"]
        lines.append(
            f"  held-out prompts not trained on: strict {unseen['before']['strict_accuracy']:.3f} -> "
            f"{unseen['after']['strict_accuracy']:.3f}, reward {unseen['before']['mean_reward']:.3f} -> "
            f"{unseen['after']['mean_reward']:.3f}"
        )
    if output is not None:
        lines.append(f"  outputs in {output}: metrics.json, lora/")
    return "\n".join(lines)
