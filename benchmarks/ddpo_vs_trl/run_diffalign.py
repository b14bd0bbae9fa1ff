"""diffalign side of the DDPO speed comparison: times GRPOTrainer epochs (DDIM kernel = DDPO) on CPU.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ddpo_vs_trl/run_diffalign.py \
        --model /tmp/trl021/tiny-sd15 --epochs 4 --threads 2 --out /tmp/trl021/diffalign.json

The epoch time is the trainer's own ``time/epoch_s`` (sampling + rewards + advantages + training) from
``<output_dir>/metrics.jsonl``. Prints and writes ``{"lib": "diffalign", "epoch_s": [...], ...}``.
``--profile FILE`` additionally writes a cProfile of the whole run. ``--compile default`` runs the UNet through
``torch.compile`` (``model.compile``); its first epoch then includes the compilation, which the reported median of
epochs 2 to N leaves out (``compile_s`` in the result: epoch 1 minus the median).
"""

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import PROMPTS, WORKLOAD, library_versions, set_threads, summary, write_result  # noqa: E402


def build_config(model: str, epochs: int, output_dir: str, compile_mode: str = "none", overrides=()):
    from diffalign.config import load_config
    from diffalign.trainers.grpo import GRPOConfig

    w = WORKLOAD
    raw = {
        "model": {
            "path": model,
            "lora": {"rank": w["lora_rank"], "alpha": w["lora_rank"], "target_modules": w["lora_targets"]},
            "compile": compile_mode,
        },
        "reward": f"{HERE / 'redness.py'}:redness",
        "output_dir": output_dir,
        "seed": 0,
        "max_steps": epochs,
        "mixed_precision": "no",
        "optim": {
            "lr": w["lr"],
            "weight_decay": w["weight_decay"],
            "max_grad_norm": w["max_grad_norm"],
            "gradient_accumulation_steps": w["gradient_accumulation_steps"],
        },
        "logging": {"log_with": "none", "log_every": 1},
        "checkpoint": {"every": 0},
        "sampling": {
            "prompts": PROMPTS,
            "kernel": "ddim",
            "plan": "sde",  # with the DDIM kernel: every step stochastic and trained, the last included
            "num_steps": w["num_steps"],
            "noise_level": w["eta"],
            "guidance_scale": w["guidance_scale"],
            "negative_prompt": "",
            "images_per_prompt": 1,  # one image per prompt: the group advantage is batch normalisation (as TRL)
            "prompts_per_epoch": w["sample_batch_size"] * w["sample_num_batches_per_epoch"],
            "batch_size": w["sample_batch_size"],
        },
        "train": {
            "batch_size": w["train_batch_size"],
            "cfg": True,
            "advantage": "group",
            "clip_range": w["clip_range"],
            "adv_clip_max": w["adv_clip_max"],
            "num_inner_epochs": 1,
        },
    }
    return load_config(GRPOConfig, raw, list(overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers SD1.5-style folder (the same as TRL's)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of the run here")
    parser.add_argument(
        "--compile", default="none", choices=("none", "default", "max-autotune-no-cudagraphs"), help="model.compile"
    )
    parser.add_argument(
        "--dynamic",
        default="auto",
        choices=("auto", "true", "false"),
        help="with --compile: torch.compile's dynamic (auto = None: static, symbolic after a second batch size)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (not the protocol's)"
    )
    args = parser.parse_args()
    set_threads(args.threads)

    import torch

    import diffalign
    from diffalign.trainers.grpo import GRPOTrainer

    warnings.filterwarnings("ignore")
    output_dir = tempfile.mkdtemp(prefix="diffalign_ddpo_")
    trainer = GRPOTrainer(build_config(args.model, args.epochs, output_dir, args.compile, args.set))
    if args.compile != "none" and args.dynamic != "auto":
        trainer.adapter.compile_denoiser(args.compile, dynamic=args.dynamic == "true")
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
    rows = [r for r in rows if "time/epoch_s" in r]
    epoch_s = [r["time/epoch_s"] for r in rows]
    for i, r in enumerate(rows):
        print(f"diffalign epoch {i}: {r['time/epoch_s']:.2f}s (sampling {r['time/sample_s']:.2f}s)", flush=True)  # noqa: T201
    result = summary("diffalign" if args.compile == "none" else f"diffalign_compile_{args.compile}", epoch_s)
    result.update(
        sample_s=[round(r["time/sample_s"], 3) for r in rows],
        num_train_samples=[r.get("num_train_samples") for r in rows],
        trainable_params=sum(p.numel() for p in trainer.adapter.denoiser.parameters() if p.requires_grad),
        threads=torch.get_num_threads(),
        compile=args.compile,
        dynamic=args.dynamic,
        overrides=args.set,
        compile_s=round(epoch_s[0] - result["median_after_warmup_s"], 1) if len(epoch_s) > 1 else None,
        versions={
            "diffalign": getattr(diffalign, "__version__", "?"),
            "torch": torch.__version__,
            **library_versions(),
        },
    )
    write_result(result, args.out)


if __name__ == "__main__":
    main()
