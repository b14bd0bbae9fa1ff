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
   ``pipe.load_lora_weights``), the run's ``config.yaml``, ``metrics.jsonl`` and checkpoints.

The recipe (:func:`demo_config`) is chosen for the signal-to-noise ratio of the policy gradient, which is what
limits GRPO at CPU batch sizes. Measured on this model (cosine between the policy gradients of two halves of one
epoch, 8 prompts x 16 images, full weights): ~0.0 (-0.06..0.02) with independent initial noises and a 1-3 step SDE
window anywhere in the first six steps, versus 0.19 when each group shares its initial noise (DanceGRPO) and the
one SDE step is the first: every difference within a group then comes from that one noise draw, so the advantages
credit the right transition. With the former, 2-6 minute runs drifted the reward down; with the latter, 8 trained
prompts (full weights, lr 1e-4, 46 epochs) went from strict 0.30 to 0.59 at fresh seeds. On the demo's 32 prompts a
4-minute run (163 epochs) has not moved them yet (0.519 -> 0.498 reward): more epochs per prompt are needed than a
few CPU minutes give, and compositions not trained on do not improve (``diffalign bench learn --method grpo``).

Launch: ``diffalign demo [--minutes 10] [--output runs/demo]``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from diffalign.config import load_config
from diffalign.eval.grid import image_grid
from diffalign.eval.plot import line_chart
from diffalign.shapes.model import repeated_context_sampling
from diffalign.shapes.scenes import heldout_prompts, parse_caption
from diffalign.trainers.evaluation import Evaluator, score_with_parts


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


EVAL_SEEDS: tuple[int, ...] = (90_001, 90_002)
"""Evaluation seeds: training draws seeds ``epoch * 100_003 + i`` (``i`` < images per epoch), never these."""


def demo_prompts(num_prompts: int = 32, seed: int = 1234) -> tuple[list[str], list[str]]:
    """Two disjoint random sets of ``num_prompts`` held-out compositional prompts: ``(aligned, unseen)``."""
    drawn = random.Random(seed).sample(compositional(heldout_prompts()), 2 * num_prompts)
    return drawn[:num_prompts], drawn[num_prompts:]


def demo_config(model: Path, output: Path, minutes: float, seed: int, prompts: list[str]) -> dict[str, Any]:
    """The demo's GRPO config on ``prompts``, a mapping (validated by :class:`~diffalign.trainers.grpo.GRPOConfig`).

    Flow-GRPO with the SDE on the first of 10 steps only and one initial noise per group (see the module
    docstring for why), LoRA r16 at Flow-GRPO's lr 3e-4 with its GenEval KL coefficient 0.04: without the KL term,
    lr 1e-3 collapsed the reward after ~40 epochs on a quiet CPU (0.50 -> 0.28 by epoch 190).
    """
    protocol = load_protocol(model)
    return {
        "model": {"path": str(model), "lora": {"rank": 16, "alpha": 16}},
        "reward": "shapes",
        "output_dir": str(output),
        "seed": seed,
        "max_steps": 10_000,
        "max_minutes": minutes,
        "logging": {"log_with": "tensorboard"},
        "optim": {"lr": 3e-4, "weight_decay": 1e-4, "max_grad_norm": 1.0},
        "checkpoint": {"every": 25, "keep_last": 1},
        "sampling": {
            "prompts": list(prompts),
            "num_steps": 10,
            "guidance_scale": protocol["guidance_scale"],
            "noise_level": 0.7,
            "plan": "window",
            "window_size": 1,
            "window_range": [0, 1],
            "same_noise_per_prompt": True,
            "images_per_prompt": 8,
            "prompts_per_epoch": 4,
            "batch_size": 32,
            "resolution": protocol["resolution"],
        },
        "train": {"batch_size": 16, "clip_range": 1e-3, "beta": 0.04, "global_std": True},
        "eval": {"every": 0},
    }


def _evaluate(evaluator: Evaluator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = evaluator.sample()
    prompts = [p for p in evaluator.prompts for _ in evaluator.seeds]
    return images, score_with_parts(evaluator.reward, images, prompts)


def _summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"mean_reward": scores["reward"].mean().item(), "strict_accuracy": scores["strict"].mean().item()}


def _train_records(output: Path) -> list[dict[str, Any]]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, filter(None, lines)) if "reward_mean" in record]


def _write_outputs(output: Path, evaluator: Evaluator, before, after, metrics: dict[str, Any]) -> None:
    (images_b, scores_b), (images_a, scores_a) = before, after
    seeds = len(evaluator.seeds)
    rows = min(len(evaluator.prompts), 12)
    cells, captions = [], []
    for row in range(rows):
        part = slice(row * seeds, (row + 1) * seeds)
        cells += [images_b[part], images_a[part]]
        captions += [f"{v:.2f}" for v in scores_b["reward"][part].tolist()]
        captions += [f"{v:.2f}" for v in scores_a["reward"][part].tolist()]
    column_labels = [f"before s{s}" for s in evaluator.seeds] + [f"after s{s}" for s in evaluator.seeds]
    grid = image_grid(
        torch.cat(cells),
        2 * seeds,
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
    minutes: float = 10.0,
    output: str | Path = "runs/demo",
    model: str | Path | None = None,
    seed: int = 0,
    num_eval_prompts: int = 32,
    eval_seeds: tuple[int, ...] = EVAL_SEEDS,
) -> dict[str, Any]:
    """Run the demo and return its metrics (also written to ``<output>/metrics.json``)."""
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    model = Path(model) if model is not None else BASE_MODEL
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no shapes base model at {model}: reinstall diffalign, or train one with "
            "python -m diffalign.shapes.train_base --out diffalign/shapes/assets/base_model"
        )
    output = Path(output)
    _clear_previous_run(output)
    aligned, unseen = demo_prompts(num_eval_prompts)
    config = load_config(GRPOConfig, demo_config(model, output, minutes, seed, aligned))
    trainer = GRPOTrainer(config)
    protocol = load_protocol(model)

    def evaluator(prompts: list[str]) -> Evaluator:
        steps, guidance = protocol["num_steps"], protocol["guidance_scale"]
        return Evaluator(trainer.adapter, trainer.reward, prompts, list(eval_seeds), steps, guidance, batch_size=32)

    evaluators = {"aligned": evaluator(aligned), "unseen": evaluator(unseen)}
    started = time.monotonic()
    # The shipped model's T5 slot outputs zeros: attend to one zero token standing for all of them (exact, and
    # several times cheaper than 256 copies). Sampling, re-scoring and evaluation all run inside it.
    with repeated_context_sampling(trainer.adapter):
        before = {name: _evaluate(e) for name, e in evaluators.items()}
        trainer.train()
        context = trainer.run.ema.swapped_in() if trainer.run.ema is not None else torch.no_grad()
        with context:
            after = {name: _evaluate(e) for name, e in evaluators.items()}
    results = {name: _comparison(before[name][1], after[name][1]) for name in evaluators}
    metrics = {
        **results["aligned"],
        "unseen": results["unseen"],
        "epochs": len(_train_records(output)),
        "minutes": (time.monotonic() - started) / 60,
        "eval": {
            "prompts": len(aligned),
            "seeds": list(eval_seeds),
            **protocol,
            "split": "held-out compositions; 'unseen': held-out prompts not trained on",
        },
    }
    _write_outputs(output, evaluators["aligned"], before["aligned"], after["aligned"], metrics)
    return metrics


def _clear_previous_run(output: Path) -> None:
    """Remove what an earlier demo wrote to ``output``: its metrics log would be appended to (wrong epoch count and
    reward curve) and its checkpoints would block the new run's final save. Nothing else in the folder is touched."""
    leftovers = [output / name for name in ("metrics.jsonl", "checkpoints", "lora", "metrics.json")]
    leftovers = [path for path in leftovers if path.exists()]
    if leftovers:
        logger.info("replacing the previous demo run in %s", output)
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _comparison(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    summary = {"before": _summary(before), "after": _summary(after)}
    summary["gain"] = {key: summary["after"][key] - summary["before"][key] for key in summary["before"]}
    return summary


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
    args = parser.parse_args(argv)
    metrics = run_demo(minutes=args.minutes, output=args.output, model=args.model, seed=args.seed)
    print(format_summary(metrics, args.output))  # noqa: T201
    return 0
