"""Train a tiny pipeline with one of the three trainers, then write the logged losses and the trained weights.

Used by test_fsdp.py under ``accelerate launch`` (FSDP2 or DDP, 2 CPU processes) and as a single process.
Usage: python distributed_run_script.py METHOD MODEL_DIR OUT_DIR LORA_RANK MAX_STEPS [DATA_DIR] [FLAGS]
(flags: --resume, --as-two, --bf16, --cache: text embeddings cached, encoders deleted)

Writes ``OUT_DIR/result-rank{R}.json`` (the metrics of every logged step); the trained weights are the run's own
export (``OUT_DIR/run/lora`` or ``OUT_DIR/run/model``).
"""

import json
import os
import sys
from pathlib import Path

from diffalign.adapters.base import DiffusionAdapter
from diffalign.config import load_config
from diffalign.trainers import get_trainer


PROMPTS = ["a red circle", "a blue square", "a green cat", "two red stars"]


def raw_config(
    method: str, model_dir: str, out: Path, lora_rank: int, max_steps: int, data_dir: str | None, world: int
) -> dict:
    """The same global batch on any number of processes (``world``): each takes its share of 8 samples (4 pairs
    for DPO)."""
    common = {
        "method": method,
        "model": {"path": model_dir, "lora": {"rank": lora_rank}},
        "output_dir": str(out / "run"),
        "seed": 0,
        "max_steps": max_steps,
        "optim": {"lr": 1e-2 if lora_rank else 1e-3},
        "logging": {"log_with": "none", "log_every": 1},
        "checkpoint": {"every": 1},
    }
    sampling = {"prompts": PROMPTS, "num_steps": 3, "guidance_scale": 2.0, "resolution": 16}
    if method == "grpo":
        return common | {
            "reward": "diffalign.testing:redness",
            # 4 prompts x 2 images per epoch over all processes, all of them in one optimizer step.
            "sampling": sampling | {"images_per_prompt": 2, "prompts_per_epoch": 4, "batch_size": 2},
            "train": {"batch_size": 8 // world, "clip_range": 1e-2, "beta": 0.0 if lora_rank else 0.05},
        }
    if method == "reward_backprop":
        return common | {
            "reward": "diffalign.testing:redness",
            "sampling": sampling | {"batch_size": 4 // world},
            "backprop": {"mode": "draft_k", "k": 1},
        }
    # Two data streams whatever the process count, so that the global batches are the same pairs.
    data = {"source": data_dir, "batch_size": 4 // world, "resolution": 16, "num_streams": 2}
    return common | {"data": data | {"random_flip": False, "empty_caption_prob": 0.0}}


def count_encodings() -> list[int]:
    """Record how many prompts each precompute call of this process encodes."""
    counts: list[int] = []
    precompute = DiffusionAdapter.precompute_text_embeddings

    def counted(self, *args, **kwargs):
        counts.append(precompute(self, *args, **kwargs))
        return counts[-1]

    DiffusionAdapter.precompute_text_embeddings = counted
    return counts


def main() -> None:
    method, model_dir, out, lora_rank, max_steps = sys.argv[1:6]
    rest = sys.argv[6:]
    data_dir = next((arg for arg in rest if not arg.startswith("--")), None)
    out = Path(out)
    # --as-two: the per-process batch of a 2-process run (to resume its checkpoint on one process).
    world = 2 if "--as-two" in rest else int(os.environ.get("WORLD_SIZE", "1"))
    raw = raw_config(method, model_dir, out, int(lora_rank), int(max_steps), data_dir, world)
    if "--cache" in rest:
        raw["sampling"]["precompute_text_embeddings"] = True
        raw["model"]["offload_text_encoders"] = "delete"
    if "--bf16" in rest:
        raw["mixed_precision"] = "bf16"
    if "--resume" in rest:
        raw["checkpoint"]["resume_from"] = "latest"
    config_class, trainer_class = get_trainer(method)
    config = load_config(config_class, raw)
    encoded = count_encodings()
    trainer = trainer_class(config)
    run = trainer.run
    cache = trainer.adapter.text_cache
    sharded, shard_type = run.sharded, type(run.params[0].data).__name__
    rank = run.accelerator.process_index
    trainer.train()  # ends with the export: run/lora or run/model, gathered from the shards when sharded
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    record = {
        "world_size": run.accelerator.num_processes,
        "sharded": sharded,
        "shard_type": shard_type,
        "metrics": [json.loads(line) for line in lines],
        "encoded": sum(encoded),
        "cached": 0 if cache is None else len(cache),
        "encoders_left": [name for name in trainer.adapter.text_encoder_names if getattr(trainer.adapter.pipe, name)],
    }
    (out / f"result-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
