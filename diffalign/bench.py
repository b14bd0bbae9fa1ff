"""Benchmarks: speed and memory are measured here, not asserted by timed tests (docs/performance.md).

``bench_rollout`` times :func:`~diffalign.samplers.rollout.rollout` against the pipeline's own ``__call__`` on the
tiny pipelines (the same pipeline object, prompts, seeds, steps and CFG; wall and CPU time) and checks that both
give the same images. Target: rollout / pipe <= 1.10.

``bench_reward_backprop`` measures one reward-backprop optimizer step (DRaFT-K with K final steps under grad,
the trainer's own code path) for several K, with and without gradient checkpointing, each configuration in a
fresh subprocess so that peak memory is not polluted by the previous one:

- CPU: the growth of the process's peak resident set (``ru_maxrss``) during the first training step, above the
  peak of a no-grad rollout of the same batch (weights, inference activations and allocator warm-up are thus
  excluded: what remains is what backprop through the sampler keeps alive); glibc is told to return large
  blocks on free, so that the resident peak follows the live tensors;
- CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it.

Step time is the wall time of a second step (the first pays one-off allocations).

Run: ``python -c "from diffalign.bench import bench_reward_backprop; bench_reward_backprop()"``
(the CLI exposes it as ``diffalign bench backprop``).

``bench_learn`` is the learning benchmark on the shapes world (``diffalign bench learn --method grpo|dpo|backprop``):
it trains the shipped shapes base model with one method for a budget of optimizer steps (or minutes) and reports
held-out strict accuracy and mean verifier reward before and after (:mod:`diffalign.shapes.learn`; GRPO is the
demo, :func:`diffalign.shapes.demo.run_demo`).

``bench_reward_server`` (``diffalign bench reward-server``) measures the reward server (``diffalign reward serve``,
started as a subprocess on loopback, CPU): requests/s and images/s at several request sizes against in-process
scoring, and a tiny GRPO epoch with the reward on the server against the same reward in process.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any


__all__ = [
    "LEARN_METHODS",
    "bench_grpo",
    "bench_learn",
    "bench_reward_backprop",
    "bench_reward_server",
    "bench_rollout",
]

_RESULT_PREFIX = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------------------------
# rollout() vs pipe()
# ---------------------------------------------------------------------------------------------------------------------

_PROMPTS = ("a red circle", "two blue squares left of a green triangle", "a yellow star", "three purple dots")


def bench_rollout(
    families: Sequence[str] = ("sd15", "sd2v", "sdxl", "sd3", "flux"),
    num_steps: int = 20,
    batch_size: int = 4,
    repeats: int = 5,
    resolution: int = 32,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Time ``rollout`` (ODE plan) against ``pipe(...)`` on each tiny family and print a table (target ratio <= 1.10).

    Both run the *same pipeline object* with the same prompts, seeds, CFG (4.5) and steps, after one warm-up call
    each; the calls alternate (pipe, rollout, pipe, ...) so that drift from other processes hits both alike, and
    each time is the median of ``repeats``. Wall time is what a user sees; CPU time (``time.process_time``, all
    threads) is the fairer number on a shared machine, where other processes stretch wall times at random.

    Args:
        families: tiny pipeline families (:data:`diffalign.testing.FAMILIES`).
        num_steps: denoising steps.
        batch_size: images per call.
        repeats: timed repetitions of each call.
        resolution: image side.
        threads: ``torch.set_num_threads`` for the benchmark (restored after); default: leave it. One thread
            gives the steadiest numbers on a loaded machine (idle OpenMP threads spin and bill CPU time).

    Returns:
        One record per family: ``pipe_s``, ``rollout_s``, ``ratio`` (rollout / pipe, wall), ``pipe_cpu_s``,
        ``rollout_cpu_s``, ``cpu_ratio``, ``max_abs_diff`` (largest pixel difference between the two outputs), the
        settings and ``threads`` (``torch.get_num_threads()``).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _bench_rollout_table(families, num_steps, batch_size, repeats, resolution)
    finally:
        torch.set_num_threads(previous)


def _bench_rollout_table(families, num_steps, batch_size, repeats, resolution) -> list[dict[str, Any]]:
    import torch

    print(  # noqa: T201
        f"rollout() vs pipe(): {num_steps} steps, batch {batch_size}, {resolution}px, CFG 4.5, median of {repeats}, "
        f"torch threads {torch.get_num_threads()}"
    )
    header = f"{'family':<12} {'pipe s':>8} {'rollout s':>10} {'ratio':>6} {'pipe cpu':>9} {'rollout cpu':>12}"
    print(f"{header} {'cpu ratio':>9} {'max |diff|':>10}")  # noqa: T201
    records = []
    for family in families:
        record = _bench_rollout_family(family, num_steps, batch_size, repeats, resolution)
        records.append(record)
        print(  # noqa: T201
            f"{family:<12} {record['pipe_s']:>8.3f} {record['rollout_s']:>10.3f} {record['ratio']:>6.2f} "
            f"{record['pipe_cpu_s']:>9.3f} {record['rollout_cpu_s']:>12.3f} {record['cpu_ratio']:>9.2f} "
            f"{record['max_abs_diff']:>10.1e}"
        )
    return records


def _seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _time_pair(pipe_call: Callable[[], Any], rollout_call: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds of each call, alternating the two after one warm-up call each."""
    pipe_call(), rollout_call()  # warm-up: lazy inits, allocator, first-call kernel selection
    times: dict[str, list[float]] = {"pipe_s": [], "pipe_cpu_s": [], "rollout_s": [], "rollout_cpu_s": []}
    for _ in range(max(repeats, 1)):
        for name, call in (("pipe", pipe_call), ("rollout", rollout_call)):
            wall, cpu = _seconds(call)
            times[f"{name}_s"].append(wall)
            times[f"{name}_cpu_s"].append(cpu)
    return {name: statistics.median(values) for name, values in times.items()}


def _bench_rollout_family(family: str, num_steps: int, batch_size: int, repeats: int, resolution: int):
    import torch

    from diffalign.adapters import load_adapter
    from diffalign.samplers.plan import ode_plan
    from diffalign.samplers.rollout import rollout
    from diffalign.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    extra = {"max_sequence_length": 77} if family in ("sd3", "flux") else {}
    adapter = load_adapter(pipe, height=resolution, width=resolution, **extra)  # wraps this very pipeline object
    prompts = [_PROMPTS[i % len(_PROMPTS)] for i in range(batch_size)]
    seeds, guidance = list(range(batch_size)), 4.5
    plan = ode_plan(num_steps)

    @torch.no_grad()
    def pipe_call():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(
            prompts,
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=generators,
            output_type="pt",
            **extra,
        ).images

    def rollout_call():
        return rollout(adapter, prompts, plan, guidance_scale=guidance, seeds=seeds).images

    max_abs_diff = (pipe_call() - rollout_call()).abs().max().item()
    times = _time_pair(pipe_call, rollout_call, repeats)
    return {
        "family": family,
        **times,
        "ratio": times["rollout_s"] / times["pipe_s"],
        "cpu_ratio": times["rollout_cpu_s"] / times["pipe_cpu_s"],
        "max_abs_diff": max_abs_diff,
        "num_steps": num_steps,
        "batch_size": batch_size,
        "resolution": resolution,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# reward backprop: memory and time vs K
# ---------------------------------------------------------------------------------------------------------------------


def bench_reward_backprop(
    family: str = "sd15",
    ks: Sequence[int | str] = (1, 2, 4, "all"),
    resolution: int = 128,
    num_steps: int = 8,
    device: str = "cpu",
    batch_size: int = 2,
    model_path: str | None = None,
    lora_rank: int = 4,
) -> list[dict[str, Any]]:
    """Peak memory and step time of reward backprop for each K, with and without gradient checkpointing.

    The default model is the tiny random-weight pipeline of ``family`` (:mod:`diffalign.testing`) at
    ``resolution``: its weights are a few MB, so at 128 px (64x64 latents) the activations kept for backprop
    dominate, as they do for full-size models. Pass ``model_path`` (a hub id or a folder) to measure a real
    architecture, e.g. with random weights on a GPU.

    Args:
        family: tiny pipeline family (``sd15``, ``sd2v``, ``sdxl``, ``sd3``, ``flux``) when ``model_path`` is unset.
        ks: numbers of final steps with grad; ``"all"`` means ``num_steps``.
        resolution: image side in pixels.
        num_steps: sampling steps T.
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: images per step (CFG doubles the denoiser batch).
        model_path: a diffusers pipeline to load instead of the tiny one.
        lora_rank: LoRA rank of the trained adapter (0 = full fine-tuning).

    Returns:
        One dict per configuration: ``k``, ``checkpointing``, ``peak_mb``, ``step_s``, ``ratio_to_k1`` (peak over
        the peak of K=1 with the same checkpointing setting), plus the settings. The table is printed too.
    """
    resolved = [num_steps if k == "all" else int(k) for k in ks]
    results = []
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
        path = model_path or _save_tiny(family, tmp)
        for use_checkpoint in (False, True):
            for k, label in zip(resolved, ks):
                job = dict(
                    model_path=str(path),
                    k=k,
                    checkpointing=use_checkpoint,
                    resolution=resolution,
                    num_steps=num_steps,
                    device=device,
                    batch_size=batch_size,
                    lora_rank=lora_rank,
                    output_dir=os.path.join(tmp, f"run-{k}-{int(use_checkpoint)}"),
                )
                result = _run_subprocess(job)
                result["k_label"] = str(label)
                results.append(result)
    _add_ratios(results)
    _print_table(results, family if model_path is None else model_path, resolution, num_steps, batch_size, device)
    return results


def _save_tiny(family: str, folder: str) -> str:
    from diffalign.testing import save_tiny_pipeline

    return str(save_tiny_pipeline(family, os.path.join(folder, f"tiny-{family}")))


def _run_subprocess(job: dict[str, Any]) -> dict[str, Any]:
    code = "import sys, json; from diffalign.bench import _worker; _worker(json.loads(sys.argv[1]))"
    # glibc keeps freed heap pages mapped, so the peak RSS would count memory that backward already released
    # (checkpointed calls recompute and free their activations one at a time). Serving blocks >= 64 KiB by mmap
    # returns them to the OS on free: the resident peak then tracks the peak of live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
        env=env,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX) :])
    raise RuntimeError(f"benchmark worker failed for k={job['k']}:\n{done.stderr[-4000:]}")


def _worker(job: dict[str, Any]) -> None:
    """Subprocess body: build the trainer, measure one step's peak and a second step's time, print JSON."""
    import resource

    import torch

    from diffalign.trainers.reward_backprop import RewardBackpropConfig, RewardBackpropTrainer

    config = _bench_config(job, RewardBackpropConfig)
    trainer = RewardBackpropTrainer(config)
    prompts, seeds = trainer.micro_batch_prompts(0, 0)
    cuda = job["device"].startswith("cuda")
    with torch.no_grad():  # the inference high-water mark: what sampling without backprop needs anyway
        trainer._rollout(prompts, seeds)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train_step(0)
    if cuda:
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: KiB
    began = time.perf_counter()
    trainer.train_step(1)
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - began
    result = {key: job[key] for key in ("k", "checkpointing", "resolution", "num_steps", "batch_size", "device")}
    result.update(peak_mb=peak_mb, step_s=step_s)
    print(_RESULT_PREFIX + json.dumps(result), flush=True)  # noqa: T201


def _bench_config(job: dict[str, Any], config_class: type) -> Any:
    from diffalign.config import load_config

    raw = {
        "method": "reward_backprop",
        "model": {"path": job["model_path"], "lora": {"rank": job["lora_rank"]}},
        "reward": "diffalign.testing:redness",
        "output_dir": job["output_dir"],
        "max_steps": 2,
        "gradient_checkpointing": job["checkpointing"],
        "sampling": {
            "prompts": ["a red circle", "a blue square"],
            "num_steps": job["num_steps"],
            "guidance_scale": 5.0,
            "batch_size": job["batch_size"],
            "resolution": job["resolution"],
        },
        "backprop": {"mode": "draft_k", "k": job["k"]},
        "logging": {"log_with": "none"},
        "checkpoint": {"every": 0},
    }
    return load_config(config_class, raw)


def _add_ratios(results: list[dict[str, Any]]) -> None:
    for row in results:
        base = next(
            (
                r
                for r in results
                if r["k"] == min(x["k"] for x in results) and r["checkpointing"] == row["checkpointing"]
            ),
            row,
        )
        row["ratio_to_k1"] = row["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else float("nan")


def _print_table(results, model: str, resolution: int, num_steps: int, batch_size: int, device: str) -> None:
    print(  # noqa: T201
        f"reward backprop (DRaFT-K step, LoRA) on {model}, {resolution}px, T={num_steps}, batch {batch_size} "
        f"(+CFG), {device}"
    )
    print(f"{'K':>5} {'checkpointing':>13} {'peak MB':>9} {'x K=1':>6} {'step s':>7}")  # noqa: T201
    for row in results:
        print(  # noqa: T201
            f"{row['k_label']:>5} {str(row['checkpointing']):>13} {row['peak_mb']:>9.1f} "
            f"{row['ratio_to_k1']:>6.2f} {row['step_s']:>7.2f}"
        )


# --- GRPO: seconds per epoch by step plan ------------------------------------------------------------------------


def _grpo_raw(folder, output, num_steps, images_per_prompt, prompts_per_epoch, resolution, epochs, **sampling):
    """The tiny Flow-GRPO config of the GRPO benchmarks (redness reward, LoRA r8, CFG 4.5)."""
    return {
        "model": {"path": str(folder), "lora": {"rank": 8}},
        "reward": "diffalign.testing:redness",
        "output_dir": str(output),
        "max_steps": epochs,
        "logging": {"log_with": "none"},
        "checkpoint": {"every": 0},
        "sampling": {
            "prompts": ["a red circle", "a blue square", "two green triangles"],
            "num_steps": num_steps,
            "guidance_scale": 4.5,
            "images_per_prompt": images_per_prompt,
            "prompts_per_epoch": prompts_per_epoch,
            "batch_size": images_per_prompt * prompts_per_epoch,
            "resolution": resolution,
            **sampling,
        },
        "train": {"batch_size": images_per_prompt * prompts_per_epoch},
    }


def _epoch_medians(output) -> tuple[float, float]:
    """Median sampling and epoch seconds of a run's ``metrics.jsonl``, the first epoch (warm-up) left out."""
    from pathlib import Path

    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    epochs_logged = [json.loads(line) for line in lines if line.strip()][1:]
    sample = statistics.median(r["time/sample_s"] for r in epochs_logged)
    return sample, statistics.median(r["time/epoch_s"] for r in epochs_logged)


def bench_grpo(
    families: Sequence[str] = ("sd3", "flux"),
    plans: Sequence[str] = ("sde", "window", "sliding"),
    num_steps: int = 10,
    images_per_prompt: int = 8,
    prompts_per_epoch: int = 2,
    epochs: int = 4,
    resolution: int = 32,
    window_size: int = 2,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Seconds per GRPO epoch with every step stochastic (``sde``) vs an SDE window (Flow-GRPO-Fast) vs MixGRPO's
    sliding window, at the same sampling budget (steps, images per epoch), on tiny pipelines.

    The first epoch is a warm-up; the table reports the median of the others: sampling time, training time (the
    policy updates: one denoiser call per trained step and micro-batch) and the whole epoch.
    """
    from pathlib import Path

    import torch

    from diffalign.config import load_config
    from diffalign.testing import save_tiny_pipeline
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    if threads is not None:
        torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="diffalign-bench-grpo-"))
    records = []
    for family in families:
        folder = save_tiny_pipeline(family, work / family)
        for plan in plans:
            output = work / f"{family}-{plan}"
            raw = _grpo_raw(
                folder,
                output,
                num_steps,
                images_per_prompt,
                prompts_per_epoch,
                resolution,
                epochs,
                plan=plan,
                window_size=window_size,
            )
            GRPOTrainer(load_config(GRPOConfig, raw)).train()
            sample, epoch = _epoch_medians(output)
            records.append(
                {"family": family, "plan": plan, "sample_s": sample, "train_s": epoch - sample, "epoch_s": epoch}
            )
    header = f"GRPO epoch time: {num_steps} steps, {images_per_prompt * prompts_per_epoch} images/epoch, "
    print(header + f"{resolution}px, CFG 4.5, threads={torch.get_num_threads()}")  # noqa: T201
    print(f"{'family':12} {'plan':8} {'sample s':>9} {'train s':>9} {'epoch s':>9} {'vs sde':>7}")  # noqa: T201
    for record in records:
        base = next(r for r in records if r["family"] == record["family"] and r["plan"] == plans[0])
        print(  # noqa: T201
            f"{record['family']:12} {record['plan']:8} {record['sample_s']:9.3f} {record['train_s']:9.3f} "
            f"{record['epoch_s']:9.3f} {record['epoch_s'] / base['epoch_s']:7.2f}"
        )
    return records


# --- BranchGRPO: seconds per iteration against Flow-GRPO -----------------------------------------------------------

BRANCH_SETTINGS: dict[str, dict[str, Any]] = {
    "flow_grpo": {"sampling": {"plan": "sde"}},
    "branchgrpo": {"sampling": {"plan": "tree"}},
    "branchgrpo_width": {"sampling": {"plan": "tree"}, "train": {"width_pruning": "per_branch"}},
    "branchgrpo_depth": {"sampling": {"plan": "tree"}, "train": {"depth_pruning": "last4"}},
}
"""The settings of :func:`bench_branch`: Flow-GRPO (every step but the last stochastic and trained), BranchGRPO's
tree, and the tree with width pruning (per last-split branch, half kept) or depth pruning (the last four depths, as
BranchGRPO's ``15,16,17,18`` of 20 steps)."""


def bench_branch(
    models: Sequence[str] = ("shapes", "sd3"),
    num_steps: int = 20,
    splits: Sequence[int] = (0, 3, 6, 9),
    prompts_per_epoch: int = 2,
    epochs: int = 4,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """BranchGRPO's seconds per iteration against Flow-GRPO's at the same final images (the tree's leaves, ``2 **
    len(splits)`` per prompt), on the shapes model and/or tiny pipelines, with the same SDE kernel (noise 0.7) and
    the redness reward; the first iteration is a warm-up, the table reports medians and each setting's ratio to
    Flow-GRPO. The paper's claim: about -55% per iteration with pruning (FLUX, 8 GPUs)."""
    from pathlib import Path

    import torch

    from diffalign.config import load_config
    from diffalign.shapes.demo import BASE_MODEL, load_protocol
    from diffalign.testing import save_tiny_pipeline
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    if threads is not None:
        torch.set_num_threads(threads)
    leaves = 2 ** len(set(splits))
    work = Path(tempfile.mkdtemp(prefix="diffalign-bench-branch-"))
    records = []
    for model in models:
        folder = BASE_MODEL if model == "shapes" else save_tiny_pipeline(model, work / model)
        resolution = load_protocol(BASE_MODEL)["resolution"] if model == "shapes" else 32
        for name, setting in BRANCH_SETTINGS.items():
            output = work / f"{model}-{name}"
            raw = _grpo_raw(folder, output, num_steps, leaves, prompts_per_epoch, resolution, epochs)
            raw["sampling"].update(setting["sampling"], tree_splits=list(splits), noise_level=0.7)
            train = dict(setting.get("train", {}))
            if train.get("depth_pruning") == "last4":
                train["depth_pruning"] = list(range(num_steps - 5, num_steps - 1))
            # One tree's leaves (or group) per micro-batch, all of its re-scored steps within the row budget.
            raw["train"].update(train, batch_size=leaves, max_rescore_rows=2 * leaves)
            trainer = GRPOTrainer(load_config(GRPOConfig, raw))
            with _shapes_sampling(trainer.adapter, model == "shapes"):
                trainer.train()
            sample, epoch = _epoch_medians(output)
            trained = _median_logged(output, "num_train_transitions")
            records.append({"model": model, "setting": name, "sample_s": sample, "epoch_s": epoch, "trained": trained})
    print(  # noqa: T201
        f"GRPO iteration time at equal final images: {num_steps} steps, {prompts_per_epoch} prompts x {leaves} "
        f"images, splits {list(splits)}, threads={torch.get_num_threads()}"
    )
    print(f"{'model':7} {'setting':17} {'trained':>8} {'sample s':>9} {'epoch s':>9} {'vs flow':>8}")  # noqa: T201
    for record in records:
        base = next(r for r in records if r["model"] == record["model"] and r["setting"] == "flow_grpo")
        record["ratio"] = record["epoch_s"] / base["epoch_s"]
        print(  # noqa: T201
            f"{record['model']:7} {record['setting']:17} {record['trained']:8.0f} {record['sample_s']:9.3f} "
            f"{record['epoch_s']:9.3f} {record['ratio']:8.2f}"
        )
    return records


def _shapes_sampling(adapter: Any, shapes: bool) -> Any:
    """The shapes model's repeated-context shortcut (exact, several times cheaper), or nothing."""
    import contextlib

    from diffalign.shapes.model import repeated_context_sampling

    return repeated_context_sampling(adapter) if shapes else contextlib.nullcontext()


def _median_logged(output: Any, key: str) -> float:
    """Median of ``key`` over a run's logged epochs (the first, a warm-up, left out)."""
    from pathlib import Path

    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)[key] for line in lines[1:] if line.strip())


# --- learning on the shapes world -------------------------------------------------------------------------------

GRPO_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    # The demo: Flow-GRPO with its SDE window held at the first two steps (Flow-GRPO-Fast's window, not drawn) and
    # the LoRA acting there only.
    "grpo": {},
    # Flow-GRPO as published: every step but the last stochastic and trained (9 of 10), the LoRA at every step.
    "flow_grpo": {"sampling": {"plan": "sde", "lora_in_window_only": False}},
    # MixGRPO: a 2-step SDE window sliding one step every 25 epochs over steps 0..7, then rolling back.
    "mixgrpo": {"sampling": {"plan": "sliding", "shift_every": 25, "lora_in_window_only": False}},
    "tempflow": {
        # TempFlow-GRPO: one ODE path per prompt, 8 children at each of the demo's two trained steps (64 images an
        # epoch; 138 denoiser calls a prompt against the demo's 80), noise-aware step weights. With 4 children (70
        # calls) it rose half as fast (benchmarks/RESULTS.md).
        "sampling": {"plan": "branch_at", "branch_steps": [0, 1], "branch_children": 8, "images_per_prompt": 1},
        "train": {"timestep_weighting": "noise_aware"},
    },
    "branchgrpo": {
        # BranchGRPO: a tree per prompt split 4 ways at each of the demo's two trained steps (16 leaves; SDE only on
        # the splits, its "Mix" variant), 133 denoiser calls a prompt against the demo's 80. Binary trees split at
        # 0, 1, 2 (8 leaves, 63 calls) and 3-way splits at 0, 1 (9 leaves, 76 calls) rose slower on seed 0
        # (+0.055 and +0.070 aligned strict at 280 epochs, against +0.234; benchmarks/RESULTS.md).
        "sampling": {
            "plan": "tree",
            "tree_splits": [0, 1],
            "tree_branching": 4,
            "sde_steps": [0, 1],
            "images_per_prompt": 16,
        },
    },
}
"""The GRPO methods of :func:`bench_learn`: the demo's recipe with these ``sampling`` / ``train`` keys replaced."""

BACKPROP_MODES = {"backprop": "draft_k", "refl": "refl", "direct_align": "direct_align", "image_refl": "image_refl"}
"""The reward-backprop methods of :func:`bench_learn` and their ``backprop.mode`` (``backprop`` is DRaFT-K with
K = all 10 steps)."""

SELF_PLAY_METHODS = ("raft", "spin", "seppo")
"""The self-play methods of :func:`bench_learn` (:func:`diffalign.shapes.learn.learn_self_play`)."""

DPO_VARIANTS: dict[str, dict[str, Any]] = {
    "dpo": {},
    "tpo": {"text_pairs": True},
    "inpo": {"noising": "ddim_inversion", "inversion_steps": 10, "inversion_eta": 0.1},
    "smpo": {"noising": "renoise_inversion", "inversion_steps": 5, "smoothing": "reward", "beta": 20.0},
}
"""The preference methods of :func:`bench_learn` (:func:`diffalign.shapes.learn.learn_dpo` options): Diffusion-DPO,
free-lunch text pairs, DDIM-InPO (InPO's 10 inversion steps and eta 0.1) and SmPO (ReNoise inversion with SmPO's
5 steps of SD1.5, verifier-smoothed betas of ``20 * 10 * (2p - 1)``, typically 60-150, against DPO's 100)."""

LEARN_METHODS = (*GRPO_VARIANTS, *DPO_VARIANTS, *BACKPROP_MODES, *SELF_PLAY_METHODS, "self_npo")
"""Methods of :func:`bench_learn`."""

LEARN_STEPS = {
    "grpo": 280,
    "flow_grpo": 280,
    "mixgrpo": 280,
    "tempflow": 280,
    "branchgrpo": 280,
    "dpo": 3000,
    "tpo": 3000,
    "inpo": 900,
    "smpo": 900,
    "backprop": 450,
    "refl": 600,
    "direct_align": 600,
    "image_refl": 600,
    "raft": 1500,
    "spin": 1500,
    "seppo": 1500,
    "self_npo": 1000,
}
"""Default optimizer-step budgets of :func:`bench_learn`: what each method did in 10 minutes on the 2-core
development CPU (the demo 273-314 epochs, DPO 2,930 steps, backprop 436 steps on one thread; benchmarks/RESULTS.md)."""


def bench_learn(
    method: str,
    minutes: float | None = None,
    output: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    steps: int | None = None,
    eval_every: int = 0,
    early_stopping: int = 0,
) -> dict[str, Any]:
    """Train the shipped shapes model with ``method`` and measure held-out accuracy before and after.

    The budget is ``steps`` optimizer steps (the same work on any machine; with neither budget given, the method's
    :data:`LEARN_STEPS`, about 10 minutes on the 2-core development CPU) or ``minutes`` of wall clock.

    Args:
        method: ``"grpo"`` (Flow-GRPO, the demo; one optimizer step an epoch), ``"tempflow"`` / ``"branchgrpo"``
            (TempFlow-GRPO / BranchGRPO on the demo's recipe, :data:`GRPO_VARIANTS`), ``"dpo"`` (Diffusion-DPO on
            verifier-ranked pairs, pair generation outside a steps budget, inside a minutes one), ``"backprop"``
            (DRaFT-K on the shapes CLIP score), ``"refl"``, ``"direct_align"`` or ``"image_refl"`` (the other
            reward-backprop modes on the same reward, :data:`BACKPROP_MODES`).
        minutes: wall-clock training budget (evaluation not counted); exclusive with ``steps``.
        output: run folder (default ``runs/bench_learn/<method>``); ``metrics.json`` holds the results.
        seed: training seed (the evaluation prompts and seeds are fixed).
        threads: ``torch.set_num_threads`` for the run (restored after); default: leave it.
        steps: optimizer steps of training; exclusive with ``minutes``.
        eval_every: also measure the held-out verifier every this many steps (the curve in ``metrics.json``); 0 =
            only before and after.
        early_stopping: dpo and backprop: stop when that measurement (on validation seeds) has not improved for
            this many evaluations, ending with the best one's weights; 0 = off.

    Returns:
        The metrics: ``before``, ``after`` and ``gain``, each ``{"mean_reward", "strict_accuracy"}``, plus the
        method's details. A summary is printed.

    Raises:
        ValueError: an unknown method, both budgets, or ``early_stopping`` with a GRPO method.
    """
    if method not in LEARN_METHODS:
        raise ValueError(f"unknown learning benchmark method {method!r}; choose from {', '.join(LEARN_METHODS)}")
    if minutes is not None and steps is not None:
        raise ValueError("give one budget: steps (the same work on any machine) or minutes, not both")
    if early_stopping and method in GRPO_VARIANTS:
        raise ValueError("early_stopping applies to dpo and backprop; the GRPO benchmarks run their budget")
    if minutes is None and steps is None:
        steps = LEARN_STEPS[method]
    import torch

    output = output if output is not None else os.path.join("runs", "bench_learn", method)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        if method in GRPO_VARIANTS:
            from diffalign.shapes.demo import format_summary, run_demo

            budget = {"max_steps": steps} if steps is not None else {}
            variant = GRPO_VARIANTS[method]
            metrics = run_demo(
                minutes=minutes, output=output, seed=seed, eval_every=eval_every, method=method, **variant, **budget
            )
            print(format_summary(metrics, output))  # noqa: T201
            return metrics
        from diffalign.shapes.learn import learn_backprop, learn_dpo, learn_self_npo, learn_self_play

        budget = {"max_steps": steps} if steps is not None else {}
        extra = {"eval_every": eval_every, "early_stopping": early_stopping, **budget}
        if method in DPO_VARIANTS:
            return learn_dpo(minutes=minutes, output=output, seed=seed, method=method, **DPO_VARIANTS[method], **extra)
        if method == "self_npo":
            return learn_self_npo(minutes=minutes, output=output, seed=seed, **extra)
        if method in SELF_PLAY_METHODS:
            return learn_self_play(minutes=minutes, output=output, seed=seed, method=method, **extra)
        return learn_backprop(minutes=minutes, output=output, seed=seed, mode=BACKPROP_MODES[method], **extra)
    finally:
        torch.set_num_threads(previous)


# --- sampling-time alignment -------------------------------------------------------------------------------------


def bench_sampling_alignment(
    scales: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0),
    candidates: Sequence[int] = (1, 2, 4, 8),
    search_reward: str = "shapes_clip",
    num_seeds: int = 16,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Alignment at sampling time on the shapes world, judged by the verifier on the demo's aligned prompts.

    RL guidance: the shipped demo LoRA (``diffalign/shapes/assets/demo_lora``) mixed with the base model at each
    ``w`` in ``scales``. Noise search: best-of-N of the base model for each N in ``candidates``, the search reward
    being ``search_reward`` (default the shapes CLIP, so that the verifier that judges is not the one searched with),
    and the same N as one seed's worth of sampling cost. Prints and returns ``{"rl_guidance": [{w, strict_accuracy,
    mean_reward, seconds}], "best_of": [{n, strict_accuracy, mean_reward, seconds}]}`` over 8 prompts x
    ``num_seeds`` evaluation seeds.
    """
    import torch

    from diffalign.adapters import load_adapter
    from diffalign.eval.search import NoiseSearch, search_initial_noise
    from diffalign.rewarding import build_reward, score_with_parts
    from diffalign.shapes.demo import EVAL_SEEDS, demo_prompts, load_protocol
    from diffalign.shapes.learn import evaluate_heldout
    from diffalign.shapes.model import BASE_MODEL_DIR, repeated_context_sampling

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        protocol = load_protocol(BASE_MODEL_DIR)
        size = protocol["resolution"]
        adapter = load_adapter(BASE_MODEL_DIR, height=size, width=size)
        verifier, searched_by = build_reward("shapes"), build_reward(search_reward)
        prompts, seeds = demo_prompts()[0], EVAL_SEEDS[:num_seeds]
        results: dict[str, Any] = {"rl_guidance": [], "best_of": []}
        with repeated_context_sampling(adapter):
            for n in candidates:
                began = time.monotonic()
                found = search_initial_noise(
                    adapter,
                    prompts,
                    seeds,
                    searched_by,
                    NoiseSearch(candidates=n),
                    num_steps=protocol["num_steps"],
                    guidance_scale=protocol["guidance_scale"],
                    batch_size=64,
                )
                parts = score_with_parts(verifier, found.images, [p for p in prompts for _ in seeds])
                record = {
                    "n": n,
                    "strict_accuracy": parts["strict"].mean().item(),
                    "mean_reward": parts["reward"].mean().item(),
                    "seconds": time.monotonic() - began,
                }
                results["best_of"].append(record)
                print(  # noqa: T201
                    f"best-of-{n} by {search_reward}: strict {record['strict_accuracy']:.3f}, verifier reward "
                    f"{record['mean_reward']:.3f} ({record['seconds']:.1f} s)"
                )
        adapter.load_lora(BASE_MODEL_DIR.parent / "demo_lora")
        for w in scales:
            adapter.alignment_scale = w
            began = time.monotonic()
            measured = evaluate_heldout(adapter, verifier, prompts, seeds, protocol)
            record = {"w": w, **measured, "seconds": time.monotonic() - began}
            results["rl_guidance"].append(record)
            print(  # noqa: T201
                f"RL guidance w={w:g}: strict {record['strict_accuracy']:.3f}, verifier reward "
                f"{record['mean_reward']:.3f} ({record['seconds']:.1f} s)"
            )
        return results
    finally:
        torch.set_num_threads(previous)


# --- reward server ----------------------------------------------------------------------------------------------


def bench_reward_server(
    batch_sizes: Sequence[int] = (1, 8, 32),
    requests: int = 64,
    clients: int = 4,
    resolution: int = 256,
    epochs: int = 4,
    threads: int = 1,
    reward: str = "jpeg_compressibility",
) -> dict[str, Any]:
    """Throughput of the reward server on CPU, and a tiny GRPO epoch scoring on it vs in process (printed).

    Throughput: ``diffalign reward serve --reward {reward} --device cpu --batch-size max(batch_sizes)`` runs as a
    subprocess on loopback; ``clients`` threads of this process send ``requests`` requests of ``b`` images each
    through :class:`rewards.remote.RemoteReward` (PNG), for each ``b``; the same images are also scored in process
    in batches of ``b``. The default reward, JPEG compressibility (a JPEG encode per image, no model), is cheap, so
    that the numbers show the server's own cost: PNG encode and decode, HTTP, queueing. Images are smooth (random
    ``res/8`` colours upsampled), as generated images are; pure noise would make the PNGs the bottleneck.

    GRPO: the tiny SD3 pipeline, 10 steps, 16 images an epoch in two rollout chunks of 8 (the first chunk is scored
    on the server while the second is sampled), the colour reward ``diffalign.testing:redness`` in process and on a
    server; medians of the epochs after the first.

    Returns:
        ``{"throughput": [{batch, requests_per_s, images_per_s, in_process_images_per_s}], "grpo": [{reward,
        sample_s, epoch_s}]}``.
    """
    from pathlib import Path

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _reward_server_process(reward, max(batch_sizes), threads) as url:
            throughput = [_server_throughput(url, reward, b, requests, clients, resolution) for b in batch_sizes]
        with (
            tempfile.TemporaryDirectory(prefix="diffalign-bench-reward-server-") as work,
            _reward_server_process("diffalign.testing:redness", 16, threads) as url,
        ):
            grpo = _grpo_remote_vs_local(Path(work), url, epochs)
    finally:
        torch.set_num_threads(previous)
    print(  # noqa: T201
        f"reward server ({reward}, CPU, server --batch-size {max(batch_sizes)}, {clients} client threads, "
        f"{requests} requests per size, {resolution}x{resolution} PNG, torch threads {threads})"
    )
    print(f"{'batch':>5} {'requests/s':>11} {'images/s':>9} {'in-process images/s':>20}")  # noqa: T201
    for r in throughput:
        rates = f"{r['requests_per_s']:11.1f} {r['images_per_s']:9.1f} {r['in_process_images_per_s']:20.1f}"
        print(f"{r['batch']:5d} {rates}")  # noqa: T201
    print("tiny GRPO (sd3, 10 steps, 16 images/epoch in 2 chunks, redness reward), median of epochs 2+:")  # noqa: T201
    print(f"{'reward':12} {'sample s':>9} {'epoch s':>9}")  # noqa: T201
    for r in grpo:
        print(f"{r['reward']:12} {r['sample_s']:9.3f} {r['epoch_s']:9.3f}")  # noqa: T201
    return {"throughput": throughput, "grpo": grpo}


@contextlib.contextmanager
def _reward_server_process(reward: str, batch_size: int, threads: int) -> Iterator[str]:
    """``diffalign reward serve`` in a subprocess on a free loopback port; yields its URL once it answers."""
    import httpx

    from diffalign.testing import free_port

    port = free_port()
    command = [sys.executable, "-m", "diffalign.cli", "reward", "serve", "--reward", reward, "--port", str(port)]
    command += ["--device", "cpu", "--batch-size", str(batch_size), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the reward server exited: {log.read().decode(errors='replace')[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the reward server did not answer /health within 120 s")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)


def _smooth_images(count: int, resolution: int, seed: int):
    import torch

    coarse = torch.rand(
        count, 3, max(resolution // 8, 1), max(resolution // 8, 1), generator=torch.Generator().manual_seed(seed)
    )
    return torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bilinear").clamp(0, 1)


def _server_throughput(url: str, reward: str, batch: int, requests: int, clients: int, resolution: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import rewards

    images = _smooth_images(batch, resolution, seed=batch)
    remote = rewards.load(f"remote:{url}")
    try:
        for _ in range(2):  # warm-up: connections, the server's first batch
            remote.score(images)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(lambda _: remote.score(images), range(requests)))
        elapsed = time.perf_counter() - start
    finally:
        remote.close()
    local = rewards.load(reward)
    local.score(images)
    local_start = time.perf_counter()
    for _ in range(requests):
        local.score(images)
    local_elapsed = time.perf_counter() - local_start
    return {
        "batch": batch,
        "requests_per_s": requests / elapsed,
        "images_per_s": requests * batch / elapsed,
        "in_process_images_per_s": requests * batch / local_elapsed,
    }


def _grpo_remote_vs_local(work, url: str, epochs: int) -> list[dict[str, Any]]:
    from diffalign.config import load_config
    from diffalign.testing import save_tiny_pipeline
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    folder = save_tiny_pipeline("sd3", work / "sd3")
    records = []
    # Both as one-term mappings (a weighted sum each), so that the two runs differ only in where the reward runs.
    for label, reward in (("in-process", {"diffalign.testing:redness": 1.0}), ("remote", {"remote": {"urls": [url]}})):
        output = work / label
        raw = _grpo_raw(folder, output, 10, 8, 2, 32, epochs, batch_size=8)
        raw["reward"] = reward
        GRPOTrainer(load_config(GRPOConfig, raw)).train()
        sample, epoch = _epoch_medians(output)
        records.append({"reward": label, "sample_s": sample, "epoch_s": epoch})
    return records
