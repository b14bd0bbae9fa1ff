"""flow_grpo side: runs flow_grpo's own ``scripts/train_sd3.py`` (unmodified, from the checkout given) on CPU and
times its epochs. Run it with flow_grpo's venv (``setup.sh``); it never imports diffalign:

    OMP_NUM_THREADS=2 benchmarks/flow_grpo_vs/.venv/bin/python benchmarks/flow_grpo_vs/run_flow_grpo.py \\
        --flow-grpo /path/to/flow_grpo --model /tmp/flow_grpo_vs/tiny-sd3 --epochs 4 --out flow_grpo.json

The script is imported as a module and its ``main`` run through absl with ``--config=flow_grpo_config.py``.
Run-time patches, none of which changes the work that is timed (README.md, "Patches"):

1. ``WANDB_MODE=disabled``: ``wandb.init``/``wandb.log`` become no-ops (no account, no network). After
   ``wandb.init``, ``wandb.log`` is replaced by a function that keeps the logged dicts, from which the trained batch
   size and the optimizer steps are read.
2. One process gets no DDP wrapper from ``accelerator.prepare``, so the script's ``transformer.module`` (used only
   for the KL reference, ``transformer.module.disable_adapter()``) does not exist; the prepared PeftModel gets a
   ``module`` attribute pointing at itself, which is what DDP's ``.module`` returns.
3. Timing only: ``DistributedKRepeatSampler.set_epoch`` (called by the script at the start of every sampling batch)
   records the clock at each epoch's first batch and stops the run after ``--epochs`` epochs (the script loops
   forever); the module's ``pipeline_with_logprob`` is wrapped to add up the sampling seconds.

Epoch ``e`` is the time between the first sampling batch of epoch ``e`` and that of epoch ``e + 1``: prompt
encoding, sampling, decoding, rewards, advantages and training with its optimizer and EMA steps (evaluation runs
before epoch 0 only, outside it). Prints and writes ``{"lib": "flow_grpo", "epoch_s": [...], ...}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import PROMPTS, WORKLOAD, library_versions, set_threads, summary, write_result  # noqa: E402


class _Done(Exception):
    """Raised from the epoch hook once the requested epochs are timed."""


def _load_script(flow_grpo: Path):
    """Import ``scripts/train_sd3.py`` as a module (its ``main`` does not run on import)."""
    script = flow_grpo / "scripts" / "train_sd3.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: --flow-grpo must be the root of a flow_grpo checkout")
    sys.path.insert(0, str(flow_grpo))  # `import flow_grpo.*`, as `pip install -e .` of the checkout would give
    spec = importlib.util.spec_from_file_location("flow_grpo_train_sd3", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commit(flow_grpo: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(flow_grpo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _patch_single_process_module(accelerate, seen: dict) -> None:
    """Patch 2: give an unwrapped prepared model the ``.module`` attribute a DDP wrapper has; records the model's
    trainable parameter count in ``seen``."""
    prepare = accelerate.Accelerator.prepare

    def prepare_with_module(self, *args, **kwargs):
        prepared = prepare(self, *args, **kwargs)
        first = prepared[0] if isinstance(prepared, tuple) else prepared
        if hasattr(first, "disable_adapter"):
            seen["trainable_params"] = sum(p.numel() for p in first.parameters() if p.requires_grad)
            if self.num_processes == 1 and "module" not in vars(first):
                object.__setattr__(first, "module", first)  # a plain attribute, not a registered submodule
        return prepared

    accelerate.Accelerator.prepare = prepare_with_module


class _EpochClock:
    """Patch 3: epoch boundaries from ``set_epoch`` and sampling seconds from ``pipeline_with_logprob``."""

    def __init__(self, module, epochs: int) -> None:
        self.epochs, self.batches = epochs, WORKLOAD["num_batches_per_epoch"]
        self.starts: list[float] = []
        self.sample_s: list[float] = []
        self.logged: list[dict] = []
        set_epoch = module.DistributedKRepeatSampler.set_epoch
        sample = module.pipeline_with_logprob
        clock = self

        def timed_set_epoch(sampler, value):
            # The script calls set_epoch(epoch * num_batches_per_epoch + i) before each sampling batch; accelerate's
            # DataLoaderShard calls set_epoch(0) once more when the iterator starts (inside epoch 0's first batch),
            # hence the test on the epoch index rather than on every multiple of num_batches_per_epoch.
            epoch = value // clock.batches
            if epoch == len(clock.starts):
                clock.starts.append(time.perf_counter())
                if len(clock.starts) > clock.epochs:
                    raise _Done
                clock.sample_s.append(0.0)
            return set_epoch(sampler, value)

        def timed_sample(*args, **kwargs):
            began = time.perf_counter()
            out = sample(*args, **kwargs)
            if clock.starts:  # the evaluation before epoch 0 is not counted
                clock.sample_s[-1] += time.perf_counter() - began
            return out

        def keep_log(data, *args, **kwargs):
            clock.logged.append({"epoch": len(clock.starts) - 1, **dict(data)})

        wandb, init = module.wandb, module.wandb.init

        def init_then_keep_log(*args, **kwargs):
            run = init(*args, **kwargs)
            wandb.log = keep_log  # wandb.init rebinds wandb.log to the (disabled) run's
            return run

        module.DistributedKRepeatSampler.set_epoch = timed_set_epoch
        module.pipeline_with_logprob = timed_sample
        wandb.init = init_then_keep_log

    def epoch_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]

    def per_epoch(self, key: str) -> list:
        """The values of one logged key, grouped by epoch."""
        return [[row[key] for row in self.logged if row["epoch"] == e and key in row] for e in range(self.epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow-grpo", type=Path, required=True, help="root of a flow_grpo checkout")
    parser.add_argument("--model", required=True, help="the tiny SD3 folder (setup.sh), the same as diffalign's")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=WORKLOAD["beta"], help="KL coefficient (0: no reference)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ["WANDB_MODE"] = "disabled"  # patch 1
    os.environ.setdefault("WANDB_SILENT", "true")
    set_threads(args.threads)
    warnings.filterwarnings("ignore")

    import accelerate
    import torch
    from absl import app

    flow_grpo = args.flow_grpo.resolve()
    module = _load_script(flow_grpo)
    seen: dict = {}
    _patch_single_process_module(accelerate, seen)
    clock = _EpochClock(module, args.epochs)

    work = Path(tempfile.mkdtemp(prefix="flow_grpo_vs_"))
    dataset = work / "dataset"
    dataset.mkdir()
    (dataset / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    (dataset / "test.txt").write_text(PROMPTS[0] + "\n")
    os.environ.update(
        FLOW_GRPO_VS_DIR=str(flow_grpo),
        FLOW_GRPO_VS_MODEL=str(Path(args.model).resolve()),
        FLOW_GRPO_VS_DATASET=str(dataset),
        FLOW_GRPO_VS_WORK=str(work),
        FLOW_GRPO_VS_BETA=str(args.beta),
    )
    try:
        app.run(module.main, argv=["train_sd3.py", f"--config={HERE / 'flow_grpo_config.py'}"])
    except _Done:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the dataset files and the script's (empty) log folders
    epoch_s = clock.epoch_seconds()
    if len(epoch_s) < args.epochs:
        raise SystemExit(f"flow_grpo stopped after {len(epoch_s)} of {args.epochs} epochs")
    for e, (total, sampled) in enumerate(zip(epoch_s, clock.sample_s)):
        print(f"flow_grpo epoch {e}: {total:.2f}s (sampling {sampled:.2f}s)", flush=True)  # noqa: T201
    result = summary("flow_grpo", epoch_s)
    result.update(
        sample_s=[round(s, 3) for s in clock.sample_s[: args.epochs]],
        trained_images=[sum(v) * WORKLOAD["num_batches_per_epoch"] for v in clock.per_epoch("actual_batch_size")],
        optimizer_steps=[len(v) for v in clock.per_epoch("policy_loss")],
        trainable_params=seen.get("trainable_params"),
        beta=args.beta,
        threads=torch.get_num_threads(),
        flow_grpo_commit=_commit(flow_grpo),
        versions=library_versions(),
    )
    write_result(result, args.out)


if __name__ == "__main__":
    main()
