"""CLIP score: text-image cosine similarity of OpenAI CLIP ViT-L/14, scaled by 100.

See docs/rewards.md#clip-score.

Per sample: ``score_i = 100 * cos(text_i, image_i)``, torchmetrics' per-sample quantity (typical range 20-35).

Clamp convention: torchmetrics reports ``max(mean_i score_i, 0)``, the clamp applied to the *batch mean*; Hessel et
al.'s CLIPScore clamps each sample (``w * max(cos, 0)``, w = 2.5). A per-sample clamp zeroes the gradient of every
image whose cosine is negative, so the reward is unclamped by default; ``clamp=True`` gives ``max(score_i, 0)`` per
sample, and ``scale=2.5, clamp=True`` gives Hessel's CLIPScore. The batch-mean clamp is a metric, not a reward, and is
left to the caller.

Preprocessing: the ``openai/clip-vit-large-patch14`` processor settings (shortest edge 224, centre crop 224, HF
floor rule, bicubic, OpenAI mean/std), in torch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from rewards import hf_clip
from rewards.model import ModelReward, freeze
from rewards.preprocess import clip_preprocess
from rewards.registry import register


CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"


@register("clip_score")
class CLIPScore(ModelReward):
    """CLIP score reward, differentiable.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; scores are float32.
        path: hub id or local folder of a ``CLIPModel`` (default OpenAI ViT-L/14).
        tokenizer_path: hub id or local folder of its tokenizer; ``None`` uses ``path``.
        scale: the weight ``w`` in ``w * cos`` (100 as torchmetrics; 2.5 for Hessel's CLIPScore).
        clamp: clamp each score at 0 (kills the gradient of negatively aligned images).
        revision: hub revision (branch, tag or commit) of ``path`` when it is a hub id (and of the tokenizer when
            it comes from the same repository); ignored for a local path.
    """

    name = "clip_score"
    differentiable = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = CLIP_SCORE_MODEL,
        tokenizer_path: str | os.PathLike | None = None,
        scale: float = 100.0,
        clamp: bool = False,
        revision: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.path = os.fspath(path)
        self.tokenizer_path = os.fspath(tokenizer_path) if tokenizer_path is not None else self.path
        self.scale = float(scale)
        self.clamp = bool(clamp)
        self.revision = revision

    def weights_key(self) -> tuple:
        return (self.path, self.revision, self.tokenizer_path)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        model = freeze(hf_clip.load_clip_model(self.path, "CLIP score model", self.revision), device, dtype)
        tokenizer_revision = self.revision if self.tokenizer_path == self.path else None
        return model, hf_clip.load_tokenizer(self.tokenizer_path, "CLIP score tokenizer", tokenizer_revision)

    def _score_with(self, bundle: tuple[Any, Any], images: Tensor, prompts: list[str] | None) -> Tensor:
        model, tokenizer = bundle
        image_emb = hf_clip.image_embeddings(model, clip_preprocess(images, dtype=self.dtype))
        text_emb = hf_clip.text_embeddings(model, tokenizer, prompts, images.device)
        scores = self.scale * (image_emb * text_emb).sum(-1)
        return scores.clamp_min(0.0) if self.clamp else scores
