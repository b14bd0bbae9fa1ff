"""Activation memory of the denoiser, the VAE and reward towers, measured on the meta device.

Each measurement runs the real module (built from its config, LoRA applied as the trainer applies it) on meta
tensors of the real shapes under a :class:`~diffalign.planning.tracking.StorageTracker`: nothing is computed or
allocated, but every tensor an op would create is counted, so the peak is that of the real call -- what autograd
saves for backward, the temporaries of each op, the gradients backward produces -- for the module as diffusers
implements it. Two stand-ins keep it faithful to a GPU run:

- attention runs as a flash/memory-efficient kernel does (SDPA on a GPU, and on the CPU): it keeps ``q, k, v``, the
  output and a float32 log-sum-exp ``[B, heads, L]`` for backward, never the ``L x L`` matrix (on the meta device
  PyTorch would pick the math kernel, which materialises it);
- gradients of the trained parameters exist before the call (a steady-state step accumulates into them), so the
  backward's own temporaries are what is counted.

Costs are measured for one row (one image, one CFG half) and scaled by the row count: every activation of these
models is per sample (the few that are not, e.g. rotary tables, are a few MB). Identical blocks repeat (57 in
FLUX.1-dev): the model with each run of identical blocks cut to :data:`KEPT` blocks is measured, then again with one
more block in the runs of one kind (same block, same input shapes), and the difference times the number of blocks
left out is added. It equals the whole model's measurement for the shipped architectures in every mode and is
several times faster on the meta device, whose kernels run in Python; it is used where it saves work.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.planning.tracking import StorageTracker


__all__ = [
    "Cost",
    "Mode",
    "denoiser_inputs",
    "measure",
    "measure_blocks",
    "measure_text_encoder",
    "measure_vae",
    "measure_vision_tower",
    "prepare_denoiser",
]

Mode = Literal["no_grad", "grad", "checkpointed"]
"""How a call runs: inference (``torch.no_grad``), training, or training with per-block activation checkpointing."""

TRUNCATABLE_BLOCKS = frozenset(
    {
        "FluxTransformerBlock",
        "FluxSingleTransformerBlock",
        "JointTransformerBlock",
        "BasicTransformerBlock",
        "CLIPEncoderLayer",
        "T5Block",
    }
)
"""Block classes whose parent's forward only iterates over their ``ModuleList`` (nothing depends on its length),
so that a run of identical ones can be cut short for the measurement."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """Memory of one call beyond its inputs and the module's parameters, in bytes.

    Attributes:
        peak: the most bytes the call holds at once (activations, temporaries, the backward's gradients).
        retained: the bytes its autograd graph still holds when the forward returns (0 without grad).
    """

    peak: int = 0
    retained: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.peak + other.peak, self.retained + other.retained)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.peak - other.peak, self.retained - other.retained)

    def scaled(self, factor: float) -> Cost:
        """The cost of ``factor`` times as many rows."""
        return Cost(round(self.peak * factor), round(self.retained * factor))


# ---------------------------------------------------------------------------------------------------------------------
# Running a call on the meta device
# ---------------------------------------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    """Shapes and saved tensors of a flash attention kernel: ``q, k, v, out`` and a float32 ``[B, H, L]``
    log-sum-exp are kept for backward (FlashAttention-2, Dao 2023; PyTorch's CPU flash kernel does the same)."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _flash_sdpa(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return _FlashAttention.apply(query, key, value)


@contextlib.contextmanager
def _flash_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as a flash kernel for the block (diffusers and transformers look the
    function up at call time). Not thread-safe: the planner runs in one thread."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Garbage in reference cycles (some modules make them) is freed when the collector happens to run; with it
    paused such tensors count until the call ends, the same on every run (and never less than on a GPU)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure(call: Callable[[], Tensor], mode: Mode) -> Cost:
    """Run ``call`` (a forward on meta tensors) and, with grad, the backward of its output; returns its cost."""
    with _no_cycle_collection(), StorageTracker() as tracker, _flash_attention():
        if mode == "no_grad":
            with torch.no_grad():
                call()
            return Cost(tracker.peak, 0)
        out = call()
        retained = tracker.current
        out.backward(torch.empty_like(out))
        del out
        return Cost(tracker.peak, retained)


# ---------------------------------------------------------------------------------------------------------------------
# The denoiser
# ---------------------------------------------------------------------------------------------------------------------


def prepare_denoiser(
    denoiser: nn.Module,
    dtype: torch.dtype,
    lora: dict[str, Any] | None = None,
) -> tuple[nn.Module, list[nn.Parameter]]:
    """A meta copy of ``denoiser`` set up as the trainer sets it up: all weights frozen and a peft LoRA added
    (``lora``: ``rank``, ``alpha``, ``targets``), or every weight trained (``lora`` None); cast to the compute
    dtype (autocast runs the matmuls in it). Returns the copy and its trained parameters, whose gradients exist.
    """
    model = copy.deepcopy(denoiser).requires_grad_(lora is None)
    if lora is not None:
        from peft import LoraConfig

        config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]))
        with torch.device("meta"):
            model.add_adapter(config)
    nn.Module.to(model, dtype)  # not diffusers' override, which warns about casting on every call
    trained = [p for p in model.parameters() if p.requires_grad]
    for param in trained:
        param.grad = torch.empty_like(param)
    return model, trained


def denoiser_inputs(
    model: nn.Module, rows: int, latent_hw: tuple[int, int], text_length: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Keyword arguments of one denoiser call on ``rows`` samples, as the adapters pass them (meta tensors).

    Args:
        model: a ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        rows: samples in the call (a CFG batch counts twice).
        latent_hw: the latent image's height and width (image side / VAE scale factor).
        text_length: conditioning tokens per sample.
        dtype: the compute dtype.
    """
    config, name = model.config, type(model).__name__
    h, w = latent_hw

    def empty(*shape: int, like: torch.dtype = dtype) -> Tensor:
        return torch.empty(*shape, device="meta", dtype=like)

    if name == "UNet2DConditionModel":
        inputs = {
            "sample": empty(rows, config.in_channels, h, w),
            "timestep": empty(rows),
            "encoder_hidden_states": empty(rows, text_length, config.cross_attention_dim),
        }
        if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop numbers
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": empty(rows, pooled), "time_ids": empty(rows, 6)}
        return inputs
    common = {
        "encoder_hidden_states": empty(rows, text_length, config.joint_attention_dim),
        "pooled_projections": empty(rows, config.pooled_projection_dim),
        "timestep": empty(rows),
    }
    if name == "SD3Transformer2DModel":
        return {"hidden_states": empty(rows, config.in_channels, h, w), **common}
    if name == "FluxTransformer2DModel":
        tokens = (h // 2) * (w // 2)  # 2x2 latent patches packed into tokens
        inputs = {"hidden_states": empty(rows, tokens, config.in_channels), **common}
        inputs.update(img_ids=empty(tokens, 3), txt_ids=empty(text_length, 3))
        if config.guidance_embeds:
            inputs["guidance"] = empty(rows, like=torch.float32)
        return inputs
    raise ValueError(
        f"the planner knows the inputs of UNet2DConditionModel, SD3Transformer2DModel and FluxTransformer2DModel, "
        f"not of {name}"
    )


@dataclasses.dataclass
class _Run:
    """A run of identical consecutive blocks in a block list."""

    parent: nn.Module
    attribute: str
    start: int
    blocks: list[nn.Module]
    key: tuple = ()


def _signature(block: nn.Module) -> tuple:
    return (type(block).__name__, tuple((name, tuple(p.shape)) for name, p in block.named_parameters()))


def _block_runs(model: nn.Module) -> list[_Run]:
    """Runs of identical consecutive blocks in the model's truncatable block lists."""
    runs: list[_Run] = []
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if not isinstance(child, nn.ModuleList) or not all(type(b).__name__ in TRUNCATABLE_BLOCKS for b in child):
                continue
            for index, block in enumerate(child):
                last = runs[-1] if runs else None
                same_list = last is not None and last.parent is parent and last.attribute == attribute
                if same_list and _signature(last.blocks[-1]) == _signature(block):
                    last.blocks.append(block)
                else:
                    runs.append(_Run(parent, attribute, index, [block]))
    return runs


KEPT = 3
"""Blocks each run keeps in the cut models. The first blocks of a run can add memory the later ones do not (a
no-grad peak stops growing after a block or two), so the difference is taken where every further block adds the
same: from the third block on."""


@contextlib.contextmanager
def _cut(runs: list[_Run], longer: set[int]) -> Iterator[None]:
    """Every run cut to its first :data:`KEPT` blocks (one more for the runs whose index is in ``longer``)."""
    lists: dict[tuple[int, str], tuple[nn.Module, str, nn.ModuleList, list[nn.Module]]] = {}
    for index, run in enumerate(runs):
        entry = lists.setdefault(
            (id(run.parent), run.attribute), (run.parent, run.attribute, getattr(run.parent, run.attribute), [])
        )
        entry[3].extend(run.blocks[: KEPT + 1 if index in longer else KEPT])
    for parent, attribute, _, kept in lists.values():
        setattr(parent, attribute, nn.ModuleList(kept))
    try:
        yield
    finally:
        for parent, attribute, original, _ in lists.values():
            setattr(parent, attribute, original)


def _leaves(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if not any(True for _ in m.children()))


def _record_input_shapes(runs: list[_Run]) -> Iterator[Callable[[], None]]:
    """Forward pre-hooks that store each run's first-block input shapes in ``run.key``."""

    def hook(run: _Run) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            shapes = tuple(tuple(t.shape) for t in (*args, *kwargs.values()) if isinstance(t, Tensor))
            run.key = (_signature(module), shapes)

        return record

    return [run.blocks[0].register_forward_pre_hook(hook(run), with_kwargs=True) for run in runs]


def measure_blocks(model: nn.Module, call: Callable[[], Tensor], mode: Mode) -> Cost:
    """:func:`measure` of a call of ``model``, with runs of identical blocks measured by difference (module doc)."""
    runs = _block_runs(model)
    repeated = [i for i, run in enumerate(runs) if len(run.blocks) > KEPT]
    cut_leaves = _leaves(model) - sum(_leaves(b) for run in runs for b in run.blocks[KEPT:])
    kinds_guess = len({_signature(runs[i].blocks[0]) for i in repeated})
    # Worth it when the cut models (one, and one more per kind of block) are together much smaller than the whole.
    if not repeated or 2 * (1 + kinds_guess) * cut_leaves >= _leaves(model):
        return _measure_in_mode(model, call, mode)
    handles = _record_input_shapes(runs)
    try:
        with _cut(runs, set()):
            base = _measure_in_mode(model, call, mode)
    finally:
        for handle in handles:
            handle.remove()
    kinds: dict[tuple, list[int]] = {}
    for index in repeated:
        kinds.setdefault(runs[index].key, []).append(index)
    total = base
    for indices in kinds.values():
        with _cut(runs, set(indices)):
            per_block = _measure_in_mode(model, call, mode) - base
        left_out = sum(len(runs[i].blocks) - KEPT for i in indices)
        total += Cost(max(per_block.peak, 0), max(per_block.retained, 0)).scaled(left_out / len(indices))
    return total


def _measure_in_mode(model: nn.Module, call: Callable[[], Tensor], mode: Mode) -> Cost:
    if mode != "checkpointed":
        return measure(call, mode)
    model.enable_gradient_checkpointing()
    try:
        return measure(call, "grad")
    finally:
        model.disable_gradient_checkpointing()


# ---------------------------------------------------------------------------------------------------------------------
# The VAE and reward image towers
# ---------------------------------------------------------------------------------------------------------------------


def measure_vae(vae: nn.Module, part: Literal["encode", "decode"], image_hw: tuple[int, int], mode: Mode) -> Cost:
    """One image through the VAE's encoder (a posterior sample, as the DPO trainer encodes) or decoder, float32;
    with grad the gradient flows to the input (reward backprop decodes with grad, the VAE stays frozen)."""
    h, w = image_hw
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, 3, h, w) if part == "encode" else (1, vae.config.latent_channels, h // scale, w // scale)
    x = torch.empty(shape, device="meta", dtype=torch.float32, requires_grad=mode != "no_grad")

    def call() -> Tensor:
        if part == "encode":
            return vae.encode(x).latent_dist.sample()
        return vae.decode(x, return_dict=False)[0]

    return measure(call, "grad" if mode == "checkpointed" else mode)


def measure_vision_tower(vision: dict[str, Any], dtype: torch.dtype, mode: Mode) -> Cost:
    """One 224-px image through a CLIP-style ViT of the given geometry (``CLIPVisionConfig`` keys), the path a
    differentiable reward's gradient takes back to the image."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(image_size=224, **vision)).to(dtype).requires_grad_(False).eval()
    x = torch.empty(1, 3, 224, 224, device="meta", dtype=dtype, requires_grad=mode != "no_grad")
    return measure_blocks(
        tower, lambda: tower(pixel_values=x).pooler_output, "grad" if mode == "checkpointed" else mode
    )


def measure_text_encoder(encoder: nn.Module, tokens: int, prompts: int = 1) -> Cost:
    """``prompts`` prompts of ``tokens`` tokens through a text encoder, no grad (CLIP with every hidden state, as
    SDXL and SD3 take the penultimate one; T5 as SD3 and FLUX call it)."""
    ids = torch.zeros(prompts, tokens, dtype=torch.long, device="meta")
    if getattr(encoder.config, "model_type", "") == "t5":
        return measure_blocks(encoder, lambda: encoder(input_ids=ids)[0], "no_grad")
    # CLIP keeps some of its hidden states for the caller, not a fixed amount per layer: measured whole (it is small).
    return measure(lambda: encoder(input_ids=ids, output_hidden_states=True)[0], "no_grad")
