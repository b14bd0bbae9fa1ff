"""Compile on vs off in one process: the benchmark's DDPO epoch, alternating eager and compiled epochs.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ddpo_vs_trl/ab_compile.py --model /tmp/trl021/tiny-sd15 \\
        --pairs 6 --out /tmp/trl021/ab_compile.json

On a machine shared with other jobs, two separate runs see different loads; alternating epochs of one trainer
(``adapter.compile_denoiser`` switches between them, the compiled graphs stay cached) exposes both modes to the same
load. The first epoch of each mode is warm-up (the compiled one includes the compilation, reported as
``compile_s``). Prints and writes per-mode medians of the epoch, sampling and training seconds and the ratio
compiled / eager. ``--dynamic`` and ``--set KEY=VALUE`` as in ``run_diffalign.py``.
"""

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import set_threads, write_result  # noqa: E402
from run_diffalign import build_config  # noqa: E402


def _epoch(trainer, epoch: int) -> dict[str, float]:
    metrics = trainer.train_step(epoch)
    total, sample = metrics["time/epoch_s"], metrics["time/sample_s"]
    return {"epoch_s": total, "sample_s": sample, "train_s": total - sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", type=int, default=6, help="eager + compiled epoch pairs after the warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="default", choices=("default", "max-autotune-no-cudagraphs"))
    parser.add_argument("--dynamic", default="auto", choices=("auto", "true", "false"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    import torch

    from diffalign.trainers.grpo import GRPOTrainer

    warnings.filterwarnings("ignore")
    config = build_config(args.model, 2 * args.pairs + 2, tempfile.mkdtemp(prefix="diffalign_ab_"), overrides=args.set)
    trainer = GRPOTrainer(config)
    dynamic = None if args.dynamic == "auto" else args.dynamic == "true"
    modes = {"eager": lambda: trainer.adapter.compile_denoiser("none")}
    modes["compiled"] = lambda: trainer.adapter.compile_denoiser(args.mode, dynamic=dynamic)
    records: dict[str, list[dict[str, float]]] = {"eager": [], "compiled": []}
    epoch = 0
    for round_ in range(args.pairs + 1):
        order = ("eager", "compiled") if round_ % 2 == 0 else ("compiled", "eager")
        for name in order:
            modes[name]()
            began = time.perf_counter()
            record = _epoch(trainer, epoch)
            record["wall_s"] = time.perf_counter() - began
            records[name].append(record)
            epoch += 1
            print(f"{name} epoch {epoch}: {record['epoch_s']:.2f}s (sampling {record['sample_s']:.2f}s)", flush=True)  # noqa: T201

    def medians(rows: list[dict[str, float]]) -> dict[str, float]:
        keys = ("epoch_s", "sample_s", "train_s")
        return {key: round(statistics.median(r[key] for r in rows[1:]), 3) for key in keys}

    eager, compiled = medians(records["eager"]), medians(records["compiled"])
    result = {
        "eager": eager,
        "compiled": compiled,
        "ratio": {key: round(compiled[key] / eager[key], 3) for key in eager},
        "compile_s": round(records["compiled"][0]["epoch_s"] - compiled["epoch_s"], 1),
        "mode": args.mode,
        "dynamic": args.dynamic,
        "overrides": args.set,
        "threads": torch.get_num_threads(),
        "epochs": {name: [round(r["epoch_s"], 3) for r in rows] for name, rows in records.items()},
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
