"""Flow-GRPO learns on the shapes world: a short run of the demo's recipe on one held-out composition.

The shipped base model and the demo's recipe (:func:`diffalign.shapes.demo.demo_config`: one initial noise per
group, LoRA r16 at lr 3e-4, KL 0.04, the LoRA acting on the window's timesteps only) on ``PROMPTS``, one of the
demo's aligned held-out compositions (a relation: the base model places its two objects at random, right in 0.44
of images), for ``EPOCHS`` epochs of 4 groups of 8 images (~110 s on one CPU thread). The SDE (and so the LoRA) is
on the first step only (``SAMPLING``): that is where the layout is decided and where the policy gradient shows
fastest; the demo trains the first two steps, which holds up over hundreds of epochs but is slower to start.
The verifier is measured before and after at ``EVAL_SEEDS``, which training never draws, one ODE image per seed,
so that every image is paired with itself before training (:func:`diffalign.shapes.learn.grpo_prompt_gains`).

The margin, measured with these settings by ``python benchmarks/shapes_grpo_margin.py`` (32 paired images; seeds
derived by :func:`diffalign.seeding.derive_seed`, 2026-12-06, benchmarks/RESULTS.md):

- real advantages, training seeds 0-3: strict accuracy +0.312, +0.250, +0.375, +0.375 (mean reward +0.099,
  +0.083, +0.125, +0.125, each more than 3.2 standard errors of the paired differences);
- shuffled advantages (the same samples and update sizes, the credit assignment destroyed), seeds 0-3: strict
  +0.000 each.

So the test asserts a strict-accuracy gain of more than ``MARGIN`` = 0.15 (above every control by 0.15, below
every real gain by 0.10) and a rise of the mean reward by more than two standard errors of the paired differences.
"""

import pytest
import torch

from diffalign.shapes.learn import grpo_prompt_gains


pytestmark = pytest.mark.slow  # a learning run

PROMPTS = ["a yellow circle to the right of a blue circle"]
EPOCHS = 40
SAMPLING = {"window_size": 1, "window_range": [0, 1]}
EVAL_SEEDS = tuple(range(90_001, 90_033))
MARGIN = 0.15


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the fastest setting for this tiny model on a shared CPU
    yield
    torch.set_num_threads(previous)


def test_flow_grpo_raises_the_verifier_reward_on_held_out_compositions(tmp_path, one_thread):
    scores = grpo_prompt_gains(PROMPTS, EPOCHS, tmp_path, seed=0, eval_seeds=EVAL_SEEDS, sampling=SAMPLING)
    strict_gain = (scores["strict_after"] - scores["strict_before"]).mean()
    reward_gain = scores["reward_after"] - scores["reward_before"]
    standard_error = reward_gain.std() / len(reward_gain) ** 0.5
    summary = (
        f"strict {scores['strict_before'].mean():.3f} -> {scores['strict_after'].mean():.3f}, reward "
        f"{scores['reward_before'].mean():.3f} -> {scores['reward_after'].mean():.3f} (s.e. {standard_error:.3f})"
    )
    assert strict_gain > MARGIN, summary
    assert reward_gain.mean() > 2 * standard_error, summary
