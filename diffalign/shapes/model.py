"""The shipped shapes base model: its architecture, a training-time attention shortcut, and its evaluation.

The model is a real ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` (MMDiT) on the 16x16x4 latents of
a tiny ``AutoencoderKL`` (32x32 RGB images), two tiny ``CLIPTextModelWithProjection`` encoders behind the real
CLIP BPE tokenizer (context length 16, enough for every caption of the grammar), no T5 (``text_encoder_3=None``:
the pipeline then feeds ``max_sequence_length`` zero tokens in the T5 slot) and a ``FlowMatchEulerDiscreteScheduler``.

:class:`RepeatedContextAttnProcessor` makes training cheap: the pipeline's T5 slot holds 256 *identical* zero
tokens (SD3 has no positional embedding on text tokens, so they stay identical through every block), and attending
to ``k`` identical keys equals attending to one of them with ``log k`` added to its logit. Training with one zero
token and that bias computes exactly the function the pipeline runs with 256.

:func:`evaluate_base_model` is the accuracy protocol shared by the training script, the demo and the benchmarks:
ODE samples through :func:`diffalign.samplers.rollout`, scored by the shapes verifier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def log(message: str) -> None:
    """A timestamped progress line of the training scripts."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: T201


def warmup_cosine_lr(step: int, lr: float, warmup: int, steps: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def earlier_stages(init_from: str | None, recipe_file: str, takes: str) -> list[dict[str, Any]]:
    """The recipes (``args`` and ``step``) of the training stages before one started ``--init-from`` a folder
    holding ``recipe_file``, oldest first; ``takes`` names such a folder in the error."""
    if not init_from:
        return []
    path = Path(init_from) / recipe_file
    if not path.is_file():
        raise SystemExit(f"{path} is missing: --init-from takes {takes}")
    previous = json.loads(path.read_text())
    return previous.get("earlier_stages", []) + [{"args": previous["args"], "step": previous["step"]}]


BASE_MODEL_DIR = Path(__file__).parent / "assets" / "base_model"
"""The shipped base model (a diffusers folder)."""

EVAL_FILE = "diffalign_eval.json"
"""The evaluation protocol and measured accuracies, written beside the weights."""

T5_TOKENS = 256
"""Zero tokens the pipeline puts in the T5 slot (``max_sequence_length``, the pipeline's and adapter's default)."""


@dataclass
class BaseArch:
    """Sizes of the shapes base model (defaults: the shipped model)."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    text_length: int = 16
    shift: float = 1.0

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def _text_encoder(arch: BaseArch, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffalign.tokenizer import CLIP_VOCAB_SIZE

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_hidden * 4,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=4,
        max_position_embeddings=arch.text_length,
        projection_dim=arch.text_hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config).eval()
    # Frozen random features: unit-scale token and position embeddings (CLIP's init gives 0.02), so that distinct
    # words and positions give clearly distinct hidden states.
    embeddings = model.text_model.embeddings
    with torch.no_grad():
        embeddings.token_embedding.weight.normal_(0.0, 1.0)
        embeddings.position_embedding.weight.normal_(0.0, 0.5)
    return model


def _vae(arch: BaseArch, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        norm_num_groups=16,
        latent_channels=arch.latent_channels,
        sample_size=arch.image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def _transformer(arch: BaseArch, seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=arch.latent_size,
        patch_size=arch.patch_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        num_layers=arch.num_layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.num_heads,
        joint_attention_dim=2 * arch.text_hidden,  # the two CLIP encoders' hidden states, concatenated
        caption_projection_dim=arch.num_heads * arch.head_dim,
        pooled_projection_dim=2 * arch.text_hidden,
        pos_embed_max_size=arch.latent_size // arch.patch_size,
    )


def _null_t5(arch: BaseArch, vocab_size: int, seed: int):
    """A one-layer ``T5EncoderModel`` whose output is exactly zero (its final RMS norm has zero weight).

    The SD3 pipeline only runs without T5 when ``text_encoder_3=None`` is passed to ``from_pretrained``; this
    stand-in makes the folder load as is while computing what the pipeline computes without T5 (zero tokens).
    """
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=2 * arch.text_hidden,  # the joint attention width of the CLIP features
        d_kv=8,
        d_ff=16,
        num_layers=1,
        num_heads=1,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model


def _word_tokenizer(max_length: int = T5_TOKENS):
    """A word-level tokenizer of the caption grammar for the T5 slot (any other word is ``<unk>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from diffalign.shapes.scenes import COLOURS, COUNT_WORDS, SHAPES

    words = ["a", "and", "to", "the", "left", "right", "of", "above", "below", *COLOURS, *COUNT_WORDS]
    words += [*SHAPES, *(shape + "s" for shape in SHAPES)]
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_base_pipeline(
    arch: BaseArch, seed: int = 0, tokenizer_dir: str | os.PathLike | None = None, text_seed: int | None = None
):
    """A randomly initialised shapes base pipeline (``StableDiffusion3Pipeline``, fp32, CPU).

    Args:
        arch: the sizes.
        seed: seeds every component's initialisation.
        tokenizer_dir: where the CLIP tokenizer files are written (a temporary folder by default).
        text_seed: seeds the (frozen, random) CLIP text encoders instead of ``seed``.
    """
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from diffalign.tokenizer import build_clip_tokenizer

    folder = tokenizer_dir or tempfile.mkdtemp(prefix="diffalign-shapes-tokenizer-")
    tokenizer = build_clip_tokenizer(folder, model_max_length=arch.text_length)
    t5_tokenizer = _word_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=_transformer(arch, seed + 3),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=arch.shift),
        vae=_vae(arch, seed),
        text_encoder=_text_encoder(arch, (seed if text_seed is None else text_seed) + 1),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(arch, (seed if text_seed is None else text_seed) + 2),
        tokenizer_2=tokenizer,
        text_encoder_3=_null_t5(arch, len(t5_tokenizer), seed + 4),
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_base_pipeline(pipe, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` with the transformer stored in fp16 (diffusers loads it back as fp32) and the CLIP
    tokenizers as ``vocab.json`` + ``merges.txt`` (1.5 MB rather than a 3.6 MB ``tokenizer.json``)."""
    import copy

    from diffalign.tokenizer import write_clip_tokenizer_files

    folder = Path(folder)
    pipe.save_pretrained(folder)
    copy.deepcopy(pipe.transformer).half().save_pretrained(folder / "transformer")
    for name in ("tokenizer", "tokenizer_2"):
        (folder / name / "tokenizer.json").unlink(missing_ok=True)
        write_clip_tokenizer_files(folder / name)
    return folder


def arch_dict(arch: BaseArch) -> dict[str, Any]:
    """JSON-friendly sizes (tuples as lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(arch).items()}


# ------------------------------------------------------------------------------------------- training shortcut


class RepeatedContextAttnProcessor:
    """``JointAttnProcessor2_0`` where the *last* context token stands for ``repeats`` identical tokens.

    Adds ``log(repeats)`` to that key's logit, which is exactly attention over ``repeats`` copies of it. Use it
    only in training; the pipeline's default processor with the copies computes the same outputs.
    """

    def __init__(self, repeats: int) -> None:
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor, attention_mask=None, **kwargs):
        batch, num_image = hidden_states.shape[:2]

        def heads(x: Tensor) -> Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = torch.cat([heads(attn.to_q(hidden_states)), heads(attn.add_q_proj(encoder_hidden_states))], 2)
        key = torch.cat([heads(attn.to_k(hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))], 2)
        value = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], 2)
        bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
        bias[-1] = self.log_repeats
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias[None, :])
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[-1] * attn.heads)
        image_out, context_out = out[:, :num_image], out[:, num_image:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](image_out)), context_out


def use_repeated_context(transformer, repeats: int | None) -> None:
    """Switch ``transformer`` to :class:`RepeatedContextAttnProcessor` (``repeats``) or back (``None``)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(
        JointAttnProcessor2_0() if repeats is None else RepeatedContextAttnProcessor(repeats)
    )


# ------------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalProtocol:
    """How the base model's accuracies are measured (stored in ``diffalign_eval.json``)."""

    num_steps: int = 20
    guidance_scale: float = 4.5
    single_images_per_prompt: int = 20
    heldout_images_per_prompt: int = 4
    seed: int = 0
    chunk_size: int = 64


def _strict_accuracy(adapter, prompts: list[str], per_prompt: int, protocol: EvalProtocol, seed: int) -> float:
    import rewards
    from diffalign.samplers.plan import ode_plan
    from diffalign.samplers.rollout import rollout

    verifier = rewards.load("shapes")
    traj = rollout(
        adapter,
        prompts,
        ode_plan(protocol.num_steps),
        num_images_per_prompt=per_prompt,
        guidance_scale=protocol.guidance_scale,
        seeds=seed,
        chunk_size=protocol.chunk_size,
    )
    _, strict = verifier.evaluate(traj.images.clamp(0, 1), traj.prompts)
    return strict.float().mean().item()


def null_t5(pipe) -> bool:
    """True when ``pipe`` has a T5 slot whose tokens are all zeros: no ``text_encoder_3``, or :func:`_null_t5`."""
    if not hasattr(pipe, "text_encoder_3"):
        return False
    encoder = pipe.text_encoder_3
    if encoder is None:
        return True
    norm = getattr(getattr(encoder, "encoder", None), "final_layer_norm", None)
    return norm is not None and not bool(norm.weight.any())


@contextlib.contextmanager
def repeated_context_sampling(adapter) -> Iterator[None]:
    """Sample an SD3 adapter whose T5 slot is all zeros as if with one zero token (the same images, faster).

    Such a pipeline (see :func:`null_t5`) feeds ``max_sequence_length`` identical zero tokens; this context feeds
    one, with :class:`RepeatedContextAttnProcessor` standing for the rest. Other adapters are left as they are.
    """
    pipe = adapter.pipe
    repeats = getattr(adapter, "max_sequence_length", None)
    if not null_t5(pipe) or not repeats or repeats == 1:
        yield
        return
    transformer = pipe.transformer
    processors = transformer.attn_processors
    transformer.set_attn_processor(RepeatedContextAttnProcessor(repeats))
    adapter.max_sequence_length = 1
    try:
        with one_t5_token_quietly(pipe):
            yield
    finally:
        adapter.max_sequence_length = repeats
        transformer.set_attn_processor(processors)


@contextlib.contextmanager
def one_t5_token_quietly(pipe) -> Iterator[None]:
    """Silence the pipeline's per-call "truncated" warning: every prompt is cut to the one T5 token on purpose."""
    pipeline_logger = logging.getLogger(type(pipe).__module__)
    level = pipeline_logger.level
    pipeline_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pipeline_logger.setLevel(level)


@torch.no_grad()
def evaluate_base_model(model: Any = BASE_MODEL_DIR, protocol: EvalProtocol | None = None) -> dict[str, Any]:
    """Strict verifier accuracy on single-object prompts and on the held-out compositional prompts.

    Args:
        model: a diffusers folder, a pipeline or an adapter (default: the shipped base model).
        protocol: steps, guidance, images per prompt and seeds (default :class:`EvalProtocol`).

    Returns:
        ``{"single_strict", "heldout_strict", "num_single", "num_heldout", "protocol"}``.
    """
    from diffalign.adapters import load_adapter
    from diffalign.adapters.base import DiffusionAdapter
    from diffalign.shapes.scenes import heldout_prompts, prompts

    protocol = protocol or EvalProtocol()
    adapter = model if isinstance(model, DiffusionAdapter) else load_adapter(model)
    single, heldout = prompts("single", "train"), heldout_prompts()
    heldout_seed = protocol.seed + 100_000
    with repeated_context_sampling(adapter):
        single_acc = _strict_accuracy(adapter, single, protocol.single_images_per_prompt, protocol, protocol.seed)
        heldout_acc = _strict_accuracy(adapter, heldout, protocol.heldout_images_per_prompt, protocol, heldout_seed)
    return {
        "single_strict": single_acc,
        "heldout_strict": heldout_acc,
        "num_single": len(single) * protocol.single_images_per_prompt,
        "num_heldout": len(heldout) * protocol.heldout_images_per_prompt,
        "protocol": asdict(protocol) | {"heldout_seed": heldout_seed, "sampler": "ode_plan (Euler)"},
    }


def write_eval(folder: str | os.PathLike, results: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``results`` (and ``extra``, e.g. the training recipe) to ``folder/diffalign_eval.json``."""
    path = Path(folder) / EVAL_FILE
    path.write_text(json.dumps(results | (extra or {}), indent=2) + "\n")
    return path
