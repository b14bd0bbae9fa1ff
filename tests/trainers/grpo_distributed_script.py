"""Run one GRPO epoch on a tiny pipeline and write this rank's advantages and parameter checksum.

Used by test_grpo.py under ``accelerate launch --num_processes 2 --cpu`` (and once as a single process).
Usage: python grpo_distributed_script.py PIPELINE_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from diffalign.config import load_config
from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer


def main() -> None:
    folder, out = sys.argv[1], Path(sys.argv[2])
    config = load_config(
        GRPOConfig,
        {
            "model": {"path": folder, "lora": {"rank": 4}},
            "reward": "diffalign.testing:redness",
            "output_dir": str(out),
            "seed": 0,
            "max_steps": 1,
            "optim": {"lr": 1e-2},
            "logging": {"log_with": "none"},
            "checkpoint": {"every": 0},
            "sampling": {
                "prompts": ["a red circle", "a blue square"],
                "num_steps": 4,
                "images_per_prompt": 4,
                "prompts_per_epoch": 2,
                "batch_size": 4,
                "guidance_scale": 2.0,
                "resolution": 32,
            },
            "train": {"batch_size": 2, "clip_range": 1e-2},
            "eval": {"every": 1, "prompts": ["a red circle", "a cat", "two blue squares"], "seeds": [0, 1]},
        },
    )
    trainer = GRPOTrainer(config)
    run = trainer.run
    initial = sum(p.detach().double().abs().sum().item() for p in run.params)
    trajectory, rewards, _, group_ids = trainer.sample_epoch(0)
    advantages, _ = trainer.advantages(rewards, group_ids, trajectory.prompts)
    metrics = trainer.train_epoch(trajectory, advantages, 0)
    checksum = sum(p.detach().double().abs().sum().item() for p in run.params)
    # Zero-advantage filtering left rank 1 with nothing to train: both ranks must still step together.
    uneven = advantages.clone() if run.accelerator.process_index == 0 else torch.zeros_like(advantages)
    steps_before = run.optimizer_steps
    trainer.train_epoch(trajectory, uneven, 1)
    # Evaluation: each rank samples and scores its share of the 6 images; only the main process writes a grid.
    trainer.evaluator.output_dir = out / f"eval-rank{run.accelerator.process_index}"
    evaluation = trainer.evaluator(0)
    record = {
        "world_size": run.accelerator.num_processes,
        "advantages": advantages.tolist(),
        "initial_checksum": initial,
        "param_checksum": checksum,
        "num_train_samples": metrics["num_train_samples"],
        "eval": evaluation,
        "wrote_grid": (trainer.evaluator.output_dir / "eval" / "step-000000.png").is_file(),
        "policy_loss": metrics["policy_loss"],
        "uneven_steps": run.optimizer_steps - steps_before,
        "uneven_checksum": sum(p.detach().double().abs().sum().item() for p in run.params),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{run.accelerator.process_index}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
