"""Kill-and-resume soak: a tiny Flow-GRPO run killed with SIGKILL every few minutes and resumed with
``--resume auto`` until the budget is spent, then compared with an uninterrupted run of the same steps.

::

    python scripts/soak.py --minutes 30 --kill-every 180 --out runs/soak      # by hand (the closing-note figures)
    python scripts/soak.py --minutes 1.5 --kill-every 15 --out /tmp/soak      # what the slow test runs

The killed run's newest checkpoint (step S) must hold exactly the weights, EMA and optimizer state of a run that
trained S steps without interruption: every kill lands at a random time (inside a step, a save or a prune), and the
resume continues from the last complete checkpoint. Prints one JSON summary line and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


def _config(model: Path, output: Path, max_steps: int, every: int) -> dict:
    return {
        "method": "grpo",
        "model": {"path": str(model), "lora": {"rank": 2}},
        "reward": "diffalign.testing:redness",
        "output_dir": str(output),
        "seed": 3,
        "max_steps": max_steps,
        "optim": {"lr": 1e-3},  # a constant schedule: the horizon (max_steps) does not change the trajectory
        "logging": {"log_with": "none"},
        "checkpoint": {"every": every, "keep_last": 2},
        "ema": {"enabled": True, "decay": 0.9},
        "sampling": {
            "prompts": ["a red circle", "a blue square", "a green triangle"],
            "num_steps": 3,
            "guidance_scale": 1.0,
            "images_per_prompt": 2,
            "prompts_per_epoch": 2,
            "batch_size": 4,
            "resolution": 32,
        },
        "train": {"batch_size": 2},
    }


def _train(config_file: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``diffalign train`` in a child process, its output appended to ``log`` (a pipe left unread would fill)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "diffalign.cli", "train", str(config_file), *extra]
    with log.open("a") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _newest(output: Path) -> Path | None:
    from diffalign.trainers.checkpoints import list_checkpoints

    found = list_checkpoints(output)
    return found[-1] if found else None


def _step_of(checkpoint: Path | None) -> int:
    from diffalign.trainers.checkpoints import checkpoint_step

    return checkpoint_step(checkpoint) if checkpoint is not None else 0


def killed_run(config_file: Path, output: Path, minutes: float, kill_every: float, rng: random.Random) -> dict:
    """Train, SIGKILL at a random time around every ``kill_every`` seconds, resume; until ``minutes`` are spent."""
    deadline = time.monotonic() + 60 * minutes
    kills = resumes = 0
    while time.monotonic() < deadline:
        process = _train(config_file, output.with_suffix(".log"), "--resume", "auto")
        wait = min(rng.uniform(0.5, 1.5) * kill_every, max(deadline - time.monotonic(), 1.0))
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            kills += 1
        else:
            if process.returncode != 0:
                raise RuntimeError(f"the soak run failed:\n{_tail(output.with_suffix('.log'))}")
        resumes += 1
    return {"kills": kills, "launches": resumes, "steps": _step_of(_newest(output))}


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from diffalign.trainers.checkpoints import read_tensors

    tensors = {f"weights/{k}": v for k, v in read_tensors(checkpoint / "trainable.safetensors")[0].items()}
    tensors.update({f"ema/{k}": v for k, v in read_tensors(checkpoint / "ema.safetensors")[0].items()})
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for index, moments in optimizer["state"].items():
        tensors.update({f"optimizer/{index}/{k}": torch.as_tensor(v) for k, v in moments.items()})
    return tensors


def compare(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two checkpoints (bitwise)."""
    left, right = _state(a), _state(b)
    if left.keys() != right.keys():
        return sorted(left.keys() ^ right.keys())
    return [name for name in left if not torch.equal(left[name], right[name])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="time the killed run trains for")
    parser.add_argument("--kill-every", type=float, default=180.0, help="mean seconds between kills")
    parser.add_argument("--every", type=int, default=3, help="checkpoint every this many steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--out", default="runs/soak")
    args = parser.parse_args(argv)

    from diffalign.testing import save_tiny_pipeline

    out = Path(args.out)
    model = save_tiny_pipeline("sd3", out / "model")
    killed, reference = out / "killed", out / "reference"
    killed_config = out / "killed.yaml"
    killed_config.write_text(yaml.safe_dump(_config(model, killed, 10**6, args.every)))
    began = time.monotonic()
    summary = killed_run(killed_config, killed, args.minutes, args.kill_every, random.Random(args.seed))
    summary["killed_seconds"] = round(time.monotonic() - began)
    steps = summary["steps"]
    if steps == 0:
        print(json.dumps({**summary, "ok": False, "error": "no checkpoint: raise --minutes"}))  # noqa: T201
        return 1

    reference_config = out / "reference.yaml"
    reference_config.write_text(yaml.safe_dump(_config(model, reference, steps, args.every)))
    began = time.monotonic()
    process = _train(reference_config, reference.with_suffix(".log"), "--overwrite")
    if process.wait() != 0:
        raise RuntimeError(f"the reference run failed:\n{_tail(reference.with_suffix('.log'))}")
    summary["reference_seconds"] = round(time.monotonic() - began)
    # The killed run's newest checkpoint may still sit under its .old- name (a kill between two renames).
    differences = compare(_newest(killed), reference / "checkpoints" / f"checkpoint-{steps}")
    summary.update(ok=not differences, differing_tensors=len(differences), first_differences=differences[:3])
    print(json.dumps(summary))  # noqa: T201
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main())
