"""Calibrate the margin of the CI learning test ``tests/shapes/test_grpo_learns.py``.

Runs the test's setting (:func:`diffalign.shapes.learn.grpo_prompt_gains` on the test's prompts and epochs) with
real advantages and with shuffled advantages (the control: the same samples and update sizes, no credit
assignment) for several training seeds, and prints the paired gains of strict accuracy and mean reward.

    python benchmarks/shapes_grpo_margin.py [--seeds 0 1 2 3] [--advantages real|shuffled|both] [--threads 1]

Each run takes ~2 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from diffalign.shapes.learn import grpo_prompt_gains


TEST_FILE = Path(__file__).resolve().parents[1] / "tests" / "shapes" / "test_grpo_learns.py"


def _test_settings() -> tuple[list[str], int, dict, tuple[int, ...]]:
    """The test's ``PROMPTS``, ``EPOCHS``, ``SAMPLING`` and ``EVAL_SEEDS`` (read from the test module, so that the
    two cannot drift apart)."""
    spec = importlib.util.spec_from_file_location("test_grpo_learns", TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PROMPTS, module.EPOCHS, module.SAMPLING, module.EVAL_SEEDS


def main() -> None:
    prompts, epochs, sampling, eval_seeds = _test_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--advantages", choices=["real", "shuffled", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = {"real": (False,), "shuffled": (True,), "both": (False, True)}[args.advantages]
    for control in modes:
        for seed in args.seeds:
            began = time.monotonic()
            with tempfile.TemporaryDirectory() as folder:
                scores = grpo_prompt_gains(
                    prompts,
                    args.epochs,
                    folder,
                    seed=seed,
                    eval_seeds=eval_seeds,
                    shuffle_advantages=control,
                    sampling=sampling,
                )
            strict = (scores["strict_after"] - scores["strict_before"]).mean().item()
            reward = scores["reward_after"] - scores["reward_before"]
            record = {
                "advantages": "shuffled" if control else "real",
                "seed": seed,
                "strict_before": round(scores["strict_before"].mean().item(), 4),
                "strict_gain": round(strict, 4),
                "reward_before": round(scores["reward_before"].mean().item(), 4),
                "reward_gain": round(reward.mean().item(), 4),
                "reward_gain_se": round((reward.std() / len(reward) ** 0.5).item(), 4),
                "seconds": round(time.monotonic() - began),
            }
            print(json.dumps(record), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
