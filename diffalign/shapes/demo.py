"""``diffalign demo``: align the shipped shapes model with Flow-GRPO on the verifier reward, on a CPU, in minutes.

What it does:

1. loads the tiny SD3-style text-to-image model shipped in ``diffalign/shapes/assets/base_model``;
2. draws two disjoint sets of held-out compositional prompts (compositions the base model never saw):
   the *aligned* prompts, which Flow-GRPO trains on, and the *unseen* prompts, which nothing trains on;
3. measures both with the verifier (mean reward and strict all-correct accuracy) from ODE samples at evaluation
   seeds that training never draws (the protocol stored beside the weights in ``diffalign_eval.json``);
4. trains a LoRA with Flow-GRPO for ``--minutes`` of wall-clock time on the aligned prompts;
5. measures again and writes ``<output>/``: ``before_after.png`` (rows = aligned prompts, columns = seeds
   before | after, captioned with the verifier score), ``reward_curve.png``, ``metrics.json`` (``before``/``after``/
   ``gain`` on the aligned prompts, the same under ``unseen``), the LoRA (``lora/``, loadable with
   ``pipe.load_lora_weights``; it acts on the first timesteps only, see below), the run's ``config.yaml``,
   ``metrics.jsonl`` and checkpoints.

The recipe (:func:`demo_config`), and what it rests on (measured on this model, 1 CPU thread unless said):

- *One initial noise per group* (DanceGRPO, Flow-GRPO's ``same_latent``) with the SDE at the start only: the
  layout is decided in the first steps, and every difference within a group then comes from the SDE noise there,
  so the advantages credit the right transitions. Cosine between the policy gradients of two halves of one epoch:
  0.19, against ~0.0 (-0.06..0.02) with independent initial noises and a 1-3 step window in the first six steps.
- *The SDE window is the first two steps*, not the first one. Trained on the first step alone, the LoRA learns
  there but drifts at the untrained steps right after it (t = 0.6-0.9), which share its weights: a 10-minute run
  scored strict 0.39 -> 0.63 with its LoRA applied at t >= 0.925 only, 0.36 with it everywhere, and its training
  reward fell. On the 8 demo prompts, 12-minute runs: window of one step 0.43 -> 0.50, two steps 0.43 -> 0.62,
  three 0.43 -> 0.55. A velocity anchor to the reference at the untrained steps instead (DPOK's trajectory KL,
  sampled) held the model at the base: no change in 100 epochs at weights 1 and 10.
- *The LoRA acts on the window's timesteps only* (``sampling.lora_in_window_only``): the ODE steps after the
  window (timesteps <= 778 of 1000) run the base model, in rollouts and at evaluation, so the trained weights never
  act where GRPO cannot credit them. Same seed and prompts, 1 thread, aligned strict after 200 / 400 epochs: 0.570 /
  0.688 with the LoRA everywhere (0.688 after 600 too, "a red circle and a yellow triangle" down from 0.625 to
  0.375), 0.625 / 0.727 with it limited to the window (that prompt at 0.625). The saved LoRA records the limit in
  ``lora/diffalign_lora.json``; in diffusers, load it with ``pipe.load_lora_weights`` and call
  ``pipe.disable_lora()`` from a ``callback_on_step_end`` once the next timestep is at or below it.
- *Few prompts*: a prompt needs ~100-300 groups of 8 images to be learnt (a single relation prompt: strict
  0.44 -> 0.66 -> 0.91 -> 1.0 after 80, 160, 320 groups); 32 prompts did not move in 15 minutes. Hence 8 prompts
  by default (``--prompts``), and an unseen set that measures what carries over to compositions not trained on.
- *Past 15 minutes, the lr decays linearly to 0 at the end of the budget* (``optim.lr_horizon: max_minutes``). At a
  constant lr the aligned prompts peak after 400-600 epochs and then trade places: same seed and prompts, 1 thread,
  aligned strict after 200 / 400 / 600 / 800 / 870 epochs, constant 0.617 / 0.727 / 0.719 / 0.656 / 0.648 ("two yellow
  circles" 0.69 -> 0.31 -> 0.50 and "a red circle and a yellow triangle" 0.69 -> 0.38 over the last three),
  linear decay to 0 at epoch 870: 0.531 / 0.648 / 0.672 / 0.695 / 0.711. An EMA of the LoRA (decay 0.995 after
  diffusers' warm-up) changed no image's verdict before epoch 870 and ended at 0.633 against 0.648. A 10-minute
  budget ends before the peak, and decaying over it only slows learning: 257 epochs, 0.430 -> 0.492, against
  0.641 at a constant lr; hence the decay from :data:`DECAY_FROM_MINUTES` on.
- LoRA r16 at Flow-GRPO's lr 3e-4 with its GenEval KL coefficient 0.04. lr 1e-3, two inner epochs per batch, or
  8-16 groups per optimizer step at lr 1e-3 all collapsed the reward within 150-250 epochs; full fine-tuning at
  lr 1e-4 lowered it.

Measured with the defaults (``diffalign demo``, 2 threads), with the training draws of
``diffalign.seeding.derive_seed`` (2026-12-06): 273 epochs in 10.6 minutes; aligned prompts (8 x 16 fresh seeds) strict
0.430 -> 0.602 (+0.172), reward 0.772 -> 0.835; unseen prompts (32 x 4) strict 0.336 -> 0.375, reward 0.665 -> 0.694;
``--seed 1``: 314 epochs, aligned strict 0.430 -> 0.625 (+0.195), reward 0.772 -> 0.843, unseen strict 0.336 -> 0.359.
With the earlier per-trainer seed formulas (bit-identical code otherwise) the default run had drawn 269 epochs and
aligned strict 0.430 -> 0.641 (+0.211), reward 0.772 -> 0.846, unseen strict 0.336 -> 0.422, and an intermediate stream
+0.101 / +0.133 (seeds 0 / 1): a 10-minute run's gain varies by about 0.1 with the random stream. With ``--minutes 30``
(lr decayed over the budget, earlier seed formulas): 690 epochs (the machine was busier for part of the run); aligned
strict 0.430 -> 0.695 (+0.266), reward 0.772 -> 0.876; unseen strict 0.336 -> 0.391, reward 0.665 -> 0.701. At a
constant lr the 30-minute run had ended at 0.656 (+0.227, 868 epochs); before the LoRA was limited to the window: 0.594
after 10 minutes, 0.641 after 30 (the paired standard error of a gain is ~0.04). On the constant-lr runs' grids "a blue
circle and a green square" gets one of its two objects right at best (the base model swaps its colours at every seed),
"a red circle and a yellow triangle" swaps colours in half of the images, and "a blue triangle and a green triangle"
sometimes draws a third triangle.

Launch: ``diffalign demo [--minutes 10] [--output runs/demo]``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from diffalign.config import load_config
from diffalign.eval.evaluator import Evaluator
from diffalign.eval.grid import image_grid
from diffalign.eval.plot import line_chart
from diffalign.shapes.model import repeated_context_sampling
from diffalign.shapes.scenes import heldout_prompts, parse_caption


logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_MODEL = ASSETS / "base_model"
DEFAULT_PROTOCOL = {"num_steps": 20, "guidance_scale": 4.5, "resolution": 32}


def load_protocol(model: Path) -> dict[str, Any]:
    """The evaluation protocol stored beside the weights (steps, guidance, resolution), with defaults."""
    path = model / "diffalign_eval.json"
    stored = json.loads(path.read_text()).get("protocol", {}) if path.is_file() else {}
    return {**DEFAULT_PROTOCOL, **{k: v for k, v in stored.items() if k in DEFAULT_PROTOCOL}}


def compositional(prompts: list[str]) -> list[str]:
    """Prompts with more than one object or a relation (the part the base model gets wrong)."""
    return [p for p in prompts if parse_caption(p).kind != "single"]


EVAL_SEEDS: tuple[int, ...] = tuple(range(90_001, 90_017))
"""Evaluation seeds: chosen seeds, below :data:`~diffalign.seeding.USER_SEED_LIMIT`, where no training draw goes."""
UNSEEN_SEEDS: tuple[int, ...] = EVAL_SEEDS[:4]
"""Evaluation seeds of the unseen prompts (more prompts, fewer seeds each)."""
GRID_SEEDS = 4
"""Seeds per prompt shown in ``before_after.png`` (before and after each)."""


def demo_prompts(num_aligned: int = 8, num_unseen: int = 32, seed: int = 1234) -> tuple[list[str], list[str]]:
    """Two disjoint seeded draws of held-out compositional prompts: ``(aligned, unseen)``."""
    drawn = random.Random(seed).sample(compositional(heldout_prompts()), num_aligned + num_unseen)
    return drawn[:num_aligned], drawn[num_aligned:]


DECAY_FROM_MINUTES = 15.0
"""Budgets longer than this decay the lr linearly to 0 at their end; shorter ones (and epoch-bound runs) keep it
constant. At a constant lr the aligned prompts peak after 400-600 epochs (~15-20 minutes on 2 cores), so only a
longer run needs the decay; a shorter one ends before the peak and the decay only slows it (module docstring)."""


def _budget_schedule(minutes: float | None) -> dict[str, str]:
    """The lr schedule for a wall-clock budget of ``minutes`` (see :data:`DECAY_FROM_MINUTES`)."""
    return {"lr_scheduler": "linear", "lr_horizon": "max_minutes"} if (minutes or 0) > DECAY_FROM_MINUTES else {}


def demo_config(
    model: Path, output: Path, minutes: float | None, seed: int, prompts: list[str], max_steps: int = 10_000
) -> dict[str, Any]:
    """The demo's GRPO config on ``prompts``, a mapping (validated by :class:`~diffalign.trainers.grpo.GRPOConfig`).

    Flow-GRPO with the SDE on the first two of 10 steps and one initial noise per group, LoRA r16 at Flow-GRPO's
    lr 3e-4 with its GenEval KL coefficient 0.04, 4 groups of 8 images per epoch (the module docstring says why).
    A budget of more than :data:`DECAY_FROM_MINUTES` ``minutes`` decays the lr linearly to 0 at its end; a shorter
    one, or none (``None``: an epoch-bound run, ``max_steps`` epochs), keeps it constant.
    """
    protocol = load_protocol(model)
    return {
        "model": {"path": str(model), "lora": {"rank": 16, "alpha": 16}},
        "reward": "shapes",
        "output_dir": str(output),
        "seed": seed,
        "max_steps": max_steps,
        "max_minutes": minutes,
        "logging": {"log_with": "tensorboard"},
        "optim": {"lr": 3e-4, "weight_decay": 1e-4, "max_grad_norm": 1.0, **_budget_schedule(minutes)},
        # A demo run replaces the previous one in its folder (its metrics log, checkpoints and LoRA).
        "checkpoint": {"every": 25, "keep_last": 1, "overwrite": True},
        "sampling": {
            "prompts": list(prompts),
            "num_steps": 10,
            "guidance_scale": protocol["guidance_scale"],
            "noise_level": 0.7,
            "plan": "window",
            "window_size": 2,
            "window_range": [0, 2],
            "lora_in_window_only": True,
            "same_noise_per_prompt": True,
            "images_per_prompt": 8,
            "prompts_per_epoch": 4,
            "batch_size": 32,
            "resolution": protocol["resolution"],
        },
        "train": {"batch_size": 16, "clip_range": 1e-3, "beta": 0.04, "global_std": True},
        "eval": {"every": 0},
    }


def _summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"mean_reward": scores["reward"].mean().item(), "strict_accuracy": scores["strict"].mean().item()}


def _train_records(output: Path) -> list[dict[str, Any]]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, filter(None, lines)) if "reward_mean" in record]


def _write_outputs(output: Path, evaluator: Evaluator, before, after, metrics: dict[str, Any]) -> None:
    (images_b, scores_b), (images_a, scores_a) = before, after
    seeds = len(evaluator.seeds)
    shown = min(seeds, GRID_SEEDS)
    rows = min(len(evaluator.prompts), 12)
    cells, captions = [], []
    for row in range(rows):
        part = slice(row * seeds, row * seeds + shown)
        cells += [images_b[part], images_a[part]]
        captions += [f"{v:.2f}" for v in scores_b["reward"][part].tolist()]
        captions += [f"{v:.2f}" for v in scores_a["reward"][part].tolist()]
    labels = [f"s{seed}" for seed in evaluator.seeds[:shown]]
    column_labels = [f"before {label}" for label in labels] + [f"after {label}" for label in labels]
    grid = image_grid(
        torch.cat(cells),
        2 * shown,
        captions=captions,
        row_labels=evaluator.prompts[:rows],
        column_labels=column_labels,
        cell_size=96,
    )
    grid.save(output / "before_after.png")
    records = _train_records(output)
    curve = {"train reward (mean)": ([r["step"] for r in records], [r["reward_mean"] for r in records])}
    line_chart(curve, title="Flow-GRPO on the shapes verifier", x_label="epoch").save(output / "reward_curve.png")
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))


def run_demo(
    minutes: float | None = 10.0,
    output: str | Path = "runs/demo",
    model: str | Path | None = None,
    seed: int = 0,
    num_prompts: int = 8,
    num_unseen: int = 32,
    eval_seeds: tuple[int, ...] = EVAL_SEEDS,
    unseen_seeds: tuple[int, ...] = UNSEEN_SEEDS,
    max_steps: int = 10_000,
    sampling: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    eval_every: int = 0,
    method: str = "grpo",
) -> dict[str, Any]:
    """Run the demo and return its metrics (also written to ``<output>/metrics.json``).

    Args:
        minutes: wall-clock budget of training (evaluation not counted); ``None``: ``max_steps`` epochs (one
            optimizer step each), the same work on any machine.
        output: run folder.
        model: base model folder (default: the shipped one).
        seed: training seed.
        num_prompts: held-out prompts to align (each needs ~100-300 groups of 8 images to be learnt).
        num_unseen: held-out prompts nothing trains on (the transfer measurement).
        eval_seeds: one ODE image per aligned prompt and seed, before and after.
        unseen_seeds: the same for the unseen prompts.
        max_steps: epochs at most: the budget when ``minutes`` is None, else a cap.
        sampling: keys of the recipe's ``sampling`` group to replace (another GRPO variant on the same budget, e.g.
            ``{"plan": "tree", ...}``; :data:`diffalign.bench.GRPO_VARIANTS`).
        train: keys of the recipe's ``train`` group to replace.
        eval_every: also measure the aligned prompts at ``eval_seeds`` every this many epochs (the held-out curve,
            ``curve`` in ``metrics.json``); 0 = only before and after.
        method: the name recorded as ``method`` in the metrics (``diffalign bench learn``'s GRPO variant).
    """
    from diffalign.shapes.learn import train_counting_rows
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    model = Path(model) if model is not None else BASE_MODEL
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no shapes base model at {model}: reinstall diffalign, or train one with "
            "python scripts/shapes/train_base.py --out diffalign/shapes/assets/base_model"
        )
    output = Path(output)
    aligned, unseen = demo_prompts(num_prompts, num_unseen)
    raw = demo_config(model, output, minutes, seed, aligned, max_steps)
    raw["sampling"].update(sampling or {})
    raw["train"].update(train or {})
    protocol = load_protocol(model)
    if eval_every:
        raw["eval"] = {
            "every": eval_every,
            "prompts": aligned,
            "seeds": list(eval_seeds),
            "num_steps": protocol["num_steps"],
            "guidance_scale": protocol["guidance_scale"],
            "batch_size": 64,
        }
    config = load_config(GRPOConfig, raw)
    (output / "metrics.json").unlink(missing_ok=True)  # the previous demo's summary (overwrite clears the rest)
    trainer = GRPOTrainer(config)

    def evaluator(prompts: list[str], seeds: tuple[int, ...]) -> Evaluator:
        steps, guidance = protocol["num_steps"], protocol["guidance_scale"]
        return Evaluator(trainer.adapter, trainer.reward, prompts, list(seeds), steps, guidance, batch_size=64)

    evaluators = {"aligned": evaluator(aligned, eval_seeds), "unseen": evaluator(unseen, unseen_seeds)}
    started = time.monotonic()
    # The shipped model's T5 slot outputs zeros: attend to one zero token standing for all of them (exact, and
    # several times cheaper than 256 copies). Sampling, re-scoring and evaluation all run inside it.
    with repeated_context_sampling(trainer.adapter):
        before = {name: e.score() for name, e in evaluators.items()}
        rows = train_counting_rows(trainer)
        context = trainer.run.ema.swapped_in() if trainer.run.ema is not None else torch.no_grad()
        with context:
            after = {name: e.score() for name, e in evaluators.items()}
    results = {name: compare(_summary(before[name][1]), _summary(after[name][1])) for name in evaluators}
    epochs = len(_train_records(output))
    metrics = {
        "method": method,
        **results["aligned"],
        "unseen": results["unseen"],
        "epochs": epochs,
        **_timing(output),
        "denoiser_rows_per_epoch": rows / max(epochs, 1),
        "minutes": (time.monotonic() - started) / 60,
        "eval": {
            "prompts": len(aligned),
            "seeds": list(eval_seeds),
            "unseen_prompts": len(unseen),
            "unseen_seeds": list(unseen_seeds),
            **protocol,
            "split": "held-out compositions; 'unseen': held-out prompts not trained on",
        },
    }
    _write_outputs(output, evaluators["aligned"], before["aligned"], after["aligned"], metrics)
    return metrics


def _timing(output: Path) -> dict[str, Any]:
    """Median seconds per epoch and rollout denoiser calls per epoch (when logged), and the held-out curve."""
    from diffalign.shapes.learn import heldout_curve

    records = _train_records(output)
    seconds = sorted(r["time/epoch_s"] for r in records if "time/epoch_s" in r)
    calls = [r["rollout_denoiser_calls"] for r in records if "rollout_denoiser_calls" in r]
    timing: dict[str, Any] = {"seconds_per_epoch": seconds[len(seconds) // 2] if seconds else None}
    if calls:
        timing["rollout_denoiser_calls_per_epoch"] = calls[0]
    curve = heldout_curve(output / "metrics.jsonl")
    if curve:
        timing["curve"] = curve
    return timing


def compare(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"before", "after", "gain"}`` of two summaries (``mean_reward``, ``strict_accuracy``)."""
    return {"before": before, "after": after, "gain": {key: after[key] - before[key] for key in before}}


def format_summary(metrics: dict[str, Any], output: str | Path) -> str:
    before, after, unseen = metrics["before"], metrics["after"], metrics["unseen"]
    return "\n".join(
        [
            f"shapes demo: {metrics['epochs']} GRPO epochs in {metrics['minutes']:.1f} min "
            f"(held-out compositions trained on, at fresh seeds: {metrics['eval']['prompts']} prompts x "
            f"{len(metrics['eval']['seeds'])} seeds)",
            f"  strict accuracy  {before['strict_accuracy']:.3f} -> {after['strict_accuracy']:.3f}",
            f"  mean reward      {before['mean_reward']:.3f} -> {after['mean_reward']:.3f}",
            f"  held-out prompts not trained on: strict {unseen['before']['strict_accuracy']:.3f} -> "
            f"{unseen['after']['strict_accuracy']:.3f}, reward {unseen['before']['mean_reward']:.3f} -> "
            f"{unseen['after']['mean_reward']:.3f}",
            f"  outputs in {output}: before_after.png, reward_curve.png, metrics.json, lora/",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``diffalign demo``."""
    import argparse

    parser = argparse.ArgumentParser(prog="diffalign demo", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget (default 10)")
    parser.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--model", default=None, help="base model folder (default: the shipped shapes model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompts", type=int, default=8, help="held-out prompts to align (default 8; more need more --minutes)"
    )
    args = parser.parse_args(argv)
    if args.prompts < 1:
        parser.error(f"--prompts must be >= 1, got {args.prompts}")
    metrics = run_demo(
        minutes=args.minutes, output=args.output, model=args.model, seed=args.seed, num_prompts=args.prompts
    )
    print(format_summary(metrics, args.output))  # noqa: T201
    return 0
