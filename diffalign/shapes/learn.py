"""Learning benchmark on the shapes world: Diffusion-DPO and reward backprop on the shipped base model.

Each runner trains a LoRA on the shipped shapes base model within a wall-clock budget and measures the verifier
before and after with the demo's paired protocol (:func:`~diffalign.shapes.demo.demo_prompts`: the 8 aligned
held-out compositions it trains on, at seeds training never draws, and 32 unseen held-out prompts nothing trains
on); evaluation time is not part of the budget.

- :func:`learn_dpo`: Diffusion-DPO on AI-feedback pairs (``K`` = 32 ODE candidates per aligned prompt, ranked by
  the ``"shapes"`` verifier), for what is left of the budget after building them.
- :func:`learn_backprop`: DRaFT-K reward backprop of the differentiable shapes CLIP score (``"shapes_clip"``).
- :func:`grpo_prompt_gains`: Flow-GRPO with the demo's recipe on a few prompts, paired scores per image (the CI
  learning test and ``benchmarks/shapes_grpo_margin.py``). GRPO's benchmark run is the demo itself.

The runners write ``<output>/metrics.json`` (the demo's layout), ``config.yaml``, ``metrics.jsonl`` and ``lora/``.
Budget: optimizer steps (``max_steps``), the same work on any machine, or wall-clock minutes (``minutes``; what
fits in them depends on the machine: a 10-minute backprop run took 436 steps on one thread and 663 on two). With
``eval_every`` the held-out verifier is also measured every that many steps, and the curve goes into
``metrics.json``. Command line: ``diffalign bench learn --method dpo|backprop|grpo [--steps N | --minutes M]
[--eval-every N] [--output DIR]``. The measurements (gains, curves, what was tried) are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffalign.adapters import DiffusionAdapter, load_adapter
from diffalign.config import load_config
from diffalign.eval.evaluator import Evaluator
from diffalign.rewarding import build_reward
from diffalign.shapes.demo import BASE_MODEL, EVAL_SEEDS, UNSEEN_SEEDS, compare, demo_prompts, load_protocol
from diffalign.shapes.model import repeated_context_sampling


__all__ = [
    "LearnSettings",
    "evaluate_heldout",
    "format_summary",
    "grpo_prompt_gains",
    "heldout_curve",
    "learn_backprop",
    "learn_dpo",
    "render_real_pairs",
]

logger = logging.getLogger(__name__)

VALIDATION_SEEDS: tuple[int, ...] = tuple(range(90_101, 90_117))
"""Seeds of the periodic evaluation when it stops training early: apart from :data:`EVAL_SEEDS`, so that the final
measurement is not the one the run was selected on."""


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
        reward: the ``"shapes"`` verifier reward (a reward whose ``score_parts`` reports ``"strict"``).
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


@dataclass(frozen=True)
class LearnSettings:
    """The keyword arguments that every learning runner (:func:`learn_dpo`, :func:`learn_backprop`) takes besides
    its own (``**settings``).

    Attributes:
        model: base model folder (default: the shipped one).
        prompts: the prompts to align (DPO builds its pairs from them; default: the demo's aligned prompts).
        unseen_prompts: held-out prompts nothing trains on (default: the demo's; empty: not measured).
        eval_seeds: evaluation seeds of ``prompts``.
        unseen_seeds: evaluation seeds of ``unseen_prompts``.
        max_steps: optimizer steps at most: the budget when ``minutes`` is None, else a cap.
        lora_rank: LoRA rank (alpha = rank).
        ema_decay: keep an EMA of the trained weights with this decay and evaluate (and export) it; None = off.
        eval_every: also evaluate (held-out verifier, logged to ``metrics.jsonl`` and kept as ``curve`` in
            ``metrics.json``) every this many steps; 0 = off.
        early_stopping: stop when the held-out verifier's strict accuracy has not improved for this many periodic
            evaluations and end with the best one's weights (``eval.early_stopping_patience``); the periodic
            evaluation then uses ``validation_seeds`` instead of the final measurement's seeds. 0 = off;
            needs ``eval_every``.
        validation_seeds: the periodic evaluation's seeds when it stops early (default :data:`VALIDATION_SEEDS`).
    """

    model: str | Path | None = None
    prompts: Sequence[str] | None = None
    unseen_prompts: Sequence[str] | None = None
    eval_seeds: Sequence[int] = EVAL_SEEDS
    unseen_seeds: Sequence[int] = UNSEEN_SEEDS
    max_steps: int = 100_000
    lora_rank: int = 16
    ema_decay: float | None = None
    eval_every: int = 0
    early_stopping: int = 0
    validation_seeds: Sequence[int] = VALIDATION_SEEDS


class _Bench:
    """The parts every runner shares: the budget, the model folder, the verifier, the two evaluation sets, the
    config settings of :class:`LearnSettings`, training and the metrics."""

    def __init__(
        self,
        method: str,
        minutes: float | None,
        output: str | Path,
        seed: int = 0,
        settings: LearnSettings | None = None,
    ) -> None:
        self.method, self.minutes, self.seed = method, minutes, seed
        self.settings = settings = settings if settings is not None else LearnSettings()
        self.model = Path(settings.model) if settings.model is not None else BASE_MODEL
        if not (self.model / "model_index.json").is_file():
            raise FileNotFoundError(
                f"no shapes base model at {self.model}: reinstall diffalign, or train one with "
                "python scripts/shapes/train_base.py --out diffalign/shapes/assets/base_model"
            )
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.protocol = load_protocol(self.model)
        self.verifier = build_reward("shapes")
        aligned, unseen = demo_prompts()
        self.prompts = list(settings.prompts) if settings.prompts is not None else aligned
        self.unseen_prompts = list(settings.unseen_prompts) if settings.unseen_prompts is not None else unseen
        self.eval_seeds, self.unseen_seeds = tuple(settings.eval_seeds), tuple(settings.unseen_seeds)
        if settings.early_stopping and not settings.eval_every:
            raise ValueError("early_stopping follows the periodic evaluation: give eval_every > 0 too")
        # The periodic evaluation selects the weights when it stops early: then on seeds apart from the final ones.
        self.curve_seeds = tuple(settings.validation_seeds) if settings.early_stopping else self.eval_seeds
        if set(self.curve_seeds) & set(self.eval_seeds) and settings.early_stopping:
            raise ValueError("validation_seeds must differ from eval_seeds: the run would be selected on its score")
        self.started = time.monotonic()
        self.eval_seconds = 0.0

    def load_base(self) -> DiffusionAdapter:
        """The base model at the protocol's resolution."""
        size = self.protocol["resolution"]
        return load_adapter(self.model, height=size, width=size)

    def config(self, minutes: float | None, lr: float) -> dict[str, Any]:
        """The config settings every runner shares (LoRA, budget, optimizer, EMA, logging, checkpoints, periodic
        evaluation); ``minutes=None``: ``max_steps`` alone ends training."""
        settings = self.settings
        ema_decay = settings.ema_decay
        return {
            "ema": {"enabled": ema_decay is not None, "decay": ema_decay if ema_decay is not None else 0.9999},
            # alpha = rank; rank 0: full fine-tuning
            "model": {"path": str(self.model), "lora": {"rank": settings.lora_rank}},
            "output_dir": str(self.output),
            "seed": self.seed,
            "max_steps": settings.max_steps,
            "max_minutes": minutes,
            "optim": {"lr": lr, "weight_decay": 1e-4, "max_grad_norm": 1.0},
            "logging": {"log_with": "none", "log_every": 5},
            "checkpoint": {"every": 0, "keep_last": 1, "overwrite": True},  # a rerun replaces the last one
            "eval": {
                "every": settings.eval_every,
                "prompts": self.prompts,
                "seeds": list(self.curve_seeds),
                "early_stopping_patience": settings.early_stopping,
                "metric": "strict",
            },
        }

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

    def run(self, trainer: Any, before: dict[str, dict], train: dict[str, Any], **details: Any) -> dict[str, Any]:
        """Train (:func:`_train`), evaluate the trained model and :meth:`finish`; the metrics are also printed.

        The metrics record the budget, ``details``, then ``train`` (the run's settings) after the optimizer steps
        and the training minutes.
        """
        seconds, rows = _train(self, trainer)
        after = self.evaluate(trainer.adapter, trainer.run.ema)
        metrics = self.finish(
            before,
            after,
            budget_minutes=self.minutes,
            budget_steps=self.settings.max_steps if self.minutes is None else None,
            **details,
            train={
                "steps": trainer.run.optimizer_steps,
                "minutes": seconds / 60,
                "denoiser_rows_per_step": rows / max(trainer.run.optimizer_steps, 1),
                **train,
                **_stopping(trainer),
            },
        )
        print(format_summary(metrics, self.output))  # noqa: T201
        return metrics

    def finish(self, before: dict[str, dict], after: dict[str, dict], **details: Any) -> dict[str, Any]:
        """The metrics (also written to ``<output>/metrics.json``): the demo's layout."""
        metrics: dict[str, Any] = {"method": self.method, **compare(before["aligned"], after["aligned"])}
        if "unseen" in before:
            metrics["unseen"] = compare(before["unseen"], after["unseen"])
        metrics.update(details)
        curve = heldout_curve(self.output / "metrics.jsonl")
        if curve:
            metrics["curve"] = curve
        metrics["eval"] = {
            "prompts": len(self.prompts),
            "seeds": list(self.eval_seeds),
            "curve_seeds": list(self.curve_seeds),
            "unseen_prompts": len(self.unseen_prompts),
            "unseen_seeds": list(self.unseen_seeds),
            **self.protocol,
            "seconds": self.eval_seconds,
        }
        metrics["wall_minutes"] = (time.monotonic() - self.started) / 60
        (self.output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics


def _stopping(trainer: Any) -> dict[str, Any]:
    """What early stopping did: its patience and the step of the weights the run ended with (empty when off)."""
    stopping = trainer.run.early_stopping
    if stopping is None:
        return {}
    return {"early_stopping": {"patience": stopping.patience, "best_step": stopping.best_step}}


def heldout_curve(metrics_log: Path) -> list[dict[str, float]]:
    """The periodic held-out evaluations of a run's ``metrics.jsonl``: ``[{"step", "strict_accuracy",
    "mean_reward"}]`` in step order (empty when the run evaluated nothing)."""
    if not metrics_log.is_file():
        return []
    records = (json.loads(line) for line in metrics_log.read_text().splitlines() if line.strip())
    return [
        {"step": r["step"], "strict_accuracy": r["eval/strict_mean"], "mean_reward": r["eval/reward_mean"]}
        for r in records
        if "eval/strict_mean" in r
    ]


class DenoiserRows:
    """Counts the rows the denoiser runs forward on while training: one row per image and call, CFG's conditional
    and unconditional halves each a row, gradient-checkpoint recomputation included (it is compute), the periodic
    evaluation left out (:meth:`uncounted`). Machine-independent work per optimizer step, next to the seconds.

    Use as a context manager around training; ``rows`` holds the count.
    """

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser
        self.rows = 0
        self._paused = 0
        self._handle: Any = None

    def __enter__(self) -> DenoiserRows:
        self._handle = self.denoiser.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._paused:
            return
        first = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.rows += int(first.shape[0])

    def uncounted(self, evaluate: Any) -> Any:
        """``evaluate`` (a trainer's periodic evaluation, ``None`` allowed) with counting paused while it runs."""
        if evaluate is None:
            return None

        def run(step: int) -> Any:
            self._paused += 1
            try:
                return evaluate(step)
            finally:
                self._paused -= 1

        return run


def train_counting_rows(trainer: Any) -> int:
    """``trainer.train()`` with :class:`DenoiserRows` counting; returns the rows (the periodic evaluation's not).
    The trainer's evaluator is wrapped for the run and put back after it."""
    evaluator = trainer.evaluator
    with DenoiserRows(trainer.adapter.denoiser) as counter:
        trainer.evaluator = counter.uncounted(evaluator)
        try:
            trainer.train()
        finally:
            trainer.evaluator = evaluator
    return counter.rows


def _train(bench: _Bench, trainer: Any) -> tuple[float, int]:
    """Train inside the sampling shortcut, held-out verifier curve every ``eval.every`` steps; returns the seconds
    and the denoiser rows (:func:`train_counting_rows`).

    The periodic evaluation (logged as ``eval/reward_mean`` and ``eval/strict_mean`` in ``metrics.jsonl``) uses the
    verifier and the evaluation protocol whatever the training reward; its time counts against the budget.
    """
    if trainer.config.eval.every > 0:
        trainer.evaluator = Evaluator(
            trainer.adapter,
            bench.verifier,
            bench.prompts,
            list(bench.curve_seeds),
            bench.protocol["num_steps"],
            bench.protocol["guidance_scale"],
            output_dir=bench.output,
            batch_size=48,
        )
    began = time.monotonic()
    with repeated_context_sampling(trainer.adapter):
        rows = train_counting_rows(trainer)
    return time.monotonic() - began, rows


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
    raw.update(
        max_steps=epochs, checkpoint={"every": 0, "keep_last": 1, "overwrite": True}, logging={"log_with": "none"}
    )
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
    minutes: float | None = 10.0,
    output: str | Path = "runs/bench_learn/dpo",
    seed: int = 0,
    *,
    num_candidates: int = 32,
    pairing: str = "all",
    pair_steps: int | None = None,
    pairs: str | Path | None = None,
    lr: float = 1e-4,
    beta: float = 100.0,
    batch_size: int = 8,
    empty_caption_prob: float = 0.0,
    sft_weight: float = 0.0,
    loss: str = "dpo",
    logit_mean: float = 1.0,
    text_pairs: bool = False,
    noising: str = "forward",
    inversion_steps: int = 10,
    inversion_eta: float = 0.0,
    smoothing: str = "none",
    smoothing_temperature: float = 0.5,
    method: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Diffusion-DPO on the shapes world from verifier-ranked pairs; the demo's measurements before and after.

    ``text_pairs=True`` trains on text preference pairs instead (free-lunch alignment,
    :mod:`diffalign.data.text_pairs`): two rendered scenes of each base training caption
    (:func:`~diffalign.shapes.scenes.train_prompts`, none of them aligned or unseen), each preferred under its caption
    over a rule-perturbed one; the aligned prompts are then only evaluated (the method ``tpo``).

    Args:
        minutes: the budget for pair generation and training (evaluation not counted); ``None``: the pairs, then
            ``max_steps`` optimizer steps.
        output: run folder (``metrics.json``, ``pairs/``, ``lora/``, ``config.yaml``, ``metrics.jsonl``).
        seed: seed of the candidates' noises and of training.
        num_candidates: ``K`` ODE samples per prompt, ranked by the verifier.
        pairing: ``"all"`` (every pair with different verifier scores) or ``"best_worst"`` (one pair per prompt);
            see :func:`~diffalign.data.ai_feedback.rank_pairs`.
        pair_steps: ODE steps of the candidates (default: the evaluation protocol's).
        pairs: train on this existing preference dataset (e.g. ``<earlier output>/pairs``) instead of building one;
            its time is then not part of the budget.
        lr: AdamW learning rate of the LoRA.
        beta: DPO temperature (per-pixel MSE convention; 100 is the SD3/flow default).
        batch_size: pairs per optimizer step.
        empty_caption_prob: share of captions dropped while training.
        sft_weight: weight of the denoising loss on the preferred images added to the DPO loss.
        loss: ``"dpo"``, or ``"sft"`` (the denoising loss on the preferred images only: rejection-sampling
            fine-tuning, a baseline).
        text_pairs: train on text preference pairs of rendered scenes (see above) instead of ranked samples.
        logit_mean: mean of the logit-normal noise-level density of training (> 0 favours high noise, where the
            layout is decided).
        noising: ``dpo.noising``: ``"forward"`` (Diffusion-DPO), ``"ddim_inversion"`` (InPO) or
            ``"renoise_inversion"`` (SmPO), with ``inversion_steps`` and ``inversion_eta``.
        smoothing: ``dpo.smoothing``: ``"reward"`` for SmPO's smoothed preferences, scored by the verifier with
            ``smoothing_temperature`` (its scores are shares of the caption's facts, in [0, 1]).
        method: the name in the metrics (default ``"tpo"`` with text pairs, else ``"dpo"``).
        **settings: the settings every runner takes, see :class:`LearnSettings` (``model``, ``prompts``,
            ``unseen_prompts``, ``eval_seeds``, ``unseen_seeds``, ``max_steps``, ``lora_rank``, ``ema_decay``,
            ``eval_every``).

    Returns:
        The metrics written to ``<output>/metrics.json``.
    """
    from diffalign.data.ai_feedback import SUMMARY_NAME, make_preference_pairs
    from diffalign.trainers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer

    method = method or ("tpo" if text_pairs else "dpo")
    bench = _Bench(method, minutes, output, seed, LearnSettings(**settings))
    base = bench.load_base()
    before = bench.evaluate(base)
    steps = pair_steps or bench.protocol["num_steps"]
    pair_seconds = 0.0
    if text_pairs:
        from diffalign.data.text_pairs import make_text_preference_pairs
        from diffalign.shapes.scenes import train_prompts

        began = time.monotonic()
        scenes = render_real_pairs(train_prompts(), 2, bench.output / "real_images", seed=seed)
        made = make_text_preference_pairs(scenes, bench.output / "pairs", seed=seed)
        pairs, pair_seconds = bench.output / "pairs", time.monotonic() - began
        summary = {"num_prompts": len(train_prompts()), "num_per_prompt": 2, "pairing": "text", "num_steps": 0}
        summary["num_pairs"] = made["pairs"]
    elif pairs is None:
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
    if not text_pairs:
        summary = json.loads((Path(pairs) / SUMMARY_NAME).read_text())
    del base
    # The pairs' time counts against a minutes budget; if it spent it, training runs its one step and stops.
    raw = bench.config(None if minutes is None else max(minutes - pair_seconds / 60, 1e-6), lr)
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
        dpo={
            "loss": loss,
            "beta": beta,
            "sft_weight": sft_weight,
            "logit_mean": logit_mean,
            "noising": noising,
            "inversion_steps": inversion_steps,
            "inversion_eta": inversion_eta,
            "smoothing": smoothing,
            "smoothing_temperature": smoothing_temperature,
        },
    )
    trainer = DiffusionDPOTrainer(load_config(DiffusionDPOConfig, raw))
    return bench.run(
        trainer,
        before,
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
            "lr": lr,
            "beta": beta,
            "lora_rank": bench.settings.lora_rank,
            "batch_size": batch_size,
            "empty_caption_prob": empty_caption_prob,
            "sft_weight": sft_weight,
            "loss": loss,
            "logit_mean": logit_mean,
            "noising": noising,
            "inversion_steps": inversion_steps,
            "inversion_eta": inversion_eta,
            "smoothing": smoothing,
            "smoothing_temperature": smoothing_temperature,
            "ema_decay": bench.settings.ema_decay,
        },
    )


# ---------------------------------------------------------------------------------------------------------------------
# Self-NPO: a negative LoRA for CFG's unconditional branch
# ---------------------------------------------------------------------------------------------------------------------


def learn_self_npo(
    minutes: float | None = 10.0,
    output: str | Path = "runs/bench_learn/self_npo",
    seed: int = 0,
    *,
    lr: float = 1e-4,
    batch_size: int = 8,
    truncation_steps: int = 5,
    num_grid_steps: int = 25,
    teacher_guidance: float = -1.0,
    teacher_decay: float = 0.999,
    **settings: Any,
) -> dict[str, Any]:
    """Self-NPO on the shapes world (:mod:`diffalign.trainers.self_npo`): a negative LoRA trained from the base
    model's own truncated walks, measured as it is used, on CFG's unconditional half at the protocol's guidance.

    The walks start from one rendered scene of each base training caption (:func:`render_real_pairs` of
    :func:`~diffalign.shapes.scenes.train_prompts`, none of them aligned or unseen): Self-NPO needs image-caption
    pairs to start from but no preference and no reward, and nothing here is about the evaluated prompts.

    Args:
        minutes: the training budget (evaluation not counted); ``None``: ``max_steps`` optimizer steps.
        output: run folder (``metrics.json``, ``lora/``, ``config.yaml``, ``metrics.jsonl``).
        seed: seed of the scenes, the walks and the noises.
        lr: AdamW learning rate of the LoRA.
        batch_size: pairs per optimizer step.
        truncation_steps, num_grid_steps, teacher_guidance, teacher_decay: ``self_npo`` settings (Self-NPO's SD1.5
            values by default).
        **settings: the settings every runner takes, see :class:`LearnSettings`.

    Returns:
        The metrics written to ``<output>/metrics.json``.
    """
    from diffalign.shapes.scenes import train_prompts
    from diffalign.trainers.self_npo import SelfNPOConfig, SelfNPOTrainer

    bench = _Bench("self_npo", minutes, output, seed, LearnSettings(**settings))
    before = bench.evaluate(bench.load_base())
    real = render_real_pairs(train_prompts(), 1, bench.output / "real_images", seed=seed)
    objective = {
        "truncation_steps": truncation_steps,
        "num_grid_steps": num_grid_steps,
        "teacher_guidance": teacher_guidance,
        "teacher_decay": teacher_decay,
    }
    raw = bench.config(minutes, lr)
    raw.update(
        method="self_npo",
        reward="shapes",  # only for the periodic evaluation
        data={"real_images": str(real), "resolution": bench.protocol["resolution"], "batch_size": batch_size},
        self_npo=objective,
    )
    trainer = SelfNPOTrainer(load_config(SelfNPOConfig, raw))
    return bench.run(
        trainer, before, train={"lr": lr, "batch_size": batch_size, "lora_rank": bench.settings.lora_rank, **objective}
    )


# ---------------------------------------------------------------------------------------------------------------------
# Self-play rounds: RAFT, SPIN-Diffusion and SePPO
# ---------------------------------------------------------------------------------------------------------------------


def learn_self_play(
    minutes: float | None = 10.0,
    output: str | Path = "runs/bench_learn/raft",
    seed: int = 0,
    *,
    method: Literal["raft", "spin", "seppo"] = "raft",
    lr: float = 1e-4,
    batch_size: int = 8,
    steps_per_round: int = 100,
    samples_per_prompt: int = 16,
    keep_per_prompt: int = 2,
    keep_share: float = 1.0,
    beta: float = 100.0,
    logit_mean: float = 1.0,
    real_images_per_prompt: int = 16,
    guidance_scale: float | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """RAFT or SPIN-Diffusion on the shapes world (:mod:`diffalign.trainers.self_play`); the demo's verifier
    measurements before and after.

    ``method="raft"`` samples ``samples_per_prompt`` images of each aligned prompt per round, ranks them by the
    verifier (the demo's reward) and fine-tunes on the best ``keep_per_prompt`` of each. ``method="spin"`` plays the
    model's own images against real scenes of the aligned prompts rendered by the shapes renderer
    (``real_images_per_prompt`` each, :func:`render_real_pairs`); ``method="seppo"`` plays the same scenes against a
    previous round's model's images with SePPO's anchored loss. SPIN-Diffusion and SePPO train on real images of
    their training prompts (Pick-a-Pic's winners), which on the shapes world are correct scenes of the evaluated
    prompts, so compare them with the denoising loss on the same scenes (a supervised baseline), not with the reward
    methods.

    Args:
        minutes: the training budget (evaluation not counted); ``None``: ``max_steps`` optimizer steps.
        output: run folder (``metrics.json``, ``lora/``, ``config.yaml``, ``metrics.jsonl``).
        seed: seed of the samples, noises and timesteps.
        method: ``"raft"``, ``"spin"`` or ``"seppo"``.
        lr: AdamW learning rate of the LoRA.
        batch_size: training images (raft) or pairs (spin) per optimizer step.
        steps_per_round: optimizer steps between two rounds of sampling.
        samples_per_prompt, keep_per_prompt, keep_share: RAFT's K and its selection.
        beta: spin's and seppo's DPO temperature (per-pixel MSE convention; 100 is the SD3/flow default).
        logit_mean: mean of the logit-normal noise-level density of training (as :func:`learn_dpo`).
        real_images_per_prompt: spin: rendered real scenes per aligned prompt.
        guidance_scale: CFG of the rounds' samples (default: none, 1.0, for raft; the evaluation protocol's for
            spin). RAFT fine-tunes the conditional model on its kept samples; samples drawn with CFG and sampled
            with CFG again compound the guidance round after round: at the protocol's 4.5 the shapes model's
            rounds degrade from round 8 on and collapse by round 13 (benchmarks/RESULTS.md).
        **settings: the settings every runner takes, see :class:`LearnSettings`.

    Returns:
        The metrics written to ``<output>/metrics.json``.
    """
    from diffalign.trainers.self_play import SelfPlayConfig, SelfPlayTrainer

    bench = _Bench(method, minutes, output, seed, LearnSettings(**settings))
    before = bench.evaluate(bench.load_base())
    raw = bench.config(minutes, lr)
    if guidance_scale is None:
        guidance_scale = 1.0 if method == "raft" else bench.protocol["guidance_scale"]
    sampling = {
        "num_steps": bench.protocol["num_steps"],
        "guidance_scale": guidance_scale,
        "resolution": bench.protocol["resolution"],
        "batch_size": 64,
    }
    if method == "raft":
        sampling["prompts"] = bench.prompts
    else:
        real = render_real_pairs(bench.prompts, real_images_per_prompt, bench.output / "real_images", seed=seed)
        sampling["real_images"] = str(real)
    rounds = {
        "steps_per_round": steps_per_round,
        "samples_per_prompt": samples_per_prompt,
        "keep_per_prompt": keep_per_prompt,
        "keep_share": keep_share,
        "batch_size": batch_size,
    }
    raw.update(
        method=method,
        reward="shapes",
        sampling=sampling,
        self_play=rounds,
        dpo={"logit_mean": logit_mean, **({"beta": beta} if method != "raft" else {})},
    )
    trainer = SelfPlayTrainer(load_config(SelfPlayConfig, raw))
    return bench.run(
        trainer,
        before,
        train={
            "lr": lr,
            "beta": beta,
            "logit_mean": logit_mean,
            "guidance_scale": guidance_scale,
            "lora_rank": bench.settings.lora_rank,
            **rounds,
        },
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reward backprop
# ---------------------------------------------------------------------------------------------------------------------


def learn_backprop(
    minutes: float | None = 10.0,
    output: str | Path = "runs/bench_learn/backprop",
    seed: int = 0,
    *,
    lr: float = 3e-4,
    num_steps: int = 10,
    k: int = 10,
    batch_size: int = 8,
    guidance_scale: float | None = None,
    mode: str = "draft_k",
    refl_step_range: tuple[int, int] | None = None,
    gradient_checkpointing: bool = True,
    reward: str = "shapes_clip",
    backprop_options: dict[str, Any] | None = None,
    real_captions: Literal["train", "aligned"] = "train",
    real_images_per_prompt: int | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Reward backprop (DRaFT-K) of the shapes CLIP score; the demo's verifier measurements before and after.

    ``mode="direct_align"`` runs Direct-Align (plain, without SRPO's control words, which mean nothing to the shapes
    CLIP: :data:`DIRECT_ALIGN_OPTIONS`); ``mode="image_refl"`` runs ImageReFL on real pairs rendered by the shapes
    renderer (:func:`render_real_pairs`; :data:`IMAGE_REFL_OPTIONS`) of other captions than the aligned prompts, as
    ImageReFL trains on COCO captions and evaluates on HPDv2 prompts. ``backprop_options`` overrides any
    ``backprop`` key.

    Args:
        minutes: the training budget (evaluation not counted); ``None``: ``max_steps`` optimizer steps.
        output: run folder (``metrics.json``, ``lora/``, ``config.yaml``, ``metrics.jsonl``).
        seed: seed of training (prompt draws, noises).
        lr: AdamW learning rate of the LoRA.
        num_steps: ODE steps of the training trajectories.
        k: the last ``k`` steps keep their graph (``k = num_steps``: full DRaFT).
        batch_size: images per optimizer step.
        guidance_scale: CFG while training (default: the evaluation protocol's).
        mode: ``draft_k`` or another :class:`~diffalign.trainers.reward_backprop.BackpropConfig` mode.
        refl_step_range: ``mode="refl"`` / ``"image_refl"``: the inclusive range of the one step with grad (null: the
            last quarter; ``image_refl``: :data:`IMAGE_REFL_OPTIONS`).
        gradient_checkpointing: recompute each grad step's activations in backward (less memory, slower).
        reward: the differentiable reward (default ``"shapes_clip"``).
        backprop_options: more ``backprop`` keys, over the mode's defaults.
        real_captions: ``image_refl``: the captions of the real pairs: ``"train"``, the base model's training
            captions (:func:`~diffalign.shapes.scenes.train_prompts`, none of them aligned or unseen); ``"aligned"``,
            the aligned prompts themselves (a control: the diffusion loss is then supervised training on correct
            scenes of the evaluated prompts).
        real_images_per_prompt: ``image_refl``: rendered real scenes per caption (default 2 for ``"train"``'s 514
            captions, 16 for ``"aligned"``'s 8).
        **settings: the settings every runner takes, see :class:`LearnSettings` (``model``, ``prompts``,
            ``unseen_prompts``, ``eval_seeds``, ``unseen_seeds``, ``max_steps``, ``lora_rank``, ``ema_decay``,
            ``eval_every``).

    Returns:
        The metrics written to ``<output>/metrics.json``.
    """
    from diffalign.trainers.reward_backprop import RewardBackpropConfig, RewardBackpropTrainer

    bench = _Bench(BENCH_NAMES.get(mode, "backprop"), minutes, output, seed, LearnSettings(**settings))
    before = bench.evaluate(bench.load_base())
    guidance = bench.protocol["guidance_scale"] if guidance_scale is None else guidance_scale
    raw = bench.config(minutes, lr)
    backprop = {"mode": mode, "k": min(k, num_steps), "loss": "negative", "refl_step_range": refl_step_range}
    backprop.update(MODE_OPTIONS.get(mode, {}))
    if refl_step_range is not None:
        backprop["refl_step_range"] = refl_step_range
    backprop.update(backprop_options or {})
    sampling = {
        "prompts": bench.prompts,
        "num_steps": num_steps,
        "guidance_scale": guidance,
        "eta": 0.0,  # the Euler ODE, as the evaluation samples
        "batch_size": batch_size,
        "resolution": bench.protocol["resolution"],
    }
    if mode == "image_refl":
        sampling["real_images"] = str(
            _real_pairs(bench.prompts, real_captions, real_images_per_prompt, bench.output / "real_images", seed)
        )
    raw.update(
        method="reward_backprop",
        reward=reward,
        gradient_checkpointing=gradient_checkpointing,
        sampling=sampling,
        backprop=backprop,
    )
    trainer = RewardBackpropTrainer(load_config(RewardBackpropConfig, raw))
    return bench.run(
        trainer,
        before,
        train={
            "reward": reward,
            "mode": mode,
            "refl_step_range": backprop["refl_step_range"],
            "backprop_options": {key: v for key, v in backprop.items() if key not in ("mode", "k", "refl_step_range")},
            "num_steps": num_steps,
            "k": min(k, num_steps),
            "lr": lr,
            "lora_rank": bench.settings.lora_rank,
            "batch_size": batch_size,
            "guidance_scale": guidance,
            "gradient_checkpointing": gradient_checkpointing,
            "ema_decay": bench.settings.ema_decay,
            **({"real_captions": real_captions} if mode == "image_refl" else {}),
        },
    )


def _real_pairs(aligned: list[str], captions: str, per_prompt: int | None, folder: Path, seed: int) -> Path:
    """ImageReFL's real pairs on the shapes world: scenes of the training captions or of the aligned prompts."""
    if captions not in ("train", "aligned"):
        raise ValueError(f"real_captions must be 'train' or 'aligned', got {captions!r}")
    from diffalign.shapes.scenes import train_prompts

    prompts = train_prompts() if captions == "train" else aligned
    per_prompt = per_prompt or (2 if captions == "train" else 16)
    return render_real_pairs(prompts, per_prompt, folder, seed=seed)


DIRECT_ALIGN_OPTIONS: dict[str, Any] = {"srp": False, "direct_align_inversion": False}
"""Direct-Align on the shapes world: plain (no SRP; the inversion branch needs it), SRPO's grid and offset."""

IMAGE_REFL_OPTIONS: dict[str, Any] = {
    "refl_step_range": (2, 9),
    "image_refl_start": 2,
    "image_refl_mse_weight": 10.0,
    "image_refl_plain_every": 2,
}
"""ImageReFL on the shapes world (10 steps): the real scene noised to step 2 and ``mid`` in 2..9, where the
published 30 of 40 would leave only the last quarter, past the layout; the diffusion loss weighted 10 (the shapes
CLIP's scores are ~300 times HPS's, so the published 0.01 would leave it negligible); every second micro-batch a
plain ReFL one on the aligned prompts (ImageReFL's ``state_del`` option). The real pairs are scenes of other
captions (:func:`learn_backprop`'s ``real_captions``); without the plain micro-batches nothing trains on the aligned
prompts, and 600 steps gave +0.008 (benchmarks/RESULTS.md)."""

MODE_OPTIONS: dict[str, dict[str, Any]] = {"direct_align": DIRECT_ALIGN_OPTIONS, "image_refl": IMAGE_REFL_OPTIONS}
BENCH_NAMES = {"refl": "refl", "direct_align": "direct_align", "image_refl": "image_refl"}
"""The ``method`` recorded in ``metrics.json`` per mode (the other modes record ``backprop``)."""


def render_real_pairs(
    prompts: Sequence[str], per_prompt: int, folder: str | Path, seed: int = 0, size: int = 32
) -> Path:
    """Render ``per_prompt`` scenes of each caption with the shapes renderer as ImageReFL's real image-caption
    pairs: PNGs and a ``pairs.jsonl`` of ``{"prompt", "image"}`` records in ``folder``; returns the JSONL path."""
    from PIL import Image

    from diffalign.shapes.scenes import render, sample_scene

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for p, prompt in enumerate(prompts):
        for i in range(per_prompt):
            scene, _ = sample_scene(prompt, rng)
            pixels = (render(scene, size).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            name = f"{p:03d}_{i:03d}.png"
            Image.fromarray(pixels).save(folder / name)
            records.append({"prompt": prompt, "image": name})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


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
    if "curve" in metrics:
        points = ", ".join(f"{p['strict_accuracy']:.3f}@{p['step']}" for p in metrics["curve"])
        seeds = " (validation seeds)" if evaluation.get("curve_seeds") != evaluation.get("seeds") else ""
        lines.append(f"  held-out strict accuracy during training{seeds} (value@step): {points}")
    if "early_stopping" in train:
        stopping = train["early_stopping"]
        lines.append(
            f"  early stopping (patience {stopping['patience']}): ends with the weights of step "
            f"{stopping['best_step']}"
        )
    if output is not None:
        lines.append(f"  outputs in {output}: metrics.json, lora/")
    return "\n".join(lines)
