"""Shared pieces of the scorers built on ``transformers.CLIPModel`` (PickScore, CLIP score).

Features are computed through ``vision_model``/``text_model`` and the projection layers directly: in
transformers 5, ``get_image_features`` returns a ``BaseModelOutputWithPooling`` instead of a tensor, and going
through the sub-modules works on 4.x and 5.x alike (docs/rewards.md#loading-weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.model import from_pretrained


# Files whose presence says a folder carries its own tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def has_tokenizer(location: str | os.PathLike) -> bool:
    """True when ``location`` is a local folder holding tokenizer files."""
    path = Path(os.fspath(location)).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_clip_model(location: str | os.PathLike, what: str, revision: str | None = None) -> Any:
    """``CLIPModel`` from a hub id (at ``revision``) or a local folder (``config.json`` + weights)."""
    from transformers import CLIPModel

    return from_pretrained(CLIPModel, location, what, revision=revision)


def load_tokenizer(location: str | os.PathLike, what: str, revision: str | None = None) -> Any:
    """The CLIP tokenizer of a hub id (at ``revision``) or a local folder (``vocab.json`` + ``merges.txt`` or
    ``tokenizer.json``)."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, location, what, revision=revision)


def image_embeddings(model: Any, pixel_values: Tensor) -> Tensor:
    """L2-normalised projected image features, float32 ``[B, D]``, from pixel values ``[B, 3, 224, 224]``."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def text_embeddings(model: Any, tokenizer: Any, prompts: list[str], device: torch.device) -> Tensor:
    """L2-normalised projected text features, float32 ``[B, D]``.

    Tokenised with ``padding=True, truncation=True`` to the tokenizer's max length (77), as the reference
    processors do; the pooled token is the end-of-text token, which the causal mask keeps independent of padding.
    """
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    return F.normalize(model.text_projection(pooled).float(), dim=-1)
