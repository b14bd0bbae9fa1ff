"""Per-round ratios of a ``compare.sh`` run: diffalign (and diffalign with ``--compile``) over TRL.

    python benchmarks/ddpo_vs_trl/summarize.py [/tmp/trl021/results]

Reads ``trl_<round>.json``, ``diffalign_<round>.json`` and, when present, ``diffalign_compile_<round>.json``; prints
each round's median epoch seconds (epochs 2 to N) and ratios, then the median over the rounds.
"""

import json
import statistics
import sys
from pathlib import Path


def _median(folder: Path, name: str) -> float | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text())["median_after_warmup_s"] if path.is_file() else None


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trl021/results")
    rounds = sorted(int(p.stem.split("_")[1]) for p in folder.glob("trl_*.json"))
    ratios: dict[str, list[float]] = {"diffalign/trl": [], "compiled/trl": [], "compiled/diffalign": []}
    print("round  trl_s  diffalign_s  compiled_s  diffalign/trl  compiled/trl  compiled/diffalign")  # noqa: T201
    for r in rounds:
        trl, eager, compiled = (_median(folder, f"{name}_{r}") for name in ("trl", "diffalign", "diffalign_compile"))
        row = {"diffalign/trl": (eager, trl), "compiled/trl": (compiled, trl), "compiled/diffalign": (compiled, eager)}
        shown = []
        for key, (num, den) in row.items():
            if num is not None and den:
                ratios[key].append(num / den)
                shown.append(f"{num / den:.3f}")
            else:
                shown.append("-")
        times = " ".join(f"{t:.3f}" if t is not None else "-" for t in (trl, eager, compiled))
        print(f"{r:5d}  {times}  {'  '.join(shown)}")  # noqa: T201
    for key, values in ratios.items():
        if values:
            print(f"median {key}: {statistics.median(values):.3f} over {len(values)} rounds")  # noqa: T201


if __name__ == "__main__":
    main()
