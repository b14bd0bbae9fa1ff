"""RL guidance on the shapes world: the shipped demo LoRA (``diffalign/shapes/assets/demo_lora``, the Flow-GRPO demo
after 560 epochs, scripts/README.md) mixed with the base model at ``w`` (docs/methods/sampling-alignment.md)."""

import pytest

from diffalign.adapters import load_adapter
from diffalign.rewarding import build_reward
from diffalign.shapes.demo import EVAL_SEEDS
from diffalign.shapes.learn import evaluate_heldout
from diffalign.shapes.model import BASE_MODEL_DIR


DEMO_LORA = BASE_MODEL_DIR.parent / "demo_lora"


@pytest.mark.slow  # over 3 s: 5 x 32 shapes images sampled with two models each
def test_the_verifier_reward_rises_with_the_alignment_scale_and_past_1():
    adapter = load_adapter(BASE_MODEL_DIR, height=32, width=32)
    adapter.load_lora(DEMO_LORA)
    verifier = build_reward("shapes")
    rewards = {}
    for scale in (0.0, 0.5, 1.0, 1.5):
        adapter.alignment_scale = scale
        rewards[scale] = evaluate_heldout(adapter, verifier, seeds=EVAL_SEEDS[:4])["mean_reward"]
    adapter.alignment_scale = None
    # Measured (8 aligned prompts x 4 seeds): 0.708, 0.818, 0.841 for w = 0, 0.5, 1, and 0.909 at w = 1.5.
    assert rewards[0.0] < rewards[0.5] < rewards[1.0]
    # Extrapolating past the LoRA strengthens it further here (RL guidance's w > 1).
    assert rewards[1.5] > rewards[1.0]


@pytest.mark.slow  # over 3 s: 8 prompts sampled five times
def test_bench_sampling_alignment_agrees_with_itself_at_the_plain_ends(capsys):
    from diffalign.bench import bench_sampling_alignment

    results = bench_sampling_alignment(scales=(0.0, 1.0), candidates=(1, 2), num_seeds=1)
    best_of_one, base = results["best_of"][0], results["rl_guidance"][0]
    # best-of-1 is plain sampling of the base model, and so is w = 0: the same 8 images
    assert best_of_one["strict_accuracy"] == base["strict_accuracy"]
    assert best_of_one["mean_reward"] == pytest.approx(base["mean_reward"], abs=1e-6)
    assert "best-of-2 by shapes_clip" in capsys.readouterr().out
