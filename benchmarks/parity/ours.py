"""Score the parity images with this project's scorers (runs in the project's venv).

``python ours.py SCORER WORKDIR OUT_JSON`` writes ``{"file": score}``, loading the weights written by writers.py
through ``rewards.load(name, path=..., ...)`` in float32 on the CPU. Images are read from the same PNGs as the
reference, converted ``uint8 -> float / 255`` to ``[1, 3, H, W]`` and scored one prompt at a time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import rewards  # noqa: E402


def options(name: str, work: Path) -> dict:
    """The ``rewards.load`` options that point each scorer at the files written by writers.py."""
    if name == "hpsv2":
        return {"path": work / "hps" / "HPS_v2_compressed.pt"}
    if name == "aesthetic":
        folder = work / "aesthetic"
        return {"path": folder / "sac+logos+ava1-l14-linearMSE.pth", "clip_path": folder / "clip-vit-large-patch14"}
    if name == "pickscore":
        return {"path": work / "pickscore"}
    if name == "imagereward":
        folder = work / "imagereward"
        return {"path": folder / "ImageReward.pt", "tokenizer_path": folder / "bert"}
    raise KeyError(name)


def load_png(path: Path) -> torch.Tensor:
    """``[1, 3, H, W]`` float32 in [0, 1] from an RGB PNG."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def score(name: str, work: Path) -> dict[str, float]:
    reward = rewards.load(name, device="cpu", dtype="float32", **options(name, work))
    scores = {}
    with torch.no_grad():
        for entry in json.loads((work / "images" / "manifest.json").read_text()):
            image = load_png(work / "images" / entry["file"])
            scores[entry["file"]] = float(reward.score(image, [entry["prompt"]])[0])
    return scores


if __name__ == "__main__":
    name, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "2")))
    out.write_text(json.dumps(score(name, work), indent=1))
    print(f"ours {name}: {out}")  # noqa: T201
