"""Per-image metadata: only rewards that declare it receive it, aligned with the images; others run as before."""

import pytest
import torch

import rewards
from rewards import FunctionReward, Reward, RewardInputError, WeightedSum


IMAGES = torch.full((3, 3, 4, 4), 0.5)
PROMPTS = ["one cat", "two dogs", "three birds"]
METADATA = [{"count": 1}, {"count": 2}, {"count": 3}]


class CountReward(Reward):
    """Scores each image with its metadata's ``count`` (0 when absent): a GenEval-like reward."""

    name = "count"
    takes_metadata = True

    def __init__(self):
        self.seen = []

    def _score(self, images, prompts, metadata):
        self.seen.append(metadata)
        return [float(m.get("count", 0)) for m in metadata]


class OldStyle(Reward):
    """A reward written before metadata: it overrides ``score`` with the two-argument signature."""

    name = "old_style"

    def score(self, images, prompts=None):
        return torch.full((images.shape[0],), 10.0)


def test_a_reward_that_takes_metadata_gets_it_aligned_with_the_images():
    reward = CountReward()
    torch.testing.assert_close(reward.score(IMAGES, PROMPTS, METADATA), torch.tensor([1.0, 2.0, 3.0]))
    assert reward.seen[-1] == METADATA and reward.seen[-1][0] is not METADATA[0]  # copies, never the caller's dicts


def test_without_metadata_a_metadata_reward_gets_empty_dicts():
    reward = CountReward()
    torch.testing.assert_close(reward.score(IMAGES, PROMPTS), torch.zeros(3))
    assert reward.seen[-1] == [{}, {}, {}]


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"count": 1}, "got a single mapping; use \\[metadata\\] \\* len\\(images\\)"),
        (METADATA[:2], "got 2 metadata dicts for 3 images"),
        ([{"count": 1}, "x", {}], "item 1 is str"),
        ("count", "must be a list of 3 dicts, got str"),
    ],
)
def test_bad_metadata_is_refused_by_name(metadata, match):
    with pytest.raises(RewardInputError, match=match):
        CountReward().score(IMAGES, PROMPTS, metadata)


def test_a_reward_without_metadata_ignores_it():
    reward = rewards.load(lambda images, prompts: images.mean(dim=(1, 2, 3)))
    assert not reward.takes_metadata
    torch.testing.assert_close(reward.score(IMAGES, PROMPTS, [{"anything": 1}] * 3), torch.full((3,), 0.5))


def test_a_function_with_a_metadata_parameter_receives_it():
    received = []

    def by_count(images, prompts, metadata):
        received.append((list(prompts), metadata))
        return [m["count"] * 0.5 for m in metadata]

    reward = rewards.load(by_count)
    assert isinstance(reward, FunctionReward) and reward.takes_metadata
    torch.testing.assert_close(reward.score(IMAGES, PROMPTS, METADATA), torch.tensor([0.5, 1.0, 1.5]))
    assert received == [(PROMPTS, METADATA)]
    assert not rewards.load(by_count, takes_metadata=False).takes_metadata


def test_a_weighted_sum_passes_metadata_only_to_the_parts_that_take_it():
    counter = CountReward()
    reward = WeightedSum({counter: 2.0, OldStyle(): 0.5})
    assert reward.takes_metadata
    total, parts = reward.score_parts(IMAGES, PROMPTS, METADATA)
    torch.testing.assert_close(total, torch.tensor([2.0 + 5.0, 4.0 + 5.0, 6.0 + 5.0]))
    torch.testing.assert_close(parts["count"], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(reward.score(IMAGES, PROMPTS, METADATA), total)
    assert counter.seen[-1] == METADATA


def test_a_sum_without_metadata_parts_does_not_take_it():
    reward = WeightedSum({OldStyle(): 1.0})
    assert not reward.takes_metadata
    total, _ = reward.score_parts(IMAGES, PROMPTS, METADATA)
    torch.testing.assert_close(total, torch.full((3,), 10.0))


def test_metadata_kwargs_keeps_old_signatures_callable():
    assert rewards.metadata_kwargs(OldStyle(), METADATA) == {}
    assert rewards.metadata_kwargs(CountReward(), METADATA) == {"metadata": METADATA}
    old = OldStyle()
    torch.testing.assert_close(
        old.score(IMAGES, PROMPTS, **rewards.metadata_kwargs(old, METADATA)), torch.full((3,), 10.0)
    )
