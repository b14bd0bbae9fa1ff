"""Print the per-round table and the median ratio diffalign / flow_grpo from compare.sh's results folder.

    python benchmarks/flow_grpo_vs/summarize.py /tmp/flow_grpo_vs/results [--json]

Each round ``r`` has ``flow_grpo_r.json`` and ``diffalign_r.json`` (the runners' output) and the 1/5/15-minute load
averages read before each run (``<lib>_r.load``). A round's ratio compares the two runs' medians of the epochs after
the first; the reported value is the median of the rounds' ratios. Needs no third-party package.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


LIBS = ("flow_grpo", "diffalign")


def load_round(results: Path, round_id: str) -> dict | None:
    """One round's two results and loads, or None when a side is missing."""
    row: dict = {"round": round_id}
    for lib in LIBS:
        path = results / f"{lib}_{round_id}.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        load = results / f"{lib}_{round_id}.load"
        row[lib] = {
            "median_s": data["median_after_warmup_s"],
            "sample_median_s": statistics.median(data["sample_s"][1:]) if len(data["sample_s"]) > 1 else None,
            "epoch_s": data["epoch_s"],
            "load": load.read_text().split() if load.is_file() else [],
        }
    row["ratio"] = row["diffalign"]["median_s"] / row["flow_grpo"]["median_s"]
    return row


def rounds(results: Path) -> list[dict]:
    """Every complete round in ``results``, in round order."""
    ids = sorted({p.stem.split("_")[-1] for p in results.glob("flow_grpo_*.json")}, key=lambda s: (len(s), s))
    return [row for row in (load_round(results, r) for r in ids) if row is not None]


def median_ratio(rows: list[dict]) -> float | None:
    """The median over rounds of diffalign's median epoch over flow_grpo's."""
    return statistics.median(row["ratio"] for row in rows) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    rows = rounds(args.results)
    if args.json:
        print(json.dumps({"rounds": rows, "median_ratio": median_ratio(rows)}, indent=1))  # noqa: T201
        return
    print("| round | load (fg / da) | flow_grpo s/epoch (sampling) | diffalign s/epoch (sampling) | ratio |")  # noqa: T201
    print("|---|---|---|---|---|")  # noqa: T201
    for row in rows:
        fg, da = row["flow_grpo"], row["diffalign"]
        load = f"{' '.join(fg['load'][:1])} / {' '.join(da['load'][:1])}"
        print(  # noqa: T201
            f"| {row['round']} | {load} | {fg['median_s']:.3f} ({fg['sample_median_s']:.2f}) "
            f"| {da['median_s']:.3f} ({da['sample_median_s']:.2f}) | {row['ratio']:.3f} |"
        )
    ratio = median_ratio(rows)
    print(f"median ratio diffalign / flow_grpo over {len(rows)} rounds: {ratio:.3f}" if rows else "no rounds")  # noqa: T201


if __name__ == "__main__":
    main()
