"""Compare reference and our scores: ``python compare.py WORKDIR SCORER [SCORER ...]`` prints a Markdown table.

Per scorer and image size: the max relative difference ``|ours - ref| / |ref|``, the max absolute difference, that
difference as a fraction of the spread of the reference scores over the images (random weights can put a score near
0, where the relative difference says little), and the reference scores' range. Exit status 1 when a 224 x 224 row
(no resampling on either side) exceeds ``TOLERANCE``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


TOLERANCE = 1e-3


def rows(work: Path, name: str) -> list[dict]:
    ref = json.loads((work / f"{name}.reference.json").read_text())
    ours = json.loads((work / f"{name}.ours.json").read_text())
    sizes = defaultdict(list)
    for entry in json.loads((work / "images" / "manifest.json").read_text()):
        sizes[tuple(entry["size"])].append(entry["file"])
    out = []
    for (height, width), files in sizes.items():
        pairs = [(ref[f], ours[f]) for f in files]
        out.append(
            {
                "scorer": name,
                "size": f"{height}x{width}",
                "max_rel": max(abs(o - r) / max(abs(r), 1e-12) for r, o in pairs),
                "max_abs": max(abs(o - r) for r, o in pairs),
                "ref_min": min(r for r, _ in pairs),
                "ref_max": max(r for r, _ in pairs),
            }
        )
    return out


def main(argv: list[str]) -> int:
    work = Path(argv[0])
    table = [row for name in argv[1:] for row in rows(work, name)]
    header = "| scorer | images (HxW) | max rel. diff | max abs. diff | abs. diff / score spread "
    print(header + "| reference scores (min .. max) |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for r in table:
        spread = max(r["ref_max"] - r["ref_min"], 1e-12)
        line = f"| {r['scorer']} | {r['size']} | {r['max_rel']:.2e} | {r['max_abs']:.2e} "
        print(line + f"| {r['max_abs'] / spread:.2e} | {r['ref_min']:.5g} .. {r['ref_max']:.5g} |")  # noqa: T201
    failed = [r for r in table if r["size"] == "224x224" and r["max_rel"] > TOLERANCE]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
