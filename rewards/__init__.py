"""rewards: reward models for text-to-image alignment (PickScore, HPS, CLIP score, aesthetic, ...).

Independent of diffalign: it never imports it.

Every reward follows one protocol, ``reward.score(images, prompts) -> Tensor[B]`` float32, with ``images`` a float
tensor ``[B, 3, H, W]`` in [0, 1] on any device (rewards that declare ``takes_metadata`` also get per-image
metadata, ``score(images, prompts, metadata)``)::

    import rewards

    pick = rewards.load("pickscore", device="cuda", dtype="bf16")           # hub id, or path="/local/folder"
    scores = pick.score(images, prompts)                                    # differentiable
    total, parts = rewards.WeightedSum({"pickscore": 1.0, "aesthetic": 0.5}).score_parts(images, prompts)
    pick26 = rewards.load({"pickscore": {"scale": 1 / 26, "dtype": "bf16"}})  # flow_grpo's PickScore/26
    mine = rewards.load("path/to/my_reward.py:score_fn")                    # a plain function, wrapped and checked

Model weights load lazily (first score) and are cached per process; heavy libraries (transformers, open_clip) are
imported only then.
"""

from rewards.base import Reward, RewardInputError, RewardOutputError, metadata_kwargs
from rewards.composite import RewardSpecError, Term, WeightedSum, parse_term
from rewards.model import ModelReward, clear_cache
from rewards.registry import (
    FunctionReward,
    UnknownRewardError,
    available,
    factory_options,
    load,
    register,
    unregister,
)


# Built-in rewards register themselves on import; their heavy imports happen only when weights load.
from rewards import (  # noqa: E402, F401  isort: skip
    aesthetic,
    clip_score,
    geneval,
    hps,
    hpsv3,
    image_similarity,
    imagereward,
    jpeg,
    mps,
    ocr,
    pickscore,
    vlm_judge,
)
from rewards.remote import RemoteReward, RemoteRewardError  # noqa: E402


__all__ = [
    "FunctionReward",
    "ModelReward",
    "RemoteReward",
    "RemoteRewardError",
    "Reward",
    "RewardInputError",
    "RewardOutputError",
    "RewardSpecError",
    "Term",
    "UnknownRewardError",
    "WeightedSum",
    "available",
    "clear_cache",
    "factory_options",
    "load",
    "metadata_kwargs",
    "parse_term",
    "register",
    "unregister",
]
