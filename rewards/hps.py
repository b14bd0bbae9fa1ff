"""Human Preference Score v2.0 and v2.1 (Wu et al., 2023), docs/rewards.md#hpsv2.

Model: open_clip ``ViT-H-14`` fine-tuned on HPD v2. The checkpoints (``HPS_v2_compressed.pt``,
``HPS_v2.1_compressed.pt`` in the hub repository ``xswu/HPSv2``) are ``{"state_dict": <open_clip keys>}``; they are
loaded strictly into a randomly initialised open_clip model, so the LAION ViT-H weights are never fetched just to be
overwritten, as the ``hpsv2`` package does.

Score: the plain cosine ``cos(image, text)`` of open_clip's L2-normalised features (the model's ``logit_scale`` is
not used); about 0.20-0.35 on real images. v2.0 and v2.1 scores are not comparable.

Preprocessing: HPSv2's evaluation transform, longest edge -> 224 (bicubic), zero padding to a centred 224 square,
OpenAI mean/std (see :func:`rewards.preprocess.hps_preprocess`). Text: open_clip's tokenizer, context 77.

Precision: the reference runs fp32 weights under CUDA autocast; here the whole model runs in ``dtype`` and the
cosine in float32.

Integrity: ``verify=True`` hashes the checkpoint before loading it (docs/rewards.md#verifying-weights). No SHA-256 of
either published file is known here, so ``verify=True`` needs ``sha256=``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.clip_score import open_clip_name
from rewards.model import ModelReward, WeightFile, choose_sha256, freeze, resolve_file
from rewards.preprocess import hps_preprocess
from rewards.registry import register


HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"
# Published SHA-256 of each checkpoint; None = unknown. The hub's LFS pointers of xswu/HPSv2 could not be read from
# where this was written, and the hpsv2 package downloads without checking one; none is guessed.
HPS_SHA256: dict[str, str | None] = {"v2.0": None, "v2.1": None}


def load_open_clip_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an HPS checkpoint: ``{"state_dict": sd}`` (or a bare ``sd``), ``module.`` prefixes removed."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {key.removeprefix("module."): value for key, value in state.items()}


@register("hpsv2")
class HPSv2(ModelReward):
    """HPS v2.0 reward, differentiable (``"hpsv2.1"`` is the same class with the v2.1 checkpoint).

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; scores are float32.
        path: the checkpoint: a ``.pt`` file, a folder holding the version's file name, or a hub repository id.
        model: the open_clip architecture: a registered name (``"ViT-H-14"``) or a path to a model config ``.json``.
        revision: hub revision (branch, tag or commit) of ``path`` when it is a hub id; ignored for a local path.
        verify: hash the checkpoint before loading and refuse a SHA-256 mismatch.
        sha256: the checkpoint's expected SHA-256 (needed with ``verify=True``: no published digest is known).
    """

    name = "hpsv2"
    version = "v2.0"
    differentiable = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = HPS_REPO,
        model: str | os.PathLike = HPS_ARCH,
        revision: str | None = None,
        verify: bool = False,
        sha256: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verify=verify)
        self.path = os.fspath(path)
        self.model = os.fspath(model)
        self.revision = revision
        self.sha256 = choose_sha256(sha256, HPS_SHA256[self.version], self.verify, self._what)

    @property
    def _what(self) -> str:
        return f"HPS{self.version} checkpoint"

    def _checkpoint(self) -> Path:
        return resolve_file(self.path, HPS_FILES[self.version], self._what, self.revision)

    def weight_files(self) -> list[WeightFile]:
        return [WeightFile(self._checkpoint(), self.sha256, self._what)]

    def weights_key(self) -> tuple:
        return (self.path, self.revision, HPS_FILES[self.version], self.model)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        import open_clip

        model_name = open_clip_name(self.model)
        model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
        model.load_state_dict(load_open_clip_state(self._checkpoint()), strict=True)
        return freeze(model, device, dtype), open_clip.get_tokenizer(model_name)

    def _score_with(self, bundle: tuple[Any, Any], images: Tensor, prompts: list[str] | None) -> Tensor:
        model, tokenizer = bundle
        image_features = model.encode_image(hps_preprocess(images, dtype=self.dtype))
        text_features = model.encode_text(tokenizer(prompts).to(images.device))
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        return (image_features * text_features).sum(-1)


@register("hpsv2.1")
class HPSv21(HPSv2):
    """HPS v2.1 reward (same model and formula as v2.0, the ``HPS_v2.1_compressed.pt`` checkpoint)."""

    name = "hpsv2.1"
    version = "v2.1"
