"""The shapes learning benchmark side by side: held-out curves as a plot, gains at 1x and 2x the budget as a table.

Reads the ``metrics.json`` of ``diffalign bench learn`` runs made with twice a method's default budget
(``--steps 2N --eval-every E`` with ``E`` dividing ``N``), so that one run gives both points: the held-out aligned
strict accuracy at step ``N`` (1x, from the curve; the periodic evaluation uses the final measurement's prompts and
seeds) and at the end (2x). Run folders are named ``<anything>_s<seed>``.

    python benchmarks/learning_curves.py runs/online2/*_s? --out benchmarks/learning_curves.svg

Prints a Markdown table (gain at 1x, gain at 2x, unseen-prompt change at the end, seconds per update, denoiser rows
per update: every forward row while training, CFG halves and gradient-checkpoint recomputation counted, the
periodic evaluation not; runs made before that count existed show n/a) and writes the
plot (aligned strict accuracy against the fraction of the 1x budget, one line per run). Needs matplotlib
(``pip install diffalign[plot]``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from diffalign.bench import LEARN_STEPS


def load_run(folder: Path) -> dict[str, Any]:
    """A run's method, seed, budget, curve and results from its ``metrics.json``."""
    metrics = json.loads((folder / "metrics.json").read_text())
    method = metrics.get("method") or "grpo"
    seed = re.search(r"_s(\d+)$", folder.name)
    steps = metrics.get("train", {}).get("steps") or metrics.get("epochs")
    minutes = metrics.get("train", {}).get("minutes")
    per_update = metrics.get("seconds_per_epoch") or (60 * minutes / steps if minutes and steps else None)
    return {
        "folder": folder,
        "method": method,
        "seed": int(seed.group(1)) if seed else None,
        "steps": steps,
        "budget": LEARN_STEPS[method],
        "curve": metrics.get("curve", []),
        "before": metrics["before"]["strict_accuracy"],
        "after": metrics["after"]["strict_accuracy"],
        "unseen": metrics["unseen"]["gain"]["strict_accuracy"],
        "seconds_per_update": per_update,
        "calls": metrics.get("rollout_denoiser_calls_per_epoch"),
        "rows": metrics.get("denoiser_rows_per_epoch") or metrics.get("train", {}).get("denoiser_rows_per_step"),
    }


def at_step(run: dict[str, Any], step: int) -> float | None:
    """The curve's strict accuracy at ``step`` (None when it was not measured there)."""
    return next((point["strict_accuracy"] for point in run["curve"] if point["step"] == step), None)


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown rows: method, seed, 1x budget, gain at 1x and at the end, unseen change at the end, s/update."""
    lines = [
        "| method | seed | 1x budget | gain at 1x | steps run | gain at end | unseen change at end | s / update | "
        "rollout calls / update | denoiser rows / update |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: (r["method"], r["seed"] or 0)):
        one = at_step(run, run["budget"])
        gain_1x = f"{one - run['before']:+.3f}" if one is not None else "n/a"
        seconds = f"{run['seconds_per_update']:.2f}" if run["seconds_per_update"] else "n/a"
        calls = f"{run['calls']:.0f}" if run["calls"] else "n/a"
        rows = f"{run['rows']:.0f}" if run["rows"] else "n/a"
        lines.append(
            f"| {run['method']} | {run['seed']} | {run['budget']} | {gain_1x} | {run['steps']} | "
            f"{run['after'] - run['before']:+.3f} | {run['unseen']:+.3f} | {seconds} | {calls} | {rows} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    """Aligned strict accuracy against the fraction of the method's 1x budget, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({run["method"] for run in runs})
    colours = {method: plt.get_cmap("tab10")(i % 10) for i, method in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        if not run["curve"]:
            continue
        x = [point["step"] / run["budget"] for point in run["curve"]]
        y = [point["strict_accuracy"] for point in run["curve"]]
        style = "-" if (run["seed"] or 0) == 0 else "--"
        label = f"{run['method']} (seed {run['seed']})"
        ax.plot(x, y, style, color=colours[run["method"]], marker="o", markersize=3, label=label)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimizer steps / the method's 1x budget")
    ax.set_ylabel("held-out aligned strict accuracy (8 prompts x 16 seeds)")
    ax.set_title("Shapes world: learning curves at 2x the budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, metadata={"Date": None})  # no timestamp: the SVG changes only with the data
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.json)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/learning_curves.svg"))
    args = parser.parse_args()
    runs = [load_run(folder) for folder in args.runs if (folder / "metrics.json").is_file()]
    print(table(runs))  # noqa: T201
    plot(runs, args.out)
    print(f"plot: {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
