"""PickScore (Kirstain et al., 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences (docs/rewards.md#pickscore).

Score: ``exp(logit_scale) * cos(text, image)`` per (image, prompt) pair, the PickScore README formula without the
softmax over candidates; about 18-24 on real images (flow_grpo divides by 26 to get ~0.7-0.9; use a weighted-sum
term ``{"pickscore": {"scale": 1 / 26}}`` for that, docs/rewards.md#weighted-sums).

Preprocessing: the LAION ViT-H/14 ``CLIPImageProcessor`` settings (shortest edge 224, centre crop 224 with the HF
floor rule, bicubic, OpenAI mean/std), done in torch so that gradients reach the images.

Integrity: ``verify=True`` hashes the model's weights file (``model.safetensors``, else ``pytorch_model.bin``) before
loading it (docs/rewards.md#verifying-weights). No published SHA-256 is known here, so it needs ``sha256=``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from rewards import hf_clip
from rewards.model import ModelReward, WeightFile, choose_sha256, freeze, resolve_weights_file
from rewards.preprocess import clip_preprocess
from rewards.registry import register


PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# The README and flow_grpo take the processor (tokenizer + image settings) from the LAION repository.
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# Published SHA-256 of the weights file of PICKSCORE_MODEL; None = unknown (the hub's LFS pointer could not be read
# from where this was written, and the PickScore recipe loads through from_pretrained without one; none is guessed).
PICKSCORE_SHA256: str | None = None


@register("pickscore")
class PickScore(ModelReward):
    """PickScore reward, differentiable.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; scores are float32.
        path: hub id or local folder of the ``CLIPModel`` (``config.json`` + ``model.safetensors``).
        tokenizer_path: hub id or local folder of the CLIP tokenizer. ``None``: the model folder when it holds
            tokenizer files, else the LAION ViT-H/14 repository (as in the reference).
        revision: hub revision (branch, tag or commit) of ``path`` when it is a hub id (and of the tokenizer when
            it comes from the same repository); ignored for a local path.
        verify: hash the weights file before loading and refuse a SHA-256 mismatch.
        sha256: the weights file's expected SHA-256 (needed with ``verify=True``: no published digest is known).
    """

    name = "pickscore"
    differentiable = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = PICKSCORE_MODEL,
        tokenizer_path: str | os.PathLike | None = None,
        revision: str | None = None,
        verify: bool = False,
        sha256: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verify=verify)
        self.path = os.fspath(path)
        if tokenizer_path is None:
            tokenizer_path = self.path if hf_clip.has_tokenizer(self.path) else PICKSCORE_PROCESSOR
        self.tokenizer_path = os.fspath(tokenizer_path)
        self.revision = revision
        self.sha256 = choose_sha256(sha256, PICKSCORE_SHA256, self.verify, "PickScore weights")

    def weight_files(self) -> list[WeightFile]:
        path = resolve_weights_file(self.path, "PickScore weights", self.revision)
        return [WeightFile(path, self.sha256, "PickScore weights")]

    def weights_key(self) -> tuple:
        return (self.path, self.revision, self.tokenizer_path)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        model = freeze(hf_clip.load_clip_model(self.path, "PickScore model", self.revision), device, dtype)
        tokenizer_revision = self.revision if self.tokenizer_path == self.path else None
        return model, hf_clip.load_tokenizer(self.tokenizer_path, "PickScore tokenizer", tokenizer_revision)

    def _score_with(self, bundle: tuple[Any, Any], images: Tensor, prompts: list[str] | None) -> Tensor:
        model, tokenizer = bundle
        image_emb = hf_clip.image_embeddings(model, clip_preprocess(images, dtype=self.dtype))
        text_emb = hf_clip.text_embeddings(model, tokenizer, prompts, images.device)
        return model.logit_scale.float().exp() * (image_emb * text_emb).sum(-1)
