"""ImageReward (Xu et al., 2023): BLIP image-text encoder + MLP head (docs/rewards.md#imagereward).

Model: BLIP ViT-L/16 (``visual_encoder``) and BLIP's "med" BERT with cross-attention to the image tokens
(``text_encoder``, from ``med_config.json``), then the MLP ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (no
activations) on the first text token. The ``image-reward`` wheel does not import with current transformers, so
the two encoders are rebuilt here from transformers' BLIP modules, which compute the same layers:
``BlipVisionModel`` (pre-norm ViT, final LayerNorm on every token) and ``BlipTextModel`` called with
``is_decoder=False`` (bidirectional self-attention + cross-attention, BLIP's "multimodal" mode). The checkpoint
``ImageReward.pt`` (a plain state dict with ``blip.*`` and ``mlp.*`` keys) is mapped onto them key by key; every
parameter must be found, and only the keys the reward never uses (``vision_proj``, ``text_proj``, buffers) may be
left over. The ViT's geometry is read from the checkpoint, except its head count, which it does not store
(``vision_num_heads``, 16 for ViT-L).

Score: ``(mlp(h[:, 0]) - 0.16717362830052426) / 1.0333394966054072``, ``h`` the text encoder's last hidden state;
the published normalisation puts SD1.4 images at mean 0, std 1.

Text: ``BertTokenizer`` (``bert-base-uncased``) with ``[DEC]`` as bos token and ``[ENC]`` as an extra special
token (30524 ids), ``padding="max_length", truncation=True, max_length=35``; the ids go in unchanged ([CLS] first).

Preprocessing: torchvision ``Resize(224, bicubic) + CenterCrop(224)`` (torchvision's crop offset rounding), OpenAI
mean/std, in torch.

Integrity: ``verify=True`` hashes ``ImageReward.pt`` before loading it (docs/rewards.md#verifying-weights). No
published SHA-256 is known here, so it needs ``sha256=``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rewards.aesthetic import build_head
from rewards.model import ModelReward, WeightFile, choose_sha256, freeze, from_pretrained, resolve_file
from rewards.preprocess import clip_preprocess
from rewards.registry import register


IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
# Published SHA-256 of ImageReward.pt; None = unknown (the hub's LFS pointer of THUDM/ImageReward could not be read
# from where this was written, and image-reward's loader checks none; none is guessed).
IMAGEREWARD_SHA256: str | None = None

# Checkpoint keys that ImageReward itself loads with strict=False and never uses for the score.
_UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj|itm_head)\.|position_ids$")
# BLIP/timm ViT names -> transformers BlipVisionModel names.
_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def split_checkpoint(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Split an ``ImageReward.pt`` state dict into (vision, text, head) dicts in transformers/head naming.

    Raises:
        KeyError: a key that is neither mapped nor one of the known unused ones.
    """
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION_RENAMES:
                name, count = re.subn(pattern, replacement, name)
                if count:
                    vision[name] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder.") and not _UNUSED_KEYS.search(key):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        elif not _UNUSED_KEYS.search(key):
            unknown.append(key)
    if unknown:
        raise KeyError(f"ImageReward checkpoint: unexpected keys {unknown[:10]}")
    return vision, text, head


def vision_config(vision: dict[str, Tensor], num_heads: int) -> Any:
    """A ``BlipVisionConfig`` whose geometry is read from the mapped ViT weights (LayerNorm eps 1e-6, as BLIP)."""
    from transformers import BlipVisionConfig

    width, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
    num_patches = vision["embeddings.position_embedding"].shape[1] - 1
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        image_size=int(round(num_patches**0.5)) * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )


def text_config(med_config: dict[str, Any], encoder_width: int) -> Any:
    """A ``BlipTextConfig`` from BLIP's ``med_config.json`` (``encoder_width`` overwritten, as BLIP does)."""
    from transformers import BlipTextConfig

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    keys += ("max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    kwargs = {k: med_config[k] for k in keys if k in med_config}
    # Special-token ids only matter for generation; BlipTextConfig's defaults (30522, 102) would not fit a
    # smaller vocabulary, so they come from med_config or stay unset.
    for key in ("bos_token_id", "eos_token_id", "sep_token_id"):
        kwargs[key] = med_config.get(key)
    # is_decoder=True only makes transformers create the cross-attention layers; the forward pass uses
    # is_decoder=False (bidirectional), BLIP's "multimodal" encoder mode.
    return BlipTextConfig(
        **kwargs,
        encoder_hidden_size=encoder_width,
        is_decoder=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load ``state`` into ``module``, refusing missing parameters and unexpected keys."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise KeyError(f"{what}: missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}")


def load_tokenizer(location: str | os.PathLike) -> Any:
    """ImageReward's tokenizer: ``BertTokenizer`` + ``[DEC]`` bos + ``[ENC]`` extra special token."""
    from transformers import BertTokenizer

    tokenizer = from_pretrained(BertTokenizer, location, "ImageReward tokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@register("imagereward")
class ImageReward(ModelReward):
    """ImageReward v1.0 reward, differentiable.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; the head and the scores are float32.
        path: the checkpoint: ``ImageReward.pt``, a folder holding it, or a hub repository id.
        med_config: BLIP's ``med_config.json``; ``None`` looks next to the checkpoint (same folder or repository).
        tokenizer_path: hub id or local folder of the ``bert-base-uncased`` tokenizer (``vocab.txt``).
        vision_num_heads: attention heads of the ViT (16 for ViT-L; the checkpoint does not store it).
        revision: hub revision (branch, tag or commit) of ``path`` when it is a hub id, also used for the
            ``med_config`` found there; ignored for a local path.
        verify: hash ``ImageReward.pt`` before loading and refuse a SHA-256 mismatch.
        sha256: its expected SHA-256 (needed with ``verify=True``: no published digest is known).
    """

    name = "imagereward"
    differentiable = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = IMAGEREWARD_REPO,
        med_config: str | os.PathLike | None = None,
        tokenizer_path: str | os.PathLike = IMAGEREWARD_TOKENIZER,
        vision_num_heads: int = 16,
        revision: str | None = None,
        verify: bool = False,
        sha256: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verify=verify)
        self.path = os.fspath(path)
        self.med_config = None if med_config is None else os.fspath(med_config)
        self.tokenizer_path = os.fspath(tokenizer_path)
        self.vision_num_heads = int(vision_num_heads)
        self.revision = revision
        self.sha256 = choose_sha256(sha256, IMAGEREWARD_SHA256, self.verify, "ImageReward checkpoint")

    def weights_key(self) -> tuple:
        return (self.path, self.revision, self.med_config, self.tokenizer_path, self.vision_num_heads)

    def _checkpoint(self) -> Path:
        return resolve_file(self.path, IMAGEREWARD_FILE, "ImageReward checkpoint", self.revision)

    def weight_files(self) -> list[WeightFile]:
        return [WeightFile(self._checkpoint(), self.sha256, "ImageReward checkpoint")]

    def _med_config_path(self) -> Path:
        if self.med_config is not None:
            return resolve_file(self.med_config, MED_CONFIG_FILE, "ImageReward med_config")
        if Path(self.path).expanduser().is_file():
            return resolve_file(Path(self.path).expanduser().parent, MED_CONFIG_FILE, "ImageReward med_config")
        return resolve_file(self.path, MED_CONFIG_FILE, "ImageReward med_config", self.revision)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, nn.Module, Any]:
        from transformers import BlipTextModel, BlipVisionModel

        state = torch.load(self._checkpoint(), map_location="cpu", weights_only=True)
        vision_state, text_state, head_state = split_checkpoint(dict(state))
        med = json.loads(self._med_config_path().read_text())
        vision = BlipVisionModel(vision_config(vision_state, self.vision_num_heads))
        load_strict(vision, vision_state, "ImageReward visual encoder")
        text = BlipTextModel(text_config(med, vision.config.hidden_size), add_pooling_layer=False)
        load_strict(text, text_state, "ImageReward text encoder")
        head = build_head(head_state)
        tokenizer = load_tokenizer(self.tokenizer_path)
        return (
            freeze(vision, device, dtype),
            freeze(text, device, dtype),
            freeze(head, device, torch.float32),
            tokenizer,
        )

    def _score_with(
        self, bundle: tuple[Any, Any, nn.Module, Any], images: Tensor, prompts: list[str] | None
    ) -> Tensor:
        vision, text, head, tokenizer = bundle
        pixels = clip_preprocess(images, crop_rounding="round", dtype=self.dtype)
        image_tokens = vision(pixel_values=pixels).last_hidden_state
        tokens = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt"
        ).to(images.device)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=images.device)
        hidden = text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        raw = head.layers(hidden[:, 0].float()).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
