"""The workload both sides run, and small helpers; imports neither diffalign nor flow_grpo (see README.md).

Both venvs import this file: ``run_diffalign.py`` (diffalign's venv) and ``run_flow_grpo.py`` /
``flow_grpo_config.py`` (flow_grpo's venv, ``setup.sh``).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path


PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]
"""Training prompts (flow_grpo reads them from ``<dataset>/train.txt``, written by ``setup.sh``)."""

WORKLOAD = {
    # flow_grpo config/grpo.py "general_ocr_sd3_1gpu" (group size 8, sampling batch 8, 10 steps, CFG 4.5, LoRA
    # r32/alpha64, beta 0.04, EMA 0.9 every 8 steps, timestep_fraction 0.99 = 9 trained steps, 2 optimizer steps an
    # epoch), with 2 sampling batches an epoch instead of 8 and 32 px images instead of 512 so that a CPU epoch
    # takes seconds.
    "group_size": 8,  # flow_grpo sample.num_image_per_prompt; diffalign sampling.images_per_prompt
    "sample_batch_size": 8,  # images per sampling call (one group): flow_grpo sample.train_batch_size
    "num_batches_per_epoch": 2,  # 16 images, 2 groups an epoch: diffalign sampling.prompts_per_epoch
    "num_steps": 10,
    "trained_steps": 9,  # flow_grpo: int(10 * 0.99), the first 9; diffalign plan sde: all but the last
    "guidance_scale": 4.5,  # CFG while sampling and while training (train.cfg true on both sides)
    "noise_level": 0.7,
    "resolution": 32,  # the tiny pipeline's native size (16x16 latents)
    "max_sequence_length": 128,  # T5 tokens: flow_grpo's compute_text_embeddings hard-codes 128
    "train_batch_size": 8,  # flow_grpo reshapes the epoch into num_batches_per_epoch micro-batches of 8
    "gradient_accumulation_steps": 1,  # flow_grpo: num_batches_per_epoch // 2, so 2 optimizer steps an epoch
    "lora_rank": 32,  # hard-coded in flow_grpo's train_sd3.py (r=32, alpha=64, gaussian init)
    "lora_alpha": 64,
    "beta": 0.04,  # KL to the reference (LoRA disabled): one more CFG forward per trained step
    "lr": 3e-4,
    "weight_decay": 1e-4,
    "clip_range": 1e-4,
    "adv_clip_max": 5.0,
    "max_grad_norm": 1.0,
    "ema_decay": 0.9,
    "ema_update_every": 8,
    "jpeg_weight": 1 / 500,  # flow_grpo's jpeg_compressibility is -kB / 500
}


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (the caller sets OMP_NUM_THREADS before torch is imported)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def summary(lib: str, epoch_s: list[float], skip: int = 1) -> dict:
    """Per-epoch seconds and the median of the epochs after the first ``skip`` (warm-up) ones."""
    steady = epoch_s[skip:]
    return {
        "lib": lib,
        "epoch_s": [round(s, 3) for s in epoch_s],
        "median_after_warmup_s": round(statistics.median(steady), 3) if steady else None,
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries both sides run on."""
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft, accelerate)}


def write_result(result: dict, out: Path | None) -> None:
    """Print the result as one JSON line and, with ``out``, write it there."""
    print(json.dumps(result), flush=True)  # noqa: T201
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
