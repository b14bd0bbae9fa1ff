"""LAION improved aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE"), docs/rewards.md#aesthetic.

Score: ``head(e / ||e||)`` where ``e`` is the projected OpenAI CLIP ViT-L/14 image embedding (768-d) and ``head``
the predictor's MLP ``Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16)
Linear(16,1)`` (no activations: the "linearMSE" model is affine in eval mode). AVA-like 1-10 scale; SD images
score about 5-6.5.

Weights: the head is the original ``.pth`` state dict (keys ``layers.{0,2,4,6,7}.{weight,bias}``, loaded strictly,
``map_location="cpu"`` because the published tensors were saved on ``cuda:0``); the backbone is an HF CLIP folder
read with ``CLIPVisionModelWithProjection``. The head runs in float32 whatever the backbone's dtype.

Preprocessing: the HF ``CLIPProcessor`` settings of ``openai/clip-vit-large-patch14`` (as ddpo-pytorch and
flow_grpo use), in torch; the original ``clip.load`` transform differs only in the crop offset of odd margins.

Integrity: ``verify=True`` hashes the head and the backbone's weights file before loading them
(docs/rewards.md#verifying-weights). The original head file's SHA-256 is published; the digests of the trl copy and
of the HF backbone are not known here and must be given (``sha256=``, ``clip_sha256=``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.model import (
    ModelReward,
    WeightFile,
    choose_sha256,
    freeze,
    from_pretrained,
    resolve_file,
    resolve_weights_file,
)
from rewards.preprocess import clip_preprocess
from rewards.registry import register


AESTHETIC_BACKBONE = "openai/clip-vit-large-patch14"
# trl's AlignProp scorer hosts the DDPO aesthetic head here; a local copy of sac+logos+ava1-l14-linearMSE.pth (or a
# folder holding it, with filename=...) loads through the same code.
AESTHETIC_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
# Published SHA-256 by head file name; None = unknown. sac+logos+ava1-l14-linearMSE.pth (3,714,759 bytes): the file
# in christophschuhmann/improved-aesthetic-predictor (commit 6934dd8), byte-identical git blob in ddpo-pytorch,
# flow_grpo and AlignProp; the digest below is the one pinned for it by several public projects that download it.
# trl-lib's aesthetic-model.pth: no digest found (hub LFS pointer not readable from where this was written).
AESTHETIC_HEAD_SHA256: dict[str, str | None] = {
    "sac+logos+ava1-l14-linearMSE.pth": "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    AESTHETIC_HEAD_FILE: None,
}
# The backbone's model.safetensors in openai/clip-vit-large-patch14: unknown (OpenAI's ViT-L-14.pt, whose digest
# b8cca3fd...3836 the clip package checks, is a different file, a TorchScript archive this reward does not read).
AESTHETIC_BACKBONE_SHA256: str | None = None
_LINEAR_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in the original nn.Sequential


def build_head(state_dict: dict[str, Tensor]) -> nn.Module:
    """Rebuild the predictor's MLP from its state dict, with the original module layout and widths read from it.

    Raises:
        KeyError: the state dict is not in the ``layers.{0,2,4,6,7}`` layout.
    """
    missing = [f"layers.{i}.weight" for i in _LINEAR_INDICES if f"layers.{i}.weight" not in state_dict]
    if missing:
        raise KeyError(f"aesthetic head: not the LAION predictor layout, missing {missing} (has {sorted(state_dict)})")
    widths = [state_dict[f"layers.{i}.weight"].shape for i in _LINEAR_INDICES]
    dropouts = {1: 0.2, 3: 0.2, 5: 0.1}
    modules: list[nn.Module] = []
    for index in range(8):
        if index in dropouts:
            modules.append(nn.Dropout(dropouts[index]))
        else:
            out_features, in_features = widths[_LINEAR_INDICES.index(index)]
            modules.append(nn.Linear(in_features, out_features))
    head = nn.Module()
    head.layers = nn.Sequential(*modules)
    head.load_state_dict(state_dict, strict=True)
    return head


def load_head(path: str | os.PathLike) -> nn.Module:
    """Read a head ``.pth`` (plain state dict, or ``{"state_dict": ...}``) on the CPU with ``weights_only=True``."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return build_head(dict(state))


def _vision_tower_class() -> type:
    """``CLIPVisionModelWithProjection`` that loads quietly from a full ``CLIPModel`` folder.

    ``openai/clip-vit-large-patch14`` is a ``CLIPModel`` checkpoint; its text tower is expected to be left out, so
    those keys are declared ignorable instead of being reported as unexpected on every load.
    """
    from transformers import CLIPVisionModelWithProjection

    class CLIPVisionTower(CLIPVisionModelWithProjection):
        _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    return CLIPVisionTower


@register("aesthetic")
class AestheticScore(ModelReward):
    """LAION aesthetic predictor v2 reward, differentiable, prompt-agnostic.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: backbone dtype; the head and the scores are float32.
        path: the head: a ``.pth`` file, a folder holding ``filename``, or a hub repository id.
        filename: the head's file name inside a folder or hub repository.
        clip_path: hub id or local folder of the CLIP ViT-L/14 backbone (a ``CLIPModel`` or
            ``CLIPVisionModelWithProjection`` folder).
        revision: hub revision (branch, tag or commit) of the head's ``path`` when it is a hub id; ignored for a
            local path. The backbone ``clip_path`` is another repository and uses its default branch.
        verify: hash the head and the backbone weights before loading and refuse a SHA-256 mismatch.
        sha256: the head file's expected SHA-256 (default: the published one of ``sac+logos+ava1-l14-linearMSE.pth``
            when the head file has that name; needed for other files).
        clip_sha256: the backbone weights file's expected SHA-256 (needed with ``verify=True``).
    """

    name = "aesthetic"
    differentiable = True
    needs_prompts = False

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = AESTHETIC_HEAD_REPO,
        filename: str = AESTHETIC_HEAD_FILE,
        clip_path: str | os.PathLike = AESTHETIC_BACKBONE,
        revision: str | None = None,
        verify: bool = False,
        sha256: str | None = None,
        clip_sha256: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verify=verify)
        self.path = os.fspath(path)
        self.filename = filename
        self.clip_path = os.fspath(clip_path)
        self.revision = revision
        head_name = Path(self.path).name if self.path.endswith((".pth", ".pt")) else filename
        published = AESTHETIC_HEAD_SHA256.get(head_name)
        self.sha256 = choose_sha256(sha256, published, self.verify, f"aesthetic predictor head {head_name!r}")
        self.clip_sha256 = choose_sha256(
            clip_sha256, AESTHETIC_BACKBONE_SHA256, self.verify, "aesthetic CLIP backbone weights", "clip_sha256"
        )

    def _head_file(self) -> Path:
        return resolve_file(self.path, self.filename, "aesthetic predictor head", self.revision)

    def weight_files(self) -> list[WeightFile]:
        backbone = resolve_weights_file(self.clip_path, "aesthetic CLIP backbone")
        return [
            WeightFile(self._head_file(), self.sha256, "aesthetic predictor head"),
            WeightFile(backbone, self.clip_sha256, "aesthetic CLIP backbone weights", "clip_sha256"),
        ]

    def weights_key(self) -> tuple:
        return (self.path, self.revision, self.filename, self.clip_path)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, nn.Module]:
        backbone = from_pretrained(_vision_tower_class(), self.clip_path, "aesthetic CLIP backbone")
        head = load_head(self._head_file())
        return freeze(backbone, device, dtype), freeze(head, device, torch.float32)

    def _score_with(self, bundle: tuple[Any, nn.Module], images: Tensor, prompts: list[str] | None) -> Tensor:
        backbone, head = bundle
        embeds = backbone(pixel_values=clip_preprocess(images, dtype=self.dtype)).image_embeds
        return head.layers(F.normalize(embeds.float(), dim=-1)).squeeze(-1)
