"""derive_seed: one seed derivation for every draw, above the range kept for the seeds people choose."""

import random

import pytest
import torch

from diffalign.config import ConfigError, EvalConfig
from diffalign.seeding import USER_SEED_LIMIT, derive_seed, is_user_seed


def test_a_seed_depends_on_its_parts_only():
    assert derive_seed(42, "grpo/image", 3, 7) == derive_seed(42, "grpo/image", 3, 7)
    # Pinned: the derivation must not change silently (resumed runs and recorded benchmarks depend on it).
    assert derive_seed(0, "probe", 1) == 8979185566478029450
    others = {
        derive_seed(43, "grpo/image", 3, 7),
        derive_seed(42, "grpo/prompts", 3, 7),
        derive_seed(42, "grpo/image", 37),
        derive_seed(42, "grpo/image", 3, "7"),
        derive_seed(42, "grpo/image", 7, 3),
    }
    assert derive_seed(42, "grpo/image", 3, 7) not in others and len(others) == 5


def test_derived_seeds_lie_above_every_user_seed_and_feed_the_generators():
    seeds = [derive_seed(seed, "x", i) for seed in (0, 1, 2**31) for i in range(2_000)]
    assert len(set(seeds)) == len(seeds)
    assert min(seeds) >= USER_SEED_LIMIT and max(seeds) < 2**63
    assert not any(is_user_seed(seed) for seed in seeds)
    # torch's CPU generator keeps only the low 32 bits of a seed: they stay out of the user range as well.
    assert not any(is_user_seed(seed % 2**32) for seed in seeds)
    torch.Generator().manual_seed(max(seeds))
    random.Random(max(seeds))
    # Spread over the whole range, not clustered at its bottom.
    assert max(seeds) > 2**62 and min(seeds) < 2**61


def test_bad_parts_are_refused():
    with pytest.raises(ValueError, match="at least one part"):
        derive_seed()
    for bad in (1.5, None, True, (1, 2)):
        with pytest.raises(TypeError, match="ints or strings"):
            derive_seed(0, bad)


def test_evaluation_seeds_must_be_user_seeds():
    assert is_user_seed(0) and is_user_seed(USER_SEED_LIMIT - 1)
    assert not is_user_seed(-1) and not is_user_seed(USER_SEED_LIMIT)
    EvalConfig(seeds=[0, 90_001])
    with pytest.raises(ConfigError, match=r"seeds: must lie in \[0, "):
        EvalConfig(seeds=[derive_seed(0, "grpo/image", 0, 0)])
