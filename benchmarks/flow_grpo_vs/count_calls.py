"""Count the work of one diffalign GRPO epoch under settings that make some of it useless (the "wasted work" check
of README.md): denoiser calls and rows, split into sampling, trained calls (grad) and reference calls (LoRA off),
and text-encoder calls.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flow_grpo_vs/count_calls.py --model /tmp/flow_grpo_vs/tiny-sd3

Each variant runs 2 epochs of the benchmark workload (common.py) and counts the second one; prints one line per
variant.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402
from run_diffalign import build_raw_config  # noqa: E402


VARIANTS = {
    "default (beta 0.04, CFG 4.5)": {},
    "beta 0": {"train.beta": 0.0},
    "text cache (precompute_text_embeddings)": {"sampling.precompute_text_embeddings": True},
    "no CFG (guidance 1, train.cfg false)": {"sampling.guidance_scale": 1.0, "train.cfg": False},
    "CFG in sampling, none in training (guidance 4.5, train.cfg false)": {"train.cfg": False},
}


def _set(raw: dict, dotted: str, value) -> None:
    group, key = dotted.split(".")
    raw[group][key] = value


def count_epoch(model: str, overrides: dict) -> Counter | str:
    """What the second of two epochs ran, or the config error the overrides give."""
    import torch

    from diffalign.config import ConfigError, load_config
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    output_dir = tempfile.mkdtemp(prefix="count_calls_")
    raw = build_raw_config(model, 2, output_dir, 0.04, "auto", False)
    for dotted, value in overrides.items():
        _set(raw, dotted, value)
    try:
        trainer = GRPOTrainer(load_config(GRPOConfig, raw))
    except ConfigError as err:
        shutil.rmtree(output_dir, ignore_errors=True)
        return f"refused: {err}"
    adapter, counts, epoch = trainer.adapter, Counter(), [0]

    def on_denoiser(module, args, kwargs):
        if epoch[0] != 1:
            return
        rows = kwargs["hidden_states"].shape[0]
        kind = "reference" if adapter._lora_off_depth else ("trained" if torch.is_grad_enabled() else "sampling")
        counts[f"{kind} calls"] += 1
        counts[f"{kind} rows"] += rows

    def on_text(module, args, kwargs):
        counts["text-encoder calls"] += epoch[0] == 1

    adapter.denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True)
    for name in adapter.text_encoder_names:
        getattr(adapter.pipe, name).register_forward_pre_hook(on_text, with_kwargs=True)
    train_step = trainer.train_step

    def counted(step: int):
        epoch[0] = step
        return train_step(step)

    trainer.train_step = counted
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name, overrides in VARIANTS.items():
        counts = count_epoch(args.model, overrides)
        text = counts if isinstance(counts, str) else ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{name}: {text}", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
