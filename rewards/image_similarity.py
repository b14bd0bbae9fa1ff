"""Edit reward: how much an edited image still looks like its source, as the cosine of their CLIP image embeddings.

flow_grpo scores its image edits (Qwen-Image-Edit, FLUX.1 Kontext) with this term next to GenEval
(``image_similarity`` in ``flow_grpo/rewards.py``, OpenAI CLIP ViT-L/14 image features, L2-normalised, one cosine per
pair). The source image comes with each edit's metadata: ``metadata[i]["image"]`` is its path, as diffalign's edit
runs pass it (docs/rewards.md#edit-rewards). The gradient flows through the edited image only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rewards import hf_clip
from rewards.base import RewardInputError
from rewards.clip_score import CLIP_SCORE_MODEL
from rewards.model import ModelReward, freeze
from rewards.preprocess import clip_preprocess
from rewards.registry import register


SOURCE_KEY = "image"
"""The metadata field that holds an edit's source image path."""


def load_source_image(item: Mapping[str, Any], index: int, name: str) -> Tensor:
    """The source image of one edit, ``[3, H, W]`` float32 in ``[0, 1]`` at its own size.

    Raises:
        RewardInputError: no ``"image"`` in the metadata, or a file that is missing or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    path = item.get(SOURCE_KEY)
    if not isinstance(path, (str, os.PathLike)):
        raise RewardInputError(
            f"reward {name!r} scores edits: image {index} needs its source image's path in metadata['image']"
        )
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise RewardInputError(
            f"reward {name!r}: cannot read the source image {path} of image {index} ({err})"
        ) from err
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return pixels.permute(2, 0, 1).float() / 255


@register("image_similarity")
class ImageSimilarity(ModelReward):
    """``scale * cos(CLIP(edit), CLIP(source))`` per image, differentiable in the edit.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; scores are float32.
        path: hub id or local folder of a ``CLIPModel`` (default OpenAI ViT-L/14, flow_grpo's).
        revision: hub revision of ``path``.
        scale: the weight of the cosine (1, flow_grpo's).
    """

    name = "image_similarity"
    differentiable = True
    needs_prompts = False
    takes_metadata = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = CLIP_SCORE_MODEL,
        revision: str | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.path = os.fspath(path)
        self.revision = revision
        self.scale = float(scale)

    def weights_key(self) -> tuple:
        return (self.path, self.revision)

    def build(self, device: torch.device, dtype: torch.dtype) -> Any:
        return freeze(hf_clip.load_clip_model(self.path, "image similarity model", self.revision), device, dtype)

    def _score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict[str, Any]]) -> Tensor:
        model = self._ensure_loaded(images.device)
        images = images.to(self.device)
        # Each source at its own size through CLIP's resize and crop, so sources of any size stack at 224 px.
        sources = [load_source_image(item, i, self.name)[None] for i, item in enumerate(metadata)]
        source_pixels = torch.cat([clip_preprocess(s.to(self.device), dtype=self.dtype) for s in sources])
        with torch.no_grad():
            source_embeddings = hf_clip.image_embeddings(model, source_pixels)
        edit_embeddings = hf_clip.image_embeddings(model, clip_preprocess(images, dtype=self.dtype))
        return self.scale * (edit_embeddings * source_embeddings).sum(-1)
