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


def test_score_with_parts_in_batches_gives_every_part_of_the_one_call():
    weighted = build_reward({"diffalign.testing:redness": 1.0, "jpeg_compressibility": 0.5})
    calls = []
    real = weighted.score_parts
    weighted.score_parts = lambda images, prompts, **kw: calls.append(len(prompts)) or real(images, prompts, **kw)
    whole = score_with_parts(weighted, IMAGES, PROMPTS)
    batched = score_with_parts(weighted, IMAGES, PROMPTS, batch_size=2)
    assert calls == [3, 2, 1]  # one call, then batches of at most 2
    assert set(batched) == set(whole)
    for name in whole:
        torch.testing.assert_close(batched[name], whole[name])


def test_score_parts_checks_inputs_like_score():
    reward = build_reward(redness)
    with pytest.raises(rewards.RewardInputError):
        reward.score_parts(IMAGES[:, :2], PROMPTS)


@pytest.mark.slow  # over 3 s: the fast suite must stay under 4 minutes on 2 cores
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


# --- reward terms from a config value --------------------------------------------------------------------------------


def test_build_reward_from_term_mappings_scales_shifts_and_weights():
    weighted = build_reward(
        {"diffalign.testing:redness": {"weight": 2.0, "scale": 0.5, "shift": 0.1}, "jpeg_compressibility": 0.001}
    )
    scores = score_with_parts(weighted, IMAGES, PROMPTS)
    red, jpeg = redness(IMAGES), scores["jpeg_compressibility"]
    torch.testing.assert_close(scores["diffalign.testing:redness"], red)  # parts stay raw
    torch.testing.assert_close(scores["reward"], 2.0 * 0.5 * (red - 0.1) + 0.001 * jpeg)


def test_a_single_reward_with_options_is_scaled_too():
    scores = score_with_parts(
        build_reward({"diffalign.testing:redness": {"scale": 4.0, "shift": -1.0}}), IMAGES, PROMPTS
    )
    torch.testing.assert_close(scores["reward"], 4.0 * (redness(IMAGES) + 1.0))
    torch.testing.assert_close(scores["diffalign.testing:redness"], redness(IMAGES))


def test_per_reward_path_dtype_and_device_reach_a_model_reward(tmp_path):
    reward = build_reward(
        {"pickscore": {"scale": 0.038461538461538464, "path": str(tmp_path), "dtype": "bf16", "device": "cpu"}},
        device="meta",  # the trainer's device: the term's own wins
    )
    pick = reward.rewards["pickscore"]
    assert (pick.path, pick.dtype, pick.device) == (str(tmp_path), torch.bfloat16, torch.device("cpu"))
    assert reward.terms["pickscore"].scale == 1 / 26


def test_a_bad_term_names_its_key():
    with pytest.raises(rewards.RewardSpecError, match=r"^pickscore\.pth: .*Did you mean 'path'\?"):
        build_reward({"pickscore": {"pth": "/m"}})


# --- per-prompt metadata through training and evaluation -------------------------------------------------------------

METADATA_REWARD = '''
import torch

from diffalign.testing import redness

CALLS = []


def signed_redness(images, prompts, metadata):
    """Redness times each prompt record's ``sign``; records what it was given."""
    CALLS.append((list(prompts), [dict(m) for m in metadata]))
    return redness(images) * torch.tensor([float(m["sign"]) for m in metadata], device=images.device)


signed_redness.differentiable = True
'''

RECORDS = [
    {"prompt": "a red circle", "sign": 1, "tag": "colour"},
    {"prompt": "a blue square", "sign": -1, "tag": "shape"},
]


@pytest.fixture
def jsonl_backprop(tiny_pipeline_dir, tmp_path):
    """``make(reward, **overrides) -> RewardBackpropTrainer`` on a tiny SD1.5, with JSONL training and eval prompts."""
    from diffalign.config import load_config
    from diffalign.trainers.reward_backprop import RewardBackpropConfig, RewardBackpropTrainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "metadata_reward.py").write_text(METADATA_REWARD)

    def make(reward, **backprop):
        raw = {
            "model": {"path": str(tiny_pipeline_dir("sd15")), "lora": {"rank": 4}},
            "reward": reward,
            "output_dir": str(tmp_path / "run"),
            "logging": {"log_with": "none"},
            "checkpoint": {"every": 0},
            "eval": {"every": 1, "prompts": str(prompts), "seeds": [0, 1], "num_steps": 2},
            "sampling": {"prompts": str(prompts), "num_steps": 3, "batch_size": 4, "resolution": 16},
            "backprop": {"mode": "draft_k", "k": 1, **backprop},
        }
        return RewardBackpropTrainer(load_config(RewardBackpropConfig, raw))

    return make, tmp_path / "metadata_reward.py"


@pytest.mark.parametrize("mode", ["draft_k", "draft_lv"])
def test_a_metadata_reward_gets_each_images_jsonl_record_in_training_and_evaluation(jsonl_backprop, mode):
    make, reward_file = jsonl_backprop
    spec = f"{reward_file}:signed_redness"
    trainer = make({spec: {"weight": 2.0}, "diffalign.testing:redness": 0.5}, mode=mode)
    calls = trainer.reward.rewards[spec].fn.__globals__["CALLS"]
    loss, _ = trainer.micro_batch_loss(step=0, micro=0)
    assert torch.isfinite(loss)
    (prompts, metadata), *_ = calls
    assert len(prompts) == 4 * (2 if mode == "draft_lv" else 1)  # DRaFT-LV scores n re-noised copies
    assert [m["prompt"] for m in metadata] == prompts  # aligned with the images
    assert all(m == next(r for r in RECORDS if r["prompt"] == m["prompt"]) for m in metadata)
    assert prompts == trainer.micro_batch_prompts(0, 0)[0] * (2 if mode == "draft_lv" else 1)

    calls.clear()
    images, scores = trainer.evaluator.score()
    (prompts, metadata), *_ = calls
    assert prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]  # prompt-major, 2 seeds
    assert [m["sign"] for m in metadata] == [1, 1, -1, -1] and metadata[0]["tag"] == "colour"
    signs = torch.tensor([1.0, 1.0, -1.0, -1.0])
    torch.testing.assert_close(scores[spec], redness(images) * signs)
    torch.testing.assert_close(scores["reward"], 2.0 * redness(images) * signs + 0.5 * redness(images))


def test_a_reward_without_metadata_trains_and_evaluates_on_jsonl_prompts(jsonl_backprop):
    make, _ = jsonl_backprop
    trainer = make("diffalign.testing:redness")
    assert trainer.prompts == ["a red circle", "a blue square"]
    assert trainer.prompt_metadata == RECORDS
    metrics = trainer.train_step(0)
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    images, scores = trainer.evaluator.score()
    torch.testing.assert_close(scores["reward"], redness(images))
