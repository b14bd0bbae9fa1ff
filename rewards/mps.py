"""MPS, the Multi-dimensional Preference Score (Zhang et al., CVPR 2024), docs/rewards.md#mps.

Architecture (facts from the published code, github.com/Kwai-Kolors/MPS ``trainer/models``; rebuilt here):

- a ``transformers.CLIPModel`` ViT-H/14 (config of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, 1024-d projections)
  giving *token* features: the text projection of every last-hidden text token (after ``final_layer_norm``) plus the
  projection of the pooled end-of-text token, and the visual projection of every vision token of the last hidden
  state, i.e. **before** ``post_layernorm`` (the CLS-only post norm is skipped);
- a condition mask over the text tokens: for each prompt token the largest raw dot product with any token of the
  condition text, divided by its largest value; tokens at or below ``threshold`` are hidden;
- a cross model of ``layers`` blocks, each a residual cross-attention (queries = image tokens, keys/values = the
  masked text tokens through one shared key/value head, i.e. multi-query; pre-LayerNorm; a parallel SwiGLU
  feed-forward on the normed queries) followed by a residual PaLM-style parallel block (rotary multi-query
  self-attention and a SwiGLU feed-forward from one fused projection);
- score ``exp(logit_scale) * cos(cross output at position 0, pooled text feature)``.

Deviations from the reference code, on purpose:

- threshold: training (``CLIPModel.forward``, and its README example that calls it) uses 0.01, the evaluation scripts
  that produced the published accuracies (``eval_overall_mps_on_{hpdv2,imagereward}.py``) use 0.3. The default is 0.3,
  the setting whose numbers the paper/README report; ``threshold=0.01`` gives the training-time mask.
- normalising max: the reference divides by the maximum over the **whole batch**, so an image's score depends on the
  other prompts in its batch. The evaluation scripts score one prompt at a time, where batch max = sample max; here
  the maximum is always taken per sample, which equals the evaluation scripts' values at any batch size.
- the best-matching prompt token is always kept, so the attention never sees an all-hidden row (NaN). This changes
  nothing when that token's similarity is positive (its ratio is 1 > threshold), the only case the reference handles.
- the reference runs the whole model in fp16; here it runs in ``dtype`` with the mask and the final cosine in float32.

Preprocessing: the LAION ViT-H/14 ``CLIPImageProcessor`` (shortest edge 224, bicubic, centre crop with the HF floor
rule, OpenAI mean/std), in torch. Text: the LAION tokenizer padded to 77 tokens (``padding="max_length"``) with no
attention mask, as in the reference; padding tokens are part of the cross-attention context, so the tokenizer's pad
token matters (LAION's is ``!``).

Weights: the released ``MPS_overall_checkpoint.pth`` is a pickled ``nn.Module``: loading it runs code from the file.
It is never unpickled here; this reward loads a state dict from ``.safetensors`` or from a ``.pth``/``.bin`` that
``torch.load(weights_only=True)`` accepts, in the published key layout (``model.*`` for the CLIP model,
``cross_model.*``). docs/rewards.md#mps shows the one-off conversion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards import hf_clip
from rewards.model import ModelReward, WeightFile, choose_sha256, freeze, from_pretrained, resolve_file
from rewards.preprocess import clip_preprocess
from rewards.registry import register


# A safetensors copy of the overall checkpoint: imscore's ``MPS`` (PyTorchModelHubMixin) saved with the key prefix
# ``mps.`` (github.com/RE-N-Y/imscore, src/imscore/mps/model.py).
MPS_REPO = "RE-N-Y/mpsv1"
MPS_FILENAME = "model.safetensors"
MPS_CLIP_CONFIG = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# The condition text of the released (overall) checkpoint, from the MPS README and evaluation scripts.
OVERALL_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, instance, "
    "texture, quantity, attributes, position, number, location, word, things."
)
CONDITIONS = {"overall": OVERALL_CONDITION}
DEFAULT_THRESHOLD = 0.3
# Key prefixes of known re-saves (DDP wrappers, imscore's ``MPS`` module holding the model as ``self.mps``).
_KEY_PREFIXES = ("module.", "mps.")


# --- cross model -----------------------------------------------------------------------------------------------------


class LayerNormNoBias(nn.Module):
    """LayerNorm with a learned scale and a fixed zero bias, kept as a (saved) buffer as in the published model."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Residual(nn.Module):
    """``fn(x, ...) + x``; the ``fn`` attribute gives the published ``...layers.{i}.{j}.fn.*`` key names."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        return self.fn(x, *args) + x


class SwiGLU(nn.Module):
    """``silu(gate) * x`` with ``x, gate`` the two halves of the last dimension (Shazeer, 2020)."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class RotaryEmbedding(nn.Module):
    """Rotary position angles (Su et al., 2021) for ``dim``-wide heads.

    ``inv_freq`` is kept as a buffer because the published state dict holds it (strict loading), but the angles are
    computed from float32 frequencies: a bf16 model casts the buffer too, and bf16 frequencies put the angle of
    position 256 off by ~0.03 rad (bf16 angles by up to 0.5 rad).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", self._frequencies(torch.device("cpu")))

    def _frequencies(self, device: torch.device) -> Tensor:
        return 1.0 / (10000 ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def forward(self, length: int, device: torch.device) -> Tensor:
        """Angles ``[length, dim]`` float32: position times frequency, the frequencies repeated for both halves.

        Always float32, whatever the model's dtype (see the class docstring).
        """
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = torch.outer(positions, self._frequencies(device))
        return torch.cat((angles, angles), dim=-1)


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(angles: Tensor, x: Tensor) -> Tensor:
    """Rotate ``x [..., n, d]`` by ``angles [n, d]`` float32: cos and sin are taken in float32, then cast to ``x``'s
    dtype (a bf16 angle of ~256 rad is off by up to half a radian)."""
    cos, sin = angles.float().cos().to(x.dtype), angles.float().sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


class CrossAttention(nn.Module):
    """Pre-LN multi-query cross-attention with a parallel SwiGLU feed-forward (without the residual).

    Queries ``[B, N, dim]`` attend, in ``heads`` heads, to a context ``[B, L, dim]`` through one shared key/value head
    of width ``dim_head``; ``mask [B, 1, L]`` is added to the logits (0 or ``-inf``). Returns
    ``to_out(attention) + ff(norm(x))``, ``[B, N, dim]``.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.norm = LayerNormNoBias(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * ff_mult * dim, bias=False), SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False)
        )

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        batch, length, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(batch, length, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(context).unsqueeze(1).expand(-1, self.heads, -1, -1).chunk(2, dim=-1)
        attn_mask = mask.unsqueeze(1).to(q.dtype)  # [B, 1, 1, L], broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.dim_head**-0.5)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1)) + self.ff(x)


class ParallelTransformerBlock(nn.Module):
    """PaLM-style parallel block (without the residual): ``attn_out(rotary self-attention) + ff_out(SwiGLU)``.

    One fused projection of the normed input gives the queries (``heads`` heads), a single shared key and value head
    (multi-query) and the feed-forward input; no attention mask. ``[B, N, dim] -> [B, N, dim]``.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.fused_dims = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.norm = LayerNormNoBias(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.fused_dims, dim=-1)
        q = q.view(batch, length, self.heads, self.dim_head).transpose(1, 2)
        angles = self.rotary_emb(length, x.device)
        q, k = apply_rotary(angles, q), apply_rotary(angles, k)
        k, v = (t.unsqueeze(1).expand(-1, self.heads, -1, -1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head**-0.5)
        return self.attn_out(out.transpose(1, 2).reshape(batch, length, -1)) + self.ff_out(ff)


class CrossModel(nn.Module):
    """``layers`` x (residual cross-attention to the text, residual parallel self-attention block).

    The published model uses ``dim=1024, layers=4, heads=16, dim_head=64, ff_mult=4``.
    """

    def __init__(self, dim: int, layers: int = 4, heads: int = 16, dim_head: int = 64, ff_mult: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                    Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult)),
                ]
            )
            for _ in range(layers)
        )

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, mask: Tensor) -> Tensor:
        """``image_tokens [B, N, dim]``, ``text_tokens [B, L, dim]``, ``mask [B, 1, L]`` -> ``[B, N, dim]``."""
        x = image_tokens
        for cross_attention, self_attention in self.layers:
            x = self_attention(cross_attention(x, text_tokens, mask))
        return x


def cross_model_shape(state: dict[str, Tensor]) -> dict[str, int]:
    """``CrossModel`` arguments read off a state dict's shapes (so a checkpoint of another size loads strictly)."""
    prefix = "cross_model.layers."
    layers = 1 + max((int(key[len(prefix) :].split(".")[0]) for key in state if key.startswith(prefix)), default=-1)
    if layers == 0:
        raise KeyError(f"MPS checkpoint: no '{prefix}*' keys; it holds e.g. {sorted(state)[:5]}")
    to_q = state[prefix + "0.0.fn.to_q.weight"]
    dim_head = state[prefix + "0.0.fn.to_kv.weight"].shape[0] // 2
    dim = to_q.shape[1]
    ff_mult = state[prefix + "0.0.fn.ff.0.weight"].shape[0] // (2 * dim)
    return {"dim": dim, "layers": layers, "heads": to_q.shape[0] // dim_head, "dim_head": dim_head, "ff_mult": ff_mult}


# --- condition mask and the full model -------------------------------------------------------------------------------


def condition_mask(text_tokens: Tensor, condition_tokens: Tensor, threshold: float) -> Tensor:
    """Additive attention mask hiding the prompt tokens unrelated to the condition.

    For prompt token ``i``: ``s_i = max_j <text_i, condition_j>`` (raw projected features, every token including
    padding), ``r_i = s_i / max_i s_i`` per sample; the token is kept (0) when ``r_i > threshold``, else hidden
    (``-inf``). The best token is always kept (see the module docstring).

    Args:
        text_tokens: ``[B, L, D]`` projected prompt tokens.
        condition_tokens: ``[B or 1, Lc, D]`` projected condition tokens.
        threshold: the ratio a token must exceed to be kept, in [0, 1).

    Returns:
        Float32 mask ``[B, 1, L]`` of zeros and ``-inf``.
    """
    similarity = torch.einsum(
        "bid,bjd->bij", text_tokens.float(), condition_tokens.float().expand(len(text_tokens), -1, -1)
    )
    best = similarity.amax(dim=-1)  # [B, L]
    top = best.amax(dim=-1, keepdim=True)  # per sample, not over the batch
    keep = (best / top > threshold) | (best == top)
    zeros = torch.zeros_like(best)
    return torch.where(keep, zeros, torch.full_like(best, float("-inf"))).unsqueeze(1)


class MPSModel(nn.Module):
    """The CLIP model (``model``) and the condition cross model (``cross_model``), in the published key layout.

    Args:
        config: the ``CLIPConfig`` of the backbone.
        layers, heads, dim_head, ff_mult: the cross model's shape; its width is ``config.projection_dim``.
    """

    def __init__(self, config: Any, layers: int = 4, heads: int = 16, dim_head: int = 64, ff_mult: int = 4) -> None:
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(config)
        self.cross_model = CrossModel(config.projection_dim, layers, heads, dim_head, ff_mult)

    def text_features(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Projected features of every token ``[B, L, D]`` and of the end-of-text token ``[B, D]``.

        No attention mask (as the reference). The end-of-text token is found by ``argmax`` of the ids, the pooling of
        transformers 4.27 the checkpoint was trained with (the end-of-text id is the largest CLIP id).
        """
        hidden = self.model.text_model(input_ids=input_ids).last_hidden_state
        tokens = self.model.text_projection(hidden)
        eos = tokens[torch.arange(len(tokens), device=tokens.device), input_ids.argmax(dim=-1)]
        return tokens, eos

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected features of every vision token ``[B, 1 + patches, D]``, taken before ``post_layernorm``."""
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).last_hidden_state)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, condition_ids: Tensor, threshold: float) -> Tensor:
        """Float32 scores ``[B]`` of pixel values ``[B, 3, S, S]`` against prompt ids ``[B, L]`` under condition ids
        ``[1 or B, Lc]``."""
        text_tokens, text_eos = self.text_features(input_ids)
        condition_tokens, _ = self.text_features(condition_ids)
        mask = condition_mask(text_tokens, condition_tokens, threshold)
        fused = self.cross_model(self.image_features(pixel_values), text_tokens, mask)[:, 0]
        cosine = (F.normalize(fused.float(), dim=-1) * F.normalize(text_eos.float(), dim=-1)).sum(-1)
        return self.model.logit_scale.float().exp() * cosine


# --- weights ---------------------------------------------------------------------------------------------------------


def load_mps_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an MPS state dict from ``.safetensors`` or a ``torch.load(weights_only=True)`` file, keys normalised.

    Known prefixes (``module.``, imscore's ``mps.``) are removed and the ``position_ids`` buffers that
    transformers < 4.31 saved are dropped (they are the constant ``arange`` the model rebuilds itself).

    Raises:
        ValueError: the file is a pickled module (the released ``.pth``), or holds no tensor mapping.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises pickle's UnpicklingError; pickle itself is not imported here
            if type(err).__name__ != "UnpicklingError":
                raise
            raise ValueError(
                f"MPS checkpoint {path} is not a plain state dict (torch.load(weights_only=True) refused it: it is "
                "probably the released pickled nn.Module, which only loads by running code from the file). Convert "
                "it once, in an environment you trust, to a safetensors state dict (docs/rewards.md#mps) and pass "
                "that file as path=."
            ) from err
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"MPS checkpoint {path}: expected a mapping of names to tensors, got {type(state).__name__}")
    return normalise_keys(state)


def normalise_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip known wrapper prefixes and drop legacy ``position_ids`` buffers (see :func:`load_mps_state`)."""
    out = {}
    for key, value in state.items():
        for prefix in _KEY_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.endswith("embeddings.position_ids"):
            out[key] = value
    return out


def resolve_condition(condition: str) -> str:
    """A named condition (``"overall"``) or the condition text itself."""
    if not isinstance(condition, str) or not condition.strip():
        raise ValueError(
            f"MPS condition must be a name in {sorted(CONDITIONS)} or a non-empty text; got {condition!r}"
        )
    return CONDITIONS.get(condition, condition)


@register("mps")
class MPS(ModelReward):
    """MPS reward (overall preference), differentiable.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; scores are float32.
        path: the state dict: a ``.safetensors``/``.pth``/``.bin`` file, a folder holding ``filename``, or a hub id
            (default ``RE-N-Y/mpsv1``, imscore's safetensors copy of the overall checkpoint).
        filename: the checkpoint's name inside a folder or hub repository.
        config_path: hub id or local folder whose ``config.json`` gives the ``CLIPConfig`` (LAION ViT-H/14); only
            the configuration is read, all weights come from ``path``.
        tokenizer_path: hub id or local folder of the CLIP tokenizer; ``None`` uses ``config_path``.
        condition: ``"overall"`` (the released checkpoint's condition) or any condition text.
        threshold: condition-mask threshold, in [0, 1): 0.3 as the published evaluation, 0.01 as training.
        revision: hub revision (branch, tag or commit) of ``path`` when it is a hub id; ignored for a local path.
        verify: hash the checkpoint before loading and refuse a SHA-256 mismatch (docs/rewards.md#verifying-weights).
        sha256: its expected SHA-256 (needed with ``verify=True``: no published digest is known here).
    """

    name = "mps"
    differentiable = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = MPS_REPO,
        filename: str = MPS_FILENAME,
        config_path: str | os.PathLike = MPS_CLIP_CONFIG,
        tokenizer_path: str | os.PathLike | None = None,
        condition: str = "overall",
        threshold: float = DEFAULT_THRESHOLD,
        revision: str | None = None,
        verify: bool = False,
        sha256: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verify=verify)
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"MPS threshold must lie in [0, 1) (0.3 evaluation, 0.01 training); got {threshold}")
        self.path = os.fspath(path)
        self.filename = filename
        self.config_path = os.fspath(config_path)
        self.tokenizer_path = os.fspath(tokenizer_path) if tokenizer_path is not None else self.config_path
        self.condition = resolve_condition(condition)
        self.threshold = float(threshold)
        self.revision = revision
        self.sha256 = choose_sha256(sha256, None, self.verify, "MPS checkpoint")

    def _checkpoint(self) -> Path:
        return resolve_file(self.path, self.filename, "MPS checkpoint", self.revision)

    def weight_files(self) -> list[WeightFile]:
        return [WeightFile(self._checkpoint(), self.sha256, "MPS checkpoint")]

    def weights_key(self) -> tuple:
        return (self.path, self.filename, self.revision, self.config_path, self.tokenizer_path)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[MPSModel, Any]:
        from transformers import CLIPConfig

        checkpoint = self._checkpoint()
        state = load_mps_state(checkpoint)
        config = from_pretrained(CLIPConfig, self.config_path, "MPS CLIP config")
        shape = cross_model_shape(state)
        if shape.pop("dim") != config.projection_dim:
            raise ValueError(
                f"MPS checkpoint {checkpoint} has a cross model of width {cross_model_shape(state)['dim']} but the "
                f"CLIP config at {self.config_path!r} projects to {config.projection_dim}; pass the matching "
                "config_path."
            )
        with torch.device(device):  # initialise on the target device: the random init is overwritten anyway
            model = MPSModel(config, **shape)
        model.load_state_dict(state, strict=True)
        tokenizer = hf_clip.load_tokenizer(self.tokenizer_path, "MPS tokenizer")
        return freeze(model, device, dtype), tokenizer

    def tokenize(self, tokenizer: Any, texts: list[str], model: MPSModel, device: torch.device) -> Tensor:
        """Ids ``[len(texts), L]`` padded to the text model's length (77), as the reference's ``max_length``."""
        length = model.model.config.text_config.max_position_embeddings
        tokens = tokenizer(texts, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
        return tokens["input_ids"].to(device)

    def _score_with(self, bundle: tuple[MPSModel, Any], images: Tensor, prompts: list[str] | None) -> Tensor:
        model, tokenizer = bundle
        size = model.model.config.vision_config.image_size
        pixel_values = clip_preprocess(images, size=size, dtype=self.dtype)
        input_ids = self.tokenize(tokenizer, prompts, model, images.device)
        condition_ids = self.tokenize(tokenizer, [self.condition], model, images.device)
        return model(pixel_values, input_ids, condition_ids, self.threshold)
