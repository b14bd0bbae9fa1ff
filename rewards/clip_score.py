"""CLIP score: text-image cosine similarity of a CLIP model, scaled by 100 (OpenAI CLIP ViT-L/14 by default).

See docs/rewards.md#clip-score.

Two backends:

- ``transformers.CLIPModel`` (the default): ``path`` is a hub id or local folder, ``openai/clip-vit-large-patch14``
  unless given;
- open_clip, named as open_clip names its models (``create_model_and_transforms(name, pretrained=...)``):
  ``model="open_clip:ViT-H-14-quickgelu", pretrained="dfn5b"`` (a built-in architecture and a pretrained tag or a
  local weights file), ``model="open_clip:path/to/config.json", pretrained="weights.safetensors"``, or a model
  identifier with a schema, ``path="hf-hub:apple/DFN5B-CLIP-ViT-H-14-384"`` / ``path="local-dir:/models/dfn5b"``
  (config and weights from one repository or folder, as MixGRPO loads DFN5B with ``create_model_from_pretrained``).
  The image preprocessing is read from the loaded model's own configuration (``model.visual.preprocess_cfg``: size,
  resize mode, interpolation, mean/std) and applied in torch (:func:`open_clip_preprocess`), the tokenizer is
  ``open_clip.get_tokenizer`` of the same name.

Per sample: ``score_i = 100 * cos(text_i, image_i)``, torchmetrics' per-sample quantity (typical range 20-35).

Clamp convention: torchmetrics reports ``max(mean_i score_i, 0)``, the clamp applied to the *batch mean*; Hessel et
al.'s CLIPScore clamps each sample (``w * max(cos, 0)``, w = 2.5). A per-sample clamp zeroes the gradient of every
image whose cosine is negative, so the reward is unclamped by default; ``clamp=True`` gives ``max(score_i, 0)`` per
sample, and ``scale=2.5, clamp=True`` gives Hessel's CLIPScore. The batch-mean clamp is a metric, not a reward, and is
left to the caller.

Preprocessing (transformers backend): the ``openai/clip-vit-large-patch14`` processor settings (shortest edge 224,
centre crop 224, HF floor rule, bicubic, OpenAI mean/std), in torch.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards import hf_clip
from rewards.model import ModelReward, freeze
from rewards.preprocess import clip_preprocess, normalize, shortest_edge_size
from rewards.registry import register


CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"
OPEN_CLIP_PREFIX = "open_clip:"
# open_clip model identifiers that carry their own config and weights; ``pretrained`` is not used with them.
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def is_open_clip_location(path: str | os.PathLike) -> bool:
    """True for the open_clip identifiers ``hf-hub:org/repo`` and ``local-dir:/folder``."""
    return os.fspath(path).startswith(OPEN_CLIP_SCHEMAS)


def open_clip_name(model: str) -> str:
    """The open_clip model identifier of ``model`` (``open_clip:`` prefix optional), checked.

    A path to a model config ``.json`` is registered with open_clip under its file stem; a built-in name may be
    written with ``/`` as open_clip accepts (``ViT-H/14`` -> ``ViT-H-14``); ``hf-hub:``/``local-dir:`` identifiers
    are passed through.

    Raises:
        ValueError: an unknown built-in name (the message lists the closest known names).
        FileNotFoundError: a config ``.json`` or a ``local-dir:`` folder that does not exist.
    """
    import open_clip

    name = model.removeprefix(OPEN_CLIP_PREFIX).strip()
    if name.startswith("local-dir:") and not Path(name.removeprefix("local-dir:")).expanduser().is_dir():
        raise FileNotFoundError(f"open_clip model {name!r}: the folder does not exist")
    if name.startswith(OPEN_CLIP_SCHEMAS):
        return name
    path = Path(name).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {path} not found")
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)
        return path.stem
    name = name.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        by_lower = {k.lower(): k for k in known}
        close = [by_lower[k] for k in difflib.get_close_matches(name.lower(), list(by_lower), n=6, cutoff=0.6)]
        hint = f" Close names: {close}." if close else ""
        raise ValueError(
            f"unknown open_clip model {name!r}.{hint} Pass a name from open_clip.list_models(), a model config "
            "'.json', or 'hf-hub:org/repo' / 'local-dir:/folder' (for a transformers CLIPModel, use path= instead "
            "of model=)."
        )
    return name


def open_clip_pretrained(name: str, pretrained: str | os.PathLike | None) -> str | None:
    """Check ``pretrained`` for the open_clip model ``name``: a local weights file or one of the model's tags.

    Identifiers with a schema (``hf-hub:``, ``local-dir:``) hold their weights and take no ``pretrained``.

    Raises:
        ValueError: ``pretrained`` missing for a built-in name (which would give random weights), given for a
            schema identifier, or neither an existing file nor a known tag (the message lists the tags).
    """
    import open_clip

    if name.startswith(OPEN_CLIP_SCHEMAS):
        if pretrained is not None:
            raise ValueError(
                f"open_clip model {name!r} brings its own weights; drop pretrained={os.fspath(pretrained)!r}."
            )
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained is None:
        raise ValueError(
            f"open_clip model {name!r} needs pretrained=: a local weights file, or one of its tags {tags} "
            "(a tag downloads into the HF cache unless already there)."
        )
    path = Path(os.fspath(pretrained)).expanduser()
    if path.is_file():
        return str(path)
    if os.fspath(pretrained) in tags:
        return os.fspath(pretrained)
    raise ValueError(
        f"pretrained={os.fspath(pretrained)!r} for open_clip model {name!r} is neither an existing file nor one "
        f"of its tags {tags}."
    )


def _resize(images: Tensor, height: int, width: int, interpolation: str) -> Tensor:
    """Antialiased resize (PIL's filters under torchvision), bilinear or bicubic."""
    if images.shape[-2:] == (height, width):
        return images
    mode = "bilinear" if interpolation == "bilinear" else "bicubic"  # open_clip maps "random" to bicubic at eval
    return F.interpolate(images, size=(height, width), mode=mode, antialias=True, align_corners=False)


def _crop_or_pad(images: Tensor, height: int, width: int, fill: float) -> Tensor:
    """open_clip's ``center_crop_or_pad``: pad short edges (left/top ``d // 2``) with ``fill``, then crop centred
    with torchvision's rounding (``int(round((H - h) / 2))``)."""
    pad_h, pad_w = max(height - images.shape[-2], 0), max(width - images.shape[-1], 0)
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
    top = int(round((images.shape[-2] - height) / 2.0))
    left = int(round((images.shape[-1] - width) / 2.0))
    return images[..., top : top + height, left : left + width]


def open_clip_preprocess(images: Tensor, cfg: Mapping[str, Any], dtype: torch.dtype | None = None) -> Tensor:
    """open_clip's evaluation transform (``image_transform(..., is_train=False)``) on float tensors, in torch.

    ``resize_mode``: ``"shortest"`` (shortest edge to the size, then a centre crop), ``"longest"`` (longest edge to
    the size, then padding with ``fill_color`` to a centred square) or ``"squash"`` (straight to the size, aspect
    not kept). New edges follow open_clip: ``int(size * long / short)`` for a square ``"shortest"`` target (torchvision
    ``Resize(int)``), ``round(edge / ratio)`` otherwise (``ResizeKeepRatio``).

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        cfg: the model's ``visual.preprocess_cfg`` (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``,
            ``fill_color`` in 0-255 units).
        dtype: the model's dtype; the math runs in float32 and only the result is cast.

    Returns:
        Pixel values ``[B, 3, h, w]`` with ``(h, w)`` the configured size.
    """
    size = cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    mode = cfg.get("resize_mode") or "shortest"
    interpolation = cfg.get("interpolation") or "bicubic"
    x = images.float()
    in_h, in_w = x.shape[-2:]
    if mode == "squash":
        x = _resize(x, height, width, interpolation)
    elif mode in ("shortest", "longest"):
        if mode == "shortest" and height == width:
            new_h, new_w = shortest_edge_size(in_h, in_w, height)
        else:
            ratios = (in_h / height, in_w / width)
            ratio = max(ratios) if mode == "longest" else min(ratios)
            new_h, new_w = round(in_h / ratio), round(in_w / ratio)
        x = _resize(x, new_h, new_w, interpolation)
        x = _crop_or_pad(x, height, width, fill=float(cfg.get("fill_color", 0) or 0) / 255.0)
    else:
        raise ValueError(f"unknown open_clip resize_mode {mode!r}; expected 'shortest', 'longest' or 'squash'")
    mean, std = cfg.get("mean"), cfg.get("std")
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
    return normalize(x, mean, std).to(dtype or torch.float32)


def model_preprocess_cfg(model: Any) -> dict[str, Any]:
    """The preprocessing an open_clip model was created with (older open_clip: image size and mean/std only)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg:
        return dict(cfg)
    return {
        "size": visual.image_size,
        "mean": getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN,
        "std": getattr(visual, "image_std", None) or OPENAI_DATASET_STD,
    }


def load_open_clip(name: str, pretrained: str | None) -> Any:
    """``open_clip.create_model(name, pretrained=...)`` that refuses to fall back to random weights."""
    import open_clip

    try:
        return open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
    except (RuntimeError, OSError) as err:
        raise OSError(
            f"CLIP score: could not load open_clip model {name!r} (pretrained={pretrained!r}): {err}. Offline, pass "
            "the weights as a local file (pretrained='/path/open_clip_model.safetensors') or a downloaded "
            "repository as path='local-dir:/folder'."
        ) from err


@register("clip_score")
class CLIPScore(ModelReward):
    """CLIP score reward, differentiable.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; scores are float32.
        path: hub id or local folder of a ``CLIPModel`` (default OpenAI ViT-L/14), or an open_clip identifier
            ``hf-hub:org/repo`` / ``local-dir:/folder`` (then the open_clip backend is used).
        tokenizer_path: hub id or local folder of its tokenizer; ``None`` uses ``path`` (transformers only).
        scale: the weight ``w`` in ``w * cos`` (100 as torchmetrics; 2.5 for Hessel's CLIPScore; 1 for MixGRPO's
            plain cosine).
        clamp: clamp each score at 0 (kills the gradient of negatively aligned images).
        revision: hub revision (branch, tag or commit) of ``path`` when it is a hub id (and of the tokenizer when
            it comes from the same repository); ignored for a local path; transformers only.
        model: an open_clip model: ``"open_clip:<name>"`` with a name from ``open_clip.list_models()``, a model
            config ``.json``, or ``hf-hub:``/``local-dir:`` identifier. ``None`` (default): transformers backend.
        pretrained: for a built-in open_clip name, a pretrained tag (``"dfn5b"``) or a local weights file.
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
        model: str | os.PathLike | None = None,
        pretrained: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.path = os.fspath(path)
        self.open_clip = self._open_clip_spec(model, pretrained)
        if self.open_clip is not None and (tokenizer_path is not None or revision is not None):
            raise ValueError(
                "clip_score: tokenizer_path= and revision= apply to transformers models only; an open_clip model "
                "uses open_clip.get_tokenizer and its own files (pin a revision by downloading it and passing "
                "path='local-dir:/folder')."
            )
        self.tokenizer_path = os.fspath(tokenizer_path) if tokenizer_path is not None else self.path
        self.pretrained = os.fspath(pretrained) if pretrained is not None else None
        self.scale = float(scale)
        self.clamp = bool(clamp)
        self.revision = revision

    def _open_clip_spec(self, model: str | os.PathLike | None, pretrained: str | os.PathLike | None) -> str | None:
        """The open_clip model identifier when this reward uses open_clip, else ``None`` (transformers)."""
        if model is not None:
            if self.path != CLIP_SCORE_MODEL:
                raise ValueError(
                    f"clip_score: pass either model={os.fspath(model)!r} or path={self.path!r}, not both."
                )
            return os.fspath(model)
        if is_open_clip_location(self.path):
            return self.path
        if pretrained is not None:
            raise ValueError(
                "clip_score: pretrained= selects open_clip weights; name the open_clip model too, e.g. "
                "model='open_clip:ViT-H-14-quickgelu', pretrained='dfn5b'."
            )
        return None

    def weights_key(self) -> tuple:
        if self.open_clip is not None:
            return ("open_clip", self.open_clip, self.pretrained)
        return (self.path, self.revision, self.tokenizer_path)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        if self.open_clip is not None:
            return self._build_open_clip(device, dtype)
        model = freeze(hf_clip.load_clip_model(self.path, "CLIP score model", self.revision), device, dtype)
        tokenizer_revision = self.revision if self.tokenizer_path == self.path else None
        return model, hf_clip.load_tokenizer(self.tokenizer_path, "CLIP score tokenizer", tokenizer_revision)

    def _build_open_clip(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        import open_clip

        name = open_clip_name(self.open_clip)
        model = load_open_clip(name, open_clip_pretrained(name, self.pretrained))
        return freeze(model, device, dtype), open_clip.get_tokenizer(name)

    def _score_with(self, bundle: tuple[Any, Any], images: Tensor, prompts: list[str] | None) -> Tensor:
        model, tokenizer = bundle
        if self.open_clip is not None:
            pixels = open_clip_preprocess(images, model_preprocess_cfg(model), dtype=self.dtype)
            image_emb = F.normalize(model.encode_image(pixels).float(), dim=-1)
            text_emb = F.normalize(model.encode_text(tokenizer(prompts).to(images.device)).float(), dim=-1)
        else:
            image_emb = hf_clip.image_embeddings(model, clip_preprocess(images, dtype=self.dtype))
            text_emb = hf_clip.text_embeddings(model, tokenizer, prompts, images.device)
        scores = self.scale * (image_emb * text_emb).sum(-1)
        return scores.clamp_min(0.0) if self.clamp else scores
