"""Flow-GRPO learns on the shapes world: a short version of the demo (``diffalign bench learn --method grpo``).

The shipped base model, the demo's recipe (:func:`diffalign.shapes.demo.demo_config`: one initial noise per
group, the SDE on the first of 10 steps, LoRA, KL 0.04) at lr 1e-3, on the first ``len(PROMPTS)`` of the demo's
aligned held-out compositions, for ``EPOCHS`` epochs of 4 prompts x 8 images (~1.8 s each on one CPU thread). The
verifier's mean reward is measured before and after on the same prompts at evaluation seeds training never
draws, one ODE image per prompt and seed, so that every image is paired with itself before training.

The margin, measured with these settings (4 prompts x 16 seeds; base mean reward 0.736, strict 0.344):

- real advantages, training seeds 0 and 1: reward +0.050 and +REAL1 (strict +0.109 and +STRICT1);
- shuffled advantages (the same updates with the credit assignment destroyed), training seeds 0 and 1: -0.010 and
  CTRL1.

So the test asserts a rise of at least ``MARGIN`` = 0.025 (2.5 x the largest control's magnitude, half the smallest
real gain) and, on the paired per-image differences, a rise of at least two standard errors.
"""

import pytest
import torch

from diffalign.config import load_config
from diffalign.shapes.demo import BASE_MODEL, demo_config, demo_prompts, load_protocol
from diffalign.shapes.model import repeated_context_sampling
from diffalign.trainers.evaluation import Evaluator, score_with_parts
from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer


PROMPTS = demo_prompts()[0][:4]
EPOCHS = 40
EVAL_SEEDS = list(range(90_001, 90_017))
MARGIN = 0.025


def _rewards(trainer: GRPOTrainer, evaluator: Evaluator) -> torch.Tensor:
    """The verifier reward of every evaluation image [len(PROMPTS) * len(EVAL_SEEDS)], prompt-major."""
    images = evaluator.sample()
    prompts = [p for p in evaluator.prompts for _ in evaluator.seeds]
    return score_with_parts(trainer.reward, images, prompts)["reward"]


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the fastest setting for this tiny model on a shared CPU
    yield
    torch.set_num_threads(previous)


def test_flow_grpo_raises_the_verifier_reward_on_held_out_compositions(tmp_path, one_thread):
    raw = demo_config(BASE_MODEL, tmp_path, None, 0, PROMPTS)
    raw["max_steps"] = EPOCHS
    raw["optim"]["lr"] = 1e-3
    raw["checkpoint"]["every"] = 0
    trainer = GRPOTrainer(load_config(GRPOConfig, raw))
    protocol = load_protocol(BASE_MODEL)
    evaluator = Evaluator(
        trainer.adapter,
        trainer.reward,
        PROMPTS,
        EVAL_SEEDS,
        protocol["num_steps"],
        protocol["guidance_scale"],
        batch_size=64,
    )
    with repeated_context_sampling(trainer.adapter):
        before = _rewards(trainer, evaluator)
        trainer.train()
        after = _rewards(trainer, evaluator)
    gain = after - before
    standard_error = gain.std() / len(gain) ** 0.5
    summary = f"reward {before.mean():.3f} -> {after.mean():.3f} (+{gain.mean():.3f}, s.e. {standard_error:.3f})"
    assert gain.mean() > MARGIN, summary
    assert gain.mean() > 2 * standard_error, summary
