"""Rewards as diffalign uses them: built from anything a user passes, scored by part, found through entry points."""

import json
import subprocess
import sys

import pytest
import torch

import rewards
from diffalign.rewarding import build_reward, score_with_parts
from diffalign.testing import redness


IMAGES = torch.rand(3, 3, 8, 8)
PROMPTS = ["a red circle"] * 3


def test_build_reward_accepts_names_specs_mappings_objects_and_functions():
    by_spec = build_reward("diffalign.testing:redness")
    by_function = build_reward(redness)
    by_mapping = build_reward({"diffalign.testing:redness": 2.0})
    assert build_reward(by_spec) is by_spec  # a Reward passes through
    expected = redness(IMAGES)
    torch.testing.assert_close(by_spec.score(IMAGES, PROMPTS), expected)
    torch.testing.assert_close(by_function.score(IMAGES, PROMPTS), expected)
    torch.testing.assert_close(by_mapping.score(IMAGES, PROMPTS), 2 * expected)
    assert build_reward("jpeg_compressibility").name == "jpeg_compressibility"


def test_a_plain_reward_reports_itself_as_its_only_part():
    reward = build_reward(redness)
    total, parts = reward.score_parts(IMAGES, PROMPTS)
    assert list(parts) == [reward.name]
    torch.testing.assert_close(parts[reward.name], total)
    scores = score_with_parts(reward, IMAGES, PROMPTS)
    assert list(scores) == ["reward"]  # the part that repeats the total is not listed twice


def test_score_with_parts_lists_a_weighted_sums_terms_and_a_verifiers_strict_flag():
    weighted = build_reward({"diffalign.testing:redness": 1.0, "jpeg_compressibility": 0.5})
    scores = score_with_parts(weighted, IMAGES, PROMPTS)
    assert set(scores) == {"reward", "diffalign.testing:redness", "jpeg_compressibility"}
    torch.testing.assert_close(
        scores["reward"], scores["diffalign.testing:redness"] + 0.5 * scores["jpeg_compressibility"]
    )
    verifier = build_reward("shapes")
    scores = score_with_parts(verifier, IMAGES, ["a red circle"] * 3)
    assert set(scores) == {"reward", "strict"}
    _, strict = verifier.evaluate(IMAGES, ["a red circle"] * 3)
    torch.testing.assert_close(scores["strict"], strict.float())
    assert all(value.dtype == torch.float32 and value.device.type == "cpu" for value in scores.values())


def test_score_parts_checks_inputs_like_score():
    reward = build_reward(redness)
    with pytest.raises(rewards.RewardInputError):
        reward.score_parts(IMAGES[:, :2], PROMPTS)


def test_shapes_rewards_come_from_entry_points_without_importing_the_shapes_world_first():
    """A fresh interpreter: the runtime (trainers, evaluation) imports no shapes module; loading "shapes" does."""
    probe = (
        "import json, sys\n"
        "import rewards, diffalign.trainers.grpo, diffalign.trainers.diffusion_dpo, diffalign.eval.evaluator\n"
        "before = sorted(m for m in sys.modules if m.startswith('diffalign.shapes'))\n"
        "names = rewards.available()\n"
        "reward = rewards.load('shapes')\n"
        "print(json.dumps({'before': before, 'names': names, 'type': type(reward).__module__,\n"
        "                  'after': 'diffalign.shapes.reward' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["before"] == []
    assert {"shapes", "shapes_clip"} <= set(found["names"])
    assert found["type"] == "diffalign.shapes.reward" and found["after"]


def test_a_decorator_registration_shadows_an_entry_point_even_after_it_was_loaded():
    name = "shapes_clip"
    assert type(rewards.load(name)).__name__ == "CLIPScore"  # the entry point, imported now

    @rewards.register(name)
    def mine(device=None, dtype=None):
        return rewards.load(redness)

    try:
        assert rewards.load(name).score(IMAGES, PROMPTS).allclose(redness(IMAGES))
    finally:
        rewards.unregister(name)
    assert type(rewards.load(name)).__name__ == "CLIPScore"  # the entry point is back
    with pytest.raises(KeyError, match="installed package's entry point"):
        rewards.unregister(name)
    assert name in rewards.available()


def test_a_part_named_reward_does_not_overwrite_the_total():
    class Named(rewards.Reward):  # keeps the base class's name, "reward"
        def _score(self, images, prompts):
            return torch.full((images.shape[0],), 5.0)

    weighted = build_reward({Named(): 1.0, "diffalign.testing:redness": 0.5})
    scores = score_with_parts(weighted, IMAGES, PROMPTS)
    torch.testing.assert_close(scores["reward"], 5.0 + 0.5 * redness(IMAGES))
    torch.testing.assert_close(scores["reward_part"], torch.full((3,), 5.0))
