"""diffalign side: times GRPOTrainer epochs with the flow_grpo workload of common.py, on CPU.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flow_grpo_vs/run_diffalign.py \\
        --model /tmp/flow_grpo_vs/tiny-sd3 --epochs 4 --out diffalign.json

An epoch is one ``GRPOTrainer.train_step`` call, timed from its start to its return: prompt encoding, sampling,
decoding, rewards, advantages and training with its optimizer and EMA steps (the trainer's own ``time/epoch_s`` is
the same span). Prints and writes ``{"lib": "diffalign", "epoch_s": [...], ...}``. ``--profile FILE`` also writes a
cProfile of the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import PROMPTS, WORKLOAD, library_versions, set_threads, summary, write_result  # noqa: E402


def build_raw_config(model: str, epochs: int, output_dir: str, beta: float, timestep_chunk, precompute: bool) -> dict:
    """The GRPO config (as a mapping) that mirrors flow_grpo_config.py; one key per flow_grpo setting."""
    w = WORKLOAD
    return {
        "method": "grpo",
        "model": {
            "path": model,
            "max_sequence_length": w["max_sequence_length"],
            # target_modules null: the SD3 default, flow_grpo's 8 joint-attention projections
            "lora": {"rank": w["lora_rank"], "alpha": w["lora_alpha"], "init": "gaussian"},
        },
        "reward": {"jpeg_compressibility": w["jpeg_weight"]},  # -kB / 500, flow_grpo's jpeg_compressibility
        "output_dir": output_dir,
        "seed": 42,
        "max_steps": epochs,
        "mixed_precision": "no",
        "optim": {
            "lr": w["lr"],
            "betas": [0.9, 0.999],
            "weight_decay": w["weight_decay"],
            "eps": 1e-8,
            "max_grad_norm": w["max_grad_norm"],
            "gradient_accumulation_steps": w["gradient_accumulation_steps"],
        },
        "ema": {"enabled": True, "decay": w["ema_decay"], "update_every": w["ema_update_every"]},
        "logging": {"log_with": "none", "log_every": 1},
        "checkpoint": {"every": 0},
        "sampling": {
            "prompts": PROMPTS,
            "num_steps": w["num_steps"],
            "guidance_scale": w["guidance_scale"],
            "kernel": "sde",
            "noise_level": w["noise_level"],
            "plan": "sde",  # every step but the last stochastic, all 9 trained (flow_grpo: the first 9 of 10)
            "train_fraction": 1.0,
            "images_per_prompt": w["group_size"],
            "prompts_per_epoch": w["num_batches_per_epoch"],  # one group per sampling batch, as flow_grpo's
            "batch_size": w["sample_batch_size"],
            "negative_prompt": "",  # flow_grpo encodes [""] as the negative
            "precompute_text_embeddings": precompute,
            "resolution": w["resolution"],
        },
        "train": {
            "batch_size": w["train_batch_size"],
            "clip_range": w["clip_range"],
            "adv_clip_max": w["adv_clip_max"],
            "beta": beta,
            "kl_convention": "flow_grpo",
            "cfg": True,
            "cfg_uncond_grad": False,  # flow_grpo detaches the unconditional branch (train_sd3.py compute_log_prob)
            "advantage": "group",
            "global_std": True,
            "num_inner_epochs": 1,
            "timestep_chunk": timestep_chunk,
        },
    }


def _chunk(value: str):
    return value if value == "auto" else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the tiny SD3 folder (setup.sh), the same as flow_grpo's")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=WORKLOAD["beta"], help="KL coefficient (0: no reference)")
    parser.add_argument("--timestep-chunk", type=_chunk, default="auto", help="train.timestep_chunk: auto, 0 or N")
    parser.add_argument("--precompute", action="store_true", help="sampling.precompute_text_embeddings: true")
    parser.add_argument(
        "--cfg-uncond-grad",
        action="store_true",
        help="train.cfg_uncond_grad: true (the gradient through both CFG branches; not flow_grpo's, which detaches)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of the run here")
    args = parser.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore")

    import torch

    import diffalign
    from diffalign.config import load_config
    from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer

    output_dir = tempfile.mkdtemp(prefix="diffalign_flow_grpo_vs_")
    raw = build_raw_config(args.model, args.epochs, output_dir, args.beta, args.timestep_chunk, args.precompute)
    raw["train"]["cfg_uncond_grad"] = args.cfg_uncond_grad
    trainer = GRPOTrainer(load_config(GRPOConfig, raw))
    epoch_s: list[float] = []
    train_step = trainer.train_step

    def timed_train_step(epoch: int):
        began = time.perf_counter()
        metrics = train_step(epoch)
        epoch_s.append(time.perf_counter() - began)
        return metrics

    trainer.train_step = timed_train_step  # timing only; run_steps calls the instance attribute
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        trainer.train()
        profiler.disable()
        profiler.dump_stats(args.profile)
    else:
        trainer.train()

    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(output_dir, ignore_errors=True)  # the run folder: config, metrics, the exported LoRA
    rows = [r for r in rows if "time/epoch_s" in r]
    for e, (total, row) in enumerate(zip(epoch_s, rows)):
        print(f"diffalign epoch {e}: {total:.2f}s (sampling {row['time/sample_s']:.2f}s)", flush=True)  # noqa: T201
    result = summary("diffalign", epoch_s)
    result.update(
        sample_s=[round(r["time/sample_s"], 3) for r in rows],
        trainer_epoch_s=[round(r["time/epoch_s"], 3) for r in rows],
        trained_images=[r.get("num_train_samples") for r in rows],
        trainable_params=sum(p.numel() for p in trainer.adapter.denoiser.parameters() if p.requires_grad),
        beta=args.beta,
        timestep_chunk=args.timestep_chunk,
        precompute_text_embeddings=args.precompute,
        cfg_uncond_grad=args.cfg_uncond_grad,
        threads=torch.get_num_threads(),
        versions={"diffalign": getattr(diffalign, "__version__", "?"), **library_versions()},
    )
    write_result(result, args.out)


if __name__ == "__main__":
    main()
