"""Group-relative and per-prompt advantages against hand-computed values (docs/methods/grpo.md#advantages)."""

import json
import math

import pytest
import torch

from diffalign.losses import (
    PerPromptStatTracker,
    clip_advantages,
    group_advantages,
    group_stds,
    nonzero_advantage_mask,
    per_reward_advantages,
    zero_std_ratio,
)


PROMPTS = ["a", "b", "a", "c", "b", "a"]
REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
# group means: a (1, 3, 6) -> 10/3, b (2, 5) -> 3.5, c (4) -> 4
MEANS = [10 / 3, 3.5, 10 / 3, 4.0, 3.5, 10 / 3]


def test_global_std_hand_computed():
    std = math.sqrt(35 / 12)  # population std of 1..6
    expected = [(r - m) / (std + 1e-4) for r, m in zip(REWARDS.tolist(), MEANS)]
    adv = group_advantages(REWARDS, PROMPTS)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_per_group_std_hand_computed():
    std_a = math.sqrt((49 + 1 + 64) / 9 / 3)  # deviations -7/3, -1/3, 8/3
    std_b = 1.5
    stds = [std_a, std_b, std_a, 0.0, std_b, std_a]
    expected = [(r - m) / (s + 1e-4) for r, m, s in zip(REWARDS.tolist(), MEANS, stds)]
    adv = group_advantages(REWARDS, PROMPTS, global_std=False)
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert adv[3].item() == 0.0  # a singleton among larger groups gets 0


def test_tensor_group_ids_match_prompt_ids():
    ids = torch.tensor([7, 2, 7, 5, 2, 7])
    assert torch.equal(group_advantages(REWARDS, ids), group_advantages(REWARDS, PROMPTS))


def test_all_singletons_fall_back_to_batch_normalisation():
    rewards = torch.tensor([1.0, 2.0, 3.0])
    expected = [(r - 2.0) / (math.sqrt(2 / 3) + 1e-4) for r in (1.0, 2.0, 3.0)]
    for global_std in (True, False):
        adv = group_advantages(rewards, ["x", "y", "z"], global_std=global_std)
        assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_group_advantages_sum_to_zero_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g)
    ids = torch.arange(4).repeat_interleave(6)
    adv = group_advantages(rewards, ids, global_std=False)
    assert adv.view(4, 6).sum(dim=1).abs().max() < 1e-5
    assert adv.view(4, 6).std(dim=1, correction=0).tolist() == pytest.approx([1.0] * 4, rel=1e-3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, PROMPTS[:-1])
    with pytest.raises(ValueError):
        group_advantages(REWARDS.view(2, 3), PROMPTS)


def test_zero_std_ratio_and_group_stds():
    rewards = torch.tensor([1.0, 1.0, 2.0, 3.0, 5.0, 5.0])
    ids = [0, 0, 1, 1, 2, 2]
    assert zero_std_ratio(rewards, ids) == pytest.approx(2 / 3)
    assert group_stds(rewards, ids).tolist() == pytest.approx([0.0, 0.5, 0.0])


def test_clip_and_mask():
    adv = torch.tensor([-7.0, 0.0, 3.0, 9.0])
    assert clip_advantages(adv, 5.0).tolist() == [-5.0, 0.0, 3.0, 5.0]
    assert nonzero_advantage_mask(adv).tolist() == [True, False, True, True]
    per_step = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert nonzero_advantage_mask(per_step).tolist() == [False, True, True]
    with pytest.raises(ValueError):
        clip_advantages(adv, 0.0)


def test_tracker_uses_batch_stats_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    adv = tracker.update(["a", "a", "b"], torch.tensor([1.0, 2.0, 3.0]))
    std = math.sqrt(2 / 3)  # batch (1, 2, 3): mean 2
    assert adv.tolist() == pytest.approx([(1 - 2) / (std + 1e-6), 0.0, (3 - 2) / (std + 1e-6)], rel=1e-6)

    # "a" now holds (1, 2, 4): its own stats; "b" holds (3, 10): still the batch (4, 10) stats.
    adv = tracker.update(["a", "b"], torch.tensor([4.0, 10.0]))
    std_a = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    assert adv.tolist() == pytest.approx([(4 - 7 / 3) / (std_a + 1e-6), (10 - 7) / (3 + 1e-6)], rel=1e-6)


def test_tracker_buffer_keeps_the_latest_rewards():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    for value in (1.0, 2.0, 3.0, 10.0):
        tracker.update(["p"], torch.tensor([value]))
    stats = tracker.stats()["p"]
    assert stats["count"] == 3
    assert stats["mean"] == pytest.approx(5.0)  # (2, 3, 10)
    assert stats["std"] == pytest.approx(math.sqrt((9 + 4 + 25) / 3))


def test_tracker_state_dict_round_trip():
    g = torch.Generator().manual_seed(1)
    prompts = ["a", "b", "c", "a", "b", "c"]
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    for _ in range(3):
        tracker.update(prompts, torch.rand(6, generator=g))
    state = json.loads(json.dumps(tracker.state_dict()))  # plain Python, serialisable
    restored = PerPromptStatTracker()
    restored.load_state_dict(state)
    batch = torch.rand(6, generator=g)
    assert torch.equal(restored.update(prompts, batch), tracker.update(prompts, batch))
    assert restored.stats() == tracker.stats()
    tracker.clear()
    assert tracker.stats() == {}


def test_tracker_validates():
    with pytest.raises(ValueError):
        PerPromptStatTracker(buffer_size=4, min_count=8)
    with pytest.raises(ValueError):
        PerPromptStatTracker().update(["a"], torch.tensor([1.0, 2.0]))


def test_per_reward_advantages_hand_made_three_rewards():
    """MixGRPO's aggregation: each reward normalised within its group (population std + 1e-4 here, per group),
    then summed with weights normalised to sum 1 -- against values computed by hand."""
    groups = [0, 0, 0, 1, 1, 1]
    parts = {
        "hps": torch.tensor([0.20, 0.30, 0.40, 0.25, 0.25, 0.28], dtype=torch.float64),
        "pick": torch.tensor([21.0, 23.0, 22.0, 20.0, 24.0, 22.0], dtype=torch.float64),
        "ir": torch.tensor([-1.0, 1.0, 0.0, 0.5, 0.5, 0.5], dtype=torch.float64),
    }
    weights = {"hps": 1.0, "pick": 2.0, "ir": 1.0}

    def by_hand(values):  # (r - group mean) / (group population std + 1e-4)
        out = []
        for g in (0, 1):
            rows = [v for v, gi in zip(values.tolist(), groups) if gi == g]
            mean = sum(rows) / 3
            std = math.sqrt(sum((r - mean) ** 2 for r in rows) / 3)
            out += [(r - mean) / (std + 1e-4) for r in rows]
        return out

    hand = {name: by_hand(values) for name, values in parts.items()}
    expected = [0.25 * hand["hps"][i] + 0.5 * hand["pick"][i] + 0.25 * hand["ir"][i] for i in range(6)]
    got = per_reward_advantages(parts, weights, torch.tensor(groups), global_std=False)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # The constant "ir" group contributes 0, and the aggregation differs from normalising the weighted sum.
    assert hand["ir"][3:] == [0.0, 0.0, 0.0]
    total = sum(weights[k] * v for k, v in parts.items())
    assert not torch.allclose(got, group_advantages(total, torch.tensor(groups), global_std=False))
    with pytest.raises(ValueError, match="sum to > 0"):
        per_reward_advantages(parts, {"hps": 1.0, "pick": -1.0, "ir": 0.0}, torch.tensor(groups))
    with pytest.raises(ValueError, match="same rewards"):
        per_reward_advantages(parts, {"hps": 1.0}, torch.tensor(groups))
