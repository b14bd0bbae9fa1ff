"""GPU benchmark at real size: SD3.5-Medium and FLUX.1-dev with random weights (issue 21, item 7).

For each model the architecture is built from its config folder (``model_index.json``, ``scheduler/``, the
transformer and VAE ``config.json``; no weights, no tokenizers, no download) directly on the device, and two things
are measured through diffalign's own code:

- ``sample``: one sampling pass, :func:`diffalign.samplers.rollout.rollout` of one chunk of the published per-GPU
  batch (``sampling.batch_size`` images of one prompt) with the published resolution, steps, guidance and step
  plan (the trainer's own :meth:`GRPOTrainer.epoch_plans`), decoded to images;
- ``train_step``: one GRPO step, :meth:`GRPOTrainer.train_step` (sample the step's groups, score, advantages,
  clipped policy loss over every trained step, optimizer step) with the published LoRA, group size, micro-batch,
  guidance, KL and accumulation, on ``--prompts-per-step`` groups (1 by default, instead of the published 48 per
  epoch over 8 GPUs).

Each measurement runs twice: first under ``torch.utils.flop_counter.FlopCounterMode`` (the FLOP count, which also
warms up kernels and the allocator), then timed alone (CUDA events) with the peak memory statistics reset before
it. MFU = model FLOPs / seconds / the card's peak dense bf16 FLOP/s; FLOPs that activation checkpointing spends
recomputing forwards inside backward are counted apart and left out of the model FLOPs (see README.md).

The text encoders are not built: each prompt's conditioning is a random tensor of the shapes the pipeline's
``encode_prompt`` returns, put in diffalign's text-embedding cache, which is how the big configs are meant to run
(``sampling.precompute_text_embeddings: true``, ``model.offload_text_encoders: delete``). The reward is a pixel
statistic (:func:`diffalign.testing.redness`) standing in for PickScore / HPSv2.1, whose weights are not loaded.

Run on a GPU: ``benchmarks/gpu/run.sh``. Check on the CPU: ``python benchmarks/gpu/bench.py --device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; the GPU machine cannot reach it
# Quiet: diffusers warns on every .to(dtype) of a built model about fp32-only modules these models do not have.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Models and cards
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its architecture folder, its published GRPO config and the tiny stand-in family."""

    name: str
    label: str
    arch_dir: Path
    config: Path
    tiny_family: str


MODELS: dict[str, ModelSpec] = {
    "sd35m": ModelSpec(
        "sd35m",
        "SD3.5-Medium",
        ROOT / "diffalign" / "adapters" / "architectures" / "sd35_medium",
        ROOT / "configs" / "grpo" / "sd35m_pickscore.yaml",
        "sd3",
    ),
    "flux": ModelSpec(
        "flux",
        "FLUX.1-dev",
        ROOT / "diffalign" / "adapters" / "architectures" / "flux1_dev",
        ROOT / "configs" / "grpo" / "flux_hps.yaml",
        "flux",
    ),
}

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H200 NVL", 835.5),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
)
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s by a substring of ``torch.cuda.get_device_name()``, most
specific first: NVIDIA's H100, H200 and A100 datasheets, whose bf16 figures are quoted with sparsity (halved here)
except A100's dense 312. SXM parts are the plain names."""

SUPPORTED_FAMILIES = ("sd3", "flux")
"""Adapter families whose text conditioning :func:`random_conditioning` can draw."""


def peak_tflops_for(device_name: str) -> float | None:
    """The dense bf16 peak of the card named ``device_name`` from :data:`PEAK_BF16_TFLOPS`, or ``None``."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


class BenchError(ValueError):
    """Bad input to the benchmark (a folder, a model name, a device); the message says how to fix it."""


# ---------------------------------------------------------------------------------------------------------------------
# Building an architecture from its config folder, on the device
# ---------------------------------------------------------------------------------------------------------------------


def read_model_index(arch_dir: Path) -> dict[str, Any]:
    """``model_index.json`` of a pipeline folder, with a clear error when the folder is not one."""
    if not arch_dir.is_dir():
        raise BenchError(
            f"no architecture folder at {arch_dir}: pass --arch-dir with a diffusers pipeline folder "
            "(model_index.json, scheduler/, transformer/ and vae/ config.json; no weights needed), or --tiny for the "
            "tiny test pipelines"
        )
    index = arch_dir / "model_index.json"
    if not index.is_file():
        raise BenchError(f"{arch_dir} has no model_index.json: it must be laid out as a diffusers pipeline folder")
    return json.loads(index.read_text())


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_module(cls: Any, folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers model from ``folder/config.json`` with random weights, created on ``device`` in ``dtype``.

    The parameters are allocated and initialised where they will live (FLUX.1-dev is 12B parameters: 48 GB in fp32
    on the host would be the slow part). Buffers a constructor makes in fp32 explicitly (sin-cos position tables)
    are cast afterwards, as ``from_pretrained(torch_dtype=...)`` casts them.
    """
    if not (folder / "config.json").is_file():
        raise BenchError(f"{folder / 'config.json'} is missing: every built component needs its config.json")
    config = cls.load_config(folder)
    with _default_dtype(dtype), torch.device(device):
        module = cls.from_config(config)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_pipeline(arch_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline of ``arch_dir`` with random weights and without text encoders or tokenizers.

    The denoiser is built in ``dtype`` and the VAE in fp32 (as the adapters keep it), both on ``device``; the
    scheduler comes from its config. Text encoders, tokenizers and other non-diffusers components are left out
    (``None``): prompts are served from the text-embedding cache (:func:`fill_text_cache`).
    """
    import diffusers

    index = read_model_index(arch_dir)
    pipeline_cls = getattr(diffusers, index.get("_class_name", ""), None)
    if pipeline_cls is None:
        raise BenchError(f"{arch_dir}/model_index.json names {index.get('_class_name')!r}, not a diffusers pipeline")
    components: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        library, class_name = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if library != "diffusers" or class_name is None or name.startswith(("text_encoder", "tokenizer")):
            components[name] = None
            continue
        cls = getattr(diffusers, class_name, None)
        if cls is None:
            raise BenchError(f"{arch_dir}/model_index.json: {name} is {class_name!r}, which diffusers does not have")
        if name == "scheduler":
            components[name] = cls.from_config(cls.load_config(arch_dir / name))
        else:
            components[name] = build_module(cls, arch_dir / name, device, torch.float32 if name == "vae" else dtype)
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Text conditioning without text encoders
# ---------------------------------------------------------------------------------------------------------------------


def random_conditioning(adapter: Any, count: int, with_negative: bool, generator: torch.Generator) -> Any:
    """Random text conditioning of ``count`` prompts, with the keys, shapes and dtype of ``adapter.encode_prompt``.

    - SD3: ``encoder_hidden_states [count, 77 + T5 length, joint_attention_dim]`` (CLIP's tokens, then T5's) and
      ``pooled_projections [count, pooled_projection_dim]``, and the same for the CFG branch when ``with_negative``;
    - FLUX: ``encoder_hidden_states [count, T5 length, joint_attention_dim]``, ``pooled_projections
      [count, pooled_projection_dim]`` and ``txt_ids [T5 length, 3]`` (zeros); no CFG branch (guidance embedding).

    Returns:
        A :class:`~diffalign.adapters.base.Conditioning` on the CPU.
    """
    from diffalign.adapters.base import Conditioning

    config = adapter.denoiser.config

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(adapter.dtype)

    if adapter.family == "sd3":
        length = adapter.pipe.tokenizer_max_length + adapter.max_sequence_length

        def branch() -> dict[str, torch.Tensor]:
            return {
                "encoder_hidden_states": draw(count, length, config.joint_attention_dim),
                "pooled_projections": draw(count, config.pooled_projection_dim),
            }

        return Conditioning(branch(), branch() if with_negative else None)
    if adapter.family == "flux":
        length = adapter.max_sequence_length
        embeds = {
            "encoder_hidden_states": draw(count, length, config.joint_attention_dim),
            "pooled_projections": draw(count, config.pooled_projection_dim),
        }
        return Conditioning(embeds, None, {"txt_ids": torch.zeros(length, 3, dtype=adapter.dtype)})
    raise BenchError(f"the benchmark draws text conditioning for {SUPPORTED_FAMILIES}, not {adapter.family!r}")


def fill_text_cache(adapter: Any, prompts: Sequence[str], sampling: Any, seed: int = 0) -> None:
    """Put a random conditioning of every prompt into the adapter's text-embedding cache, keyed as the trainer's
    rollouts look prompts up (``sampling``'s guidance and negative prompt), and mark the text encoders released."""
    from diffalign.adapters.text_cache import TextEmbeddingCache
    from diffalign.samplers.rollout import text_use

    prompts, negative, with_negative = text_use(prompts, sampling.guidance_scale, sampling.negative_prompt)
    cache = TextEmbeddingCache()
    # The entries hold for the adapter's current text settings (T5 length, image size): set once the run applied
    # the config's model options, else the adapter would drop them as stale.
    cache.signature = adapter._text_signature()
    generator = torch.Generator().manual_seed(seed)
    cache.store(prompts, random_conditioning(adapter, len(prompts), with_negative, generator), negative, with_negative)
    adapter.text_cache = cache
    adapter.release_text_encoders("delete")  # none are built; from now on a prompt missing from the cache is an error


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs, time, memory
# ---------------------------------------------------------------------------------------------------------------------

PHASES = ("forward_no_grad", "forward_grad", "recompute", "backward")
"""How :class:`FlopCount` splits the counted FLOPs: forwards without and with autograd, forwards recomputed inside
backward by activation checkpointing (it re-runs them with grad enabled), and the gradient ops themselves."""


def _in_backward() -> bool | None:
    """Whether the autograd engine is running a backward on this thread; ``None`` when torch cannot say."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return None if graph_task_id is None else graph_task_id() != -1


def _phase() -> str:
    in_backward = bool(_in_backward())
    if in_backward:
        return "recompute" if torch.is_grad_enabled() else "backward"
    return "forward_grad" if torch.is_grad_enabled() else "forward_no_grad"


@dataclasses.dataclass
class FlopCount:
    """FLOPs of one call, as ``torch.utils.flop_counter`` counts them (matmuls, convolutions, attention).

    Attributes:
        total: every counted FLOP executed.
        phases: ``total`` split by :data:`PHASES`.
        by_module: top-level module class name -> FLOPs (the denoiser, the VAE's decoder, ...).
        phases_known: False when torch could not say whether an op ran inside backward (recompute then counts as
            ``forward_grad`` and the model FLOPs include it).
    """

    total: int
    phases: dict[str, int]
    by_module: dict[str, int]
    phases_known: bool = True

    @property
    def model_flops(self) -> int:
        """The FLOPs the computation needs: ``total`` without checkpointing's recomputed forwards."""
        return self.total - self.phases.get("recompute", 0)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, FlopCount]:
    """Run ``fn()`` under ``FlopCounterMode`` and return its result and FLOPs, split by :data:`PHASES`.

    Each registered FLOP formula is wrapped so that it also adds its count to the phase the op runs in.
    """
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    phases: dict[str, int] = defaultdict(int)

    def with_phase(formula: Callable[..., int]) -> Callable[..., int]:
        def counted(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
            flops = formula(*args, out_val=out_val, **kwargs)
            phases[_phase()] += flops
            return flops

        counted._get_raw = True  # the registered formulas already take the raw op arguments
        return counted

    registry = dict(flop_registry)
    aten = torch.ops.aten
    # torch registers the CUDA attention kernels only; the CPU flash kernels take the same leading arguments
    # (query, key, value / grad_out, query, key, value), so the same formulas count them (--device cpu runs).
    for cpu_op, cuda_op in (
        ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward"),
    ):
        if hasattr(aten, cpu_op):
            registry.setdefault(getattr(aten, cpu_op), flop_registry[getattr(aten, cuda_op)])
    mapping = {op: with_phase(formula) for op, formula in registry.items()}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn()
    by_module = {
        name: sum(counts.values())
        for name, counts in counter.get_flop_counts().items()
        if name != "Global" and "." not in name
    }
    count = FlopCount(counter.get_total_flops(), {p: phases.get(p, 0) for p in PHASES}, by_module)
    count.phases_known = _in_backward() is not None
    return result, count


@dataclasses.dataclass
class Timing:
    """Seconds of one call (CUDA events on a GPU, the wall clock on the CPU) and its memory high-water mark."""

    seconds: float
    wall_s: float
    peak_gb: float
    peak_reserved_gb: float | None
    peak_source: str


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, Timing]:
    """Run ``fn()`` once, timed, with the peak memory statistics reset before it.

    GPU: ``seconds`` from CUDA events recorded around the call, the peak from ``torch.cuda.max_memory_allocated``
    (weights included: what must fit). CPU: the wall clock, and the process's peak resident set (``ru_maxrss``, which
    cannot be reset: the high-water mark of the whole run so far).
    """
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        end.record()
    _synchronize(device)
    wall = time.perf_counter() - began
    if device.type == "cuda":
        return result, Timing(
            start.elapsed_time(end) / 1000,
            wall,
            torch.cuda.max_memory_allocated(device) / 2**30,
            torch.cuda.max_memory_reserved(device) / 2**30,
            "torch.cuda.max_memory_allocated",
        )
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return result, Timing(wall, wall, peak, None, "ru_maxrss (process peak, not reset per phase)")


def phase_record(flops: FlopCount, timing: Timing, peak_tflops: float | None) -> dict[str, Any]:
    """JSON record of one measured phase: time, memory, FLOPs, achieved TFLOP/s and MFU (``None`` without a peak)."""
    model_tflops = flops.model_flops / 1e12
    achieved = model_tflops / timing.seconds
    return {
        "seconds": timing.seconds,
        "wall_s": timing.wall_s,
        "peak_gb": timing.peak_gb,
        "peak_reserved_gb": timing.peak_reserved_gb,
        "peak_memory_source": timing.peak_source,
        "flops": flops.total,
        "model_flops": flops.model_flops,
        "flops_by_phase": flops.phases,
        "flops_by_module": flops.by_module,
        "flops_phases_known": flops.phases_known,
        "model_tflops_per_s": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "hfu": flops.total / 1e12 / timing.seconds / peak_tflops if peak_tflops else None,
    }


# ---------------------------------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------------------------------


def bench_config(
    spec: ModelSpec, arch_dir: Path, output_dir: Path, args: argparse.Namespace, dtype: torch.dtype
) -> tuple[Any, list[str]]:
    """The published GRPO config of ``spec`` with the benchmark's changes (each listed in the JSON ``changes``)."""
    import yaml

    from diffalign.config import load_config
    from diffalign.testing import TINY_IMAGE_SIZE
    from diffalign.trainers.grpo import GRPOConfig

    raw = yaml.safe_load(spec.config.read_text())
    published_precision = raw.get("mixed_precision", "no")
    raw["model"]["path"] = str(arch_dir)
    raw["model"]["offload_text_encoders"] = "delete"
    raw["output_dir"] = str(output_dir)
    raw["mixed_precision"] = "bf16" if dtype == torch.bfloat16 else "no"
    raw["sampling"]["prompts"] = [f"benchmark prompt {i}" for i in range(max(4, args.prompts_per_step))]
    raw["sampling"]["prompts_per_epoch"] = args.prompts_per_step
    raw["sampling"]["precompute_text_embeddings"] = True
    raw["eval"] = {"every": 0}
    raw["logging"] = {"log_with": "none"}
    raw["checkpoint"] = {"every": 0}
    if args.tiny:
        raw["sampling"]["resolution"] = TINY_IMAGE_SIZE
    changes = [
        f"sampling.prompts_per_epoch {args.prompts_per_step} (one GPU's step on {args.prompts_per_step} group(s))",
        "text encoders not built: random prompt embeddings in the text-embedding cache "
        "(sampling.precompute_text_embeddings: true, model.offload_text_encoders: delete)",
        "reward: diffalign.testing.redness (a pixel statistic) in place of the published reward model",
        "evaluation, checkpoints and logging off",
    ]
    if raw["mixed_precision"] != published_precision:
        changes.append(f"mixed_precision {raw['mixed_precision']} (published: {published_precision})")
    if args.tiny:
        changes.append(f"tiny pipeline of diffalign.testing at {TINY_IMAGE_SIZE}px")
    changes += [f"--set {text}" for text in args.set]
    return load_config(GRPOConfig, raw, list(args.set)), changes


def _lora_snapshot(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().to("cpu", torch.float32, copy=True) for p in params]


def _max_abs_change(params: Sequence[torch.nn.Parameter], before: Sequence[torch.Tensor]) -> float:
    return max(float((p.detach().cpu().float() - b).abs().max()) for p, b in zip(params, before))


def _settings(config: Any, adapter: Any, run: Any) -> dict[str, Any]:
    sampling, train = config.sampling, config.train
    return {
        "resolution": adapter.height,
        "num_steps": sampling.num_steps,
        "guidance_scale": sampling.guidance_scale,
        "plan": sampling.plan,
        "kernel": sampling.kernel,
        "sample_batch": sampling.batch_size,
        "group_size": sampling.images_per_prompt,
        "prompts_per_step": sampling.prompts_per_epoch,
        "train_batch": train.batch_size,
        "timestep_chunk": train.timestep_chunk,
        "max_rescore_rows": train.max_rescore_rows,
        "beta": train.beta,
        "cfg": train.cfg,
        "gradient_accumulation_steps": config.optim.gradient_accumulation_steps,
        "lora_rank": config.model.lora.rank,
        "lora_alpha": config.model.lora.alpha,
        "gradient_checkpointing": config.gradient_checkpointing,
        "mixed_precision": config.mixed_precision,
        "max_sequence_length": getattr(adapter, "max_sequence_length", None),
        "ema": config.ema.enabled,
        "denoiser_params": sum(p.numel() for p in adapter.denoiser.parameters()) - sum(p.numel() for p in run.params),
        "lora_params": sum(p.numel() for p in run.params),
        "vae_params": sum(p.numel() for p in adapter.vae.parameters()),
    }


def _sampling_pass(trainer: Any, epoch: int) -> Any:
    """One rollout of ``sampling.batch_size`` images of one prompt, with the plan the trainer samples epoch
    ``epoch`` with, decoded (what one chunk of a training rollout does, minus the reward)."""
    from diffalign.samplers.rollout import rollout

    sampling = trainer.config.sampling
    count = sampling.batch_size
    return rollout(
        trainer.adapter,
        [trainer.prompts[0]],
        trainer.epoch_plans(epoch, count),
        num_images_per_prompt=count,
        guidance_scale=sampling.guidance_scale,
        negative_prompt=sampling.negative_prompt,
        seeds=[1000 * epoch + i for i in range(count)],
        chunk_size=count,
    )


def bench_model(
    spec: ModelSpec, arch_dir: Path, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak
) -> dict[str, Any]:
    """Build ``spec``'s architecture, then measure one sampling pass and one GRPO step; the model's JSON record."""
    from diffalign.adapters import load_adapter
    from diffalign.testing import redness
    from diffalign.trainers.common import TrainingRun
    from diffalign.trainers.grpo import GRPOTrainer

    record: dict[str, Any] = {"model": spec.name, "label": spec.label, "arch_dir": str(arch_dir)}
    record["config"] = str(spec.config.relative_to(ROOT) if spec.config.is_relative_to(ROOT) else spec.config)
    with tempfile.TemporaryDirectory(prefix=f"gpu-bench-{spec.name}-") as tmp:
        config, record["changes"] = bench_config(spec, arch_dir, Path(tmp) / "run", args, dtype)
        torch.manual_seed(0)
        resolution = config.sampling.resolution

        def build() -> Any:
            pipe = build_pipeline(arch_dir, device, dtype)
            return load_adapter(pipe, device=device, dtype=dtype, height=resolution, width=resolution)

        adapter, built = timed(build, device)
        record["build_s"] = built.seconds
        record["pipeline"] = type(adapter.pipe).__name__
        run = TrainingRun(config, adapter=adapter)
        fill_text_cache(adapter, config.sampling.prompts, config.sampling)
        trainer = GRPOTrainer(config, run=run, reward=redness)
        record["settings"] = _settings(config, adapter, run)
        _synchronize(device)
        record["resident_gb"] = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        # Each phase on its own: a training step that runs out of memory still leaves the sampling numbers.
        record["sample"] = _guarded(lambda: _bench_sampling(trainer, device, peak), device)
        record["train_step"] = _guarded(lambda: _bench_train_step(trainer, run, device, peak), device)
    return record


def _guarded(measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """``measure()``'s record, or ``{"error": ...}`` when it raises (out of memory, a diverged step)."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - recorded and printed; the next phase still runs
        print(traceback.format_exc(), file=sys.stderr, flush=True)  # noqa: T201
        message = f"{type(err).__name__}: {err}"[:2000]
    _free(device)  # after the handler: the traceback's frames no longer hold the failed phase's tensors
    return {"error": message}


def _bench_sampling(trainer: Any, device: torch.device, peak: float | None) -> dict[str, Any]:
    _, flops = count_flops(lambda: _sampling_pass(trainer, 0))
    trajectory, timing = timed(lambda: _sampling_pass(trainer, 1), device)
    images = trajectory.images
    return {
        "images": images.shape[0],
        "image_size": list(images.shape[-2:]),
        "images_finite": bool(torch.isfinite(images).all()),
        "images_per_s": images.shape[0] / timing.seconds,
        **phase_record(flops, timing, peak),
    }


def _bench_train_step(trainer: Any, run: Any, device: torch.device, peak: float | None) -> dict[str, Any]:
    counted, flops = count_flops(lambda: trainer.train_step(0))
    before = _lora_snapshot(run.params)
    metrics, timing = timed(lambda: trainer.train_step(1), device)
    change = _max_abs_change(run.params, before)
    keep = ("num_train_samples", "loss", "approx_kl", "clipfrac", "grad_norm", "reward_mean", "kl")
    return {
        **phase_record(flops, timing, peak),
        "sample_s": metrics.get("time/sample_s"),
        "update_s": metrics.get("time/epoch_s", 0.0) - metrics.get("time/sample_s", 0.0),
        "optimizer_steps": run.optimizer_steps,
        "lora_max_abs_change": change,
        "lora_changed": change > 0,
        "num_train_samples_counted": counted.get("num_train_samples"),
        "metrics": {key: value for key, value in metrics.items() if key in keep},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _per_model(values: Sequence[str], models: Sequence[str], option: str) -> dict[str, Path]:
    """``--option [MODEL=]PATH`` values as ``{model: path}``; a bare path only when one model is benchmarked."""
    chosen: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(models) != 1:
                raise BenchError(
                    f"{option} {value}: with several models name the one it is for, e.g. {option} flux=PATH"
                )
            name, path = models[0], value
        if name not in models:
            raise BenchError(f"{option} {value}: {name!r} is not one of the benchmarked models {list(models)}")
        chosen[name] = Path(path).expanduser().resolve()
    return chosen


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    parser.add_argument("--arch-dir", action="append", default=[], metavar="[MODEL=]PATH", help="architecture folder")
    parser.add_argument("--config", action="append", default=[], metavar="[MODEL=]PATH", help="GRPO config YAML")
    parser.add_argument("--tiny", action="store_true", help="tiny pipelines of diffalign.testing (CPU check)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU (overrides)")
    parser.add_argument("--prompts-per-step", type=int, default=1, help="prompt groups in the GRPO step")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_bench" / "results.json", help="JSON output")
    args = parser.parse_args(argv)
    if args.prompts_per_step < 1:
        parser.error(f"--prompts-per-step must be >= 1, got {args.prompts_per_step}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return args


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str, float | None, str | None]:
    """``(device, dtype, device name, peak TFLOP/s or None, where the peak came from)``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA device here: run on a GPU machine, or check the code path with --device cpu --tiny")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the trainer's accelerator must not pick a GPU the adapter is not on
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    if args.peak_tflops is not None:
        return device, dtype, name, args.peak_tflops, "--peak-tflops"
    peak = peak_tflops_for(name) if device.type == "cuda" and dtype == torch.bfloat16 else None
    return device, dtype, name, peak, "table (PEAK_BF16_TFLOPS)" if peak else None


def format_table(results: dict[str, Any]) -> str:
    """The printed summary: one line per model and phase."""
    lines = [
        f"{'model':<13} {'phase':<18} {'seconds':>8} {'peak GB':>8} {'TFLOP':>9} {'TFLOP/s':>9} {'MFU':>6}",
    ]
    for record in results["models"]:
        if "error" in record:
            lines.append(f"{record['label']:<13} failed: {record['error']}")
            continue
        settings = record["settings"]
        names = {
            "sample": f"sample ({settings['sample_batch']} img)",
            "train_step": f"GRPO step ({settings['group_size'] * settings['prompts_per_step']} img)",
        }
        for key, name in names.items():
            phase = record[key]
            if "error" in phase:
                lines.append(f"{record['label']:<13} {name:<18} failed: {phase['error'][:200]}")
                continue
            mfu = "-" if phase["mfu"] is None else f"{100 * phase['mfu']:.1f}%"
            lines.append(
                f"{record['label']:<13} {name:<18} {phase['seconds']:>8.2f} {phase['peak_gb']:>8.2f} "
                f"{phase['model_flops'] / 1e12:>9.3g} {phase['model_tflops_per_s']:>9.3g} {mfu:>6}"
            )
    return "\n".join(lines)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, dtype, device_name, peak, peak_source = resolve_device(args)
        arch_dirs = _per_model(args.arch_dir, args.models, "--arch-dir")
        configs = _per_model(args.config, args.models, "--config")
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    import diffusers

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "device": device_name,
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "text_encoders": "not built: random prompt embeddings of the encoders' output shapes in diffalign's "
        "text-embedding cache (sampling.precompute_text_embeddings: true, model.offload_text_encoders: delete)",
        "models": [],
    }
    print(f"device {device_name}, {results['dtype']}, peak {peak or '-'} TFLOP/s ({peak_source or 'none: no MFU'})")  # noqa: T201
    print(f"text encoders {results['text_encoders']}")  # noqa: T201
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-tiny-") as tiny_root:
        for name in args.models:
            spec = MODELS[name]
            spec = dataclasses.replace(spec, config=configs.get(name, spec.config))
            record = _run_one(spec, arch_dirs.get(name), tiny_root, args, device, dtype, peak)
            results["models"].append(record)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each model: a later failure keeps it
            _free(device)
    print(format_table(results))  # noqa: T201
    print(f"wrote {args.out}")  # noqa: T201
    return 1 if any(_failed(record) for record in results["models"]) else 0


def _failed(record: dict[str, Any]) -> bool:
    return "error" in record or any("error" in record.get(phase, {}) for phase in ("sample", "train_step"))


def _run_one(spec, arch_dir, tiny_root, args, device, dtype, peak) -> dict[str, Any]:
    """One model's record; an error (out of memory, a missing folder) is recorded and the next model still runs."""
    try:
        if args.tiny:
            from diffalign.testing import save_tiny_pipeline

            arch_dir = arch_dir or save_tiny_pipeline(spec.tiny_family, Path(tiny_root) / spec.name)
        arch_dir = arch_dir or spec.arch_dir
        print(f"== {spec.label}: {arch_dir}", flush=True)  # noqa: T201
        return bench_model(spec, Path(arch_dir), args, device, dtype, peak)
    except Exception as err:  # noqa: BLE001 - recorded; the next model runs on a freed device
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)  # noqa: T201
        return {
            "model": spec.name,
            "label": spec.label,
            "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": trace,
        }


if __name__ == "__main__":
    sys.exit(main())
