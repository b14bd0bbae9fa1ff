"""The reward models a config loads, as the planner counts them: their parameters, and the image tower that
gradients pass through in reward backprop.

Parameter counts are those of the architectures the ``rewards`` package builds, counted on the meta device:
PickScore and HPSv2/v2.1 are CLIP ViT-H/14 (open_clip ``ViT-H-14``: 986.1M), ImageReward is BLIP's ViT-L/16 with
its cross-attention BERT and MLP head (446.2M), the aesthetic predictor is OpenAI CLIP ViT-L/14's vision tower with
its projection and MLP head (305.7M), CLIP score is the whole OpenAI CLIP ViT-L/14 (427.6M). Rewards the table does
not know (a ``module:fn`` spec, the shapes world's own) are not counted, and the plan says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


__all__ = ["REWARD_MODELS", "RewardModel", "reward_terms"]

_VIT_H14 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16}
_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A reward model's size and the geometry of its image tower (a ``CLIPVisionConfig``'s keys, 224 px input)."""

    parameters: float
    vision: dict[str, Any]


REWARD_MODELS: dict[str, RewardModel | None] = {
    "pickscore": RewardModel(986.1e6, {**_VIT_H14, "patch_size": 14, "hidden_act": "gelu"}),
    "hpsv2": RewardModel(986.1e6, {**_VIT_H14, "patch_size": 14, "hidden_act": "gelu"}),
    "hpsv2.1": RewardModel(986.1e6, {**_VIT_H14, "patch_size": 14, "hidden_act": "gelu"}),
    "imagereward": RewardModel(446.2e6, {**_VIT_L, "patch_size": 16, "hidden_act": "gelu"}),
    "aesthetic": RewardModel(305.7e6, {**_VIT_L, "patch_size": 14, "hidden_act": "quick_gelu"}),
    "clip_score": RewardModel(427.6e6, {**_VIT_L, "patch_size": 14, "hidden_act": "quick_gelu"}),
    "jpeg_compressibility": None,
    "jpeg_incompressibility": None,
}
"""Known reward names; ``None``: a reward without a model (nothing to count)."""

_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


def reward_terms(reward: Any) -> list[tuple[str, RewardModel | None, int, bool]]:
    """``(name, model, bytes per parameter, known)`` of each reward a config's ``reward`` loads (a name, a spec, or
    a weighted mapping whose terms may set ``dtype``; models load in float32 unless a term says otherwise)."""
    if reward is None:
        return []
    entries = reward.items() if isinstance(reward, Mapping) else [(reward, None)]
    terms = []
    for name, term in entries:
        dtype = term.get("dtype") if isinstance(term, Mapping) else None
        if isinstance(dtype, torch.dtype):
            size = dtype.itemsize
        else:
            size = _BYTES.get(str(dtype).lower().removeprefix("torch."), 4) if dtype is not None else 4
        terms.append((str(name), REWARD_MODELS.get(str(name)), size, str(name) in REWARD_MODELS))
    return terms
