"""Score the parity images with the reference packages (runs in benchmarks/parity/.venv, never the project's venv).

``python reference.py SCORER WORKDIR OUT_JSON`` writes ``{"file": score}`` for every image of the manifest.

Each reference runs its published code on the files written by writers.py. Only what would reach the network is
redirected, and nothing in the scoring path is changed:

- hpsv2 (1.1.0): ``hpsv2/__init__.py`` queries the hub at import (benchmark listing), so the package's modules are
  imported without it; ``hpsv2.score.create_model_and_transforms`` is called with ``pretrained=None`` instead of
  ``"laion2B-s32B-b79K"`` (the LAION weights it would download are overwritten by the checkpoint anyway); then
  ``hpsv2.score.score(paths, prompt, cp=...)`` runs as published.
- aesthetic: improved-aesthetic-predictor's ``simple_inference.py`` recipe: ``clip.load(<local ViT-L-14.pt>)`` (a
  state dict: its fallback path, with the file rewound after the failed TorchScript attempt, see
  ``rewind_failed_jit_load``), its
  ``preprocess``, ``encode_image``, numpy L2 normalisation, the MLP head (written here in the original module
  layout, the repository ships it inside a script, not a package).
- pickscore: the PickScore README recipe (``AutoProcessor`` + ``AutoModel`` + ``get_image_features`` /
  ``get_text_features`` + ``logit_scale.exp() * text @ image.T``), with the processor from the model folder.
- imagereward (image-reward 1.5): ``ImageReward.load(<local .pt>, med_config=<local json>)`` and
  ``inference_rank``; ``BertTokenizer.from_pretrained("bert-base-uncased")`` inside BLIP is pointed at the local
  vocabulary folder written by writers.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections import defaultdict
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def by_prompt(images: Path) -> dict[str, list[str]]:
    """Manifest entries grouped as ``{prompt: [image paths]}`` (the references score one prompt at a time)."""
    groups = defaultdict(list)
    for entry in json.loads((images / "manifest.json").read_text()):
        groups[entry["prompt"]].append(str(images / entry["file"]))
    return groups


def score_hpsv2(work: Path) -> dict[str, float]:
    spec = importlib.util.find_spec("hpsv2")
    package = types.ModuleType("hpsv2")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["hpsv2"] = package  # skip hpsv2/__init__.py (hub query at import), keep its modules
    import hpsv2.score as hps_score

    original = hps_score.create_model_and_transforms

    def no_download(model_name, pretrained=None, **kwargs):
        return original(model_name, None, **kwargs)

    hps_score.create_model_and_transforms = no_download
    checkpoint = str(work / "hps" / "HPS_v2_compressed.pt")
    scores = {}
    for prompt, paths in by_prompt(work / "images").items():
        for path, value in zip(paths, hps_score.score(paths, prompt, cp=checkpoint)):
            scores[Path(path).name] = float(value)
    return scores


class AestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP module layout (``layers`` = Linear/Dropout stack, no activations)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        widths = [input_size, 1024, 128, 64, 16]
        modules: list[torch.nn.Module] = []
        for fan_in, fan_out, dropout in zip(widths, widths[1:], (0.2, 0.2, 0.1, None)):
            modules.append(torch.nn.Linear(fan_in, fan_out))
            if dropout is not None:
                modules.append(torch.nn.Dropout(dropout))
        modules.append(torch.nn.Linear(16, 1))
        self.layers = torch.nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def rewind_failed_jit_load() -> None:
    """Make ``clip.load``'s state-dict fallback work: after a failed ``torch.jit.load(file)`` it calls
    ``torch.load(file)`` on the same, already consumed file object (EOFError with current torch); rewind it."""
    jit_load = torch.jit.load

    def load(f, *args, **kwargs):
        try:
            return jit_load(f, *args, **kwargs)
        except RuntimeError:
            if hasattr(f, "seek"):
                f.seek(0)
            raise

    torch.jit.load = load


def score_aesthetic(work: Path) -> dict[str, float]:
    import clip

    rewind_failed_jit_load()
    head = AestheticMLP(768)
    head_file = work / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
    head.eval()
    model, preprocess = clip.load(str(work / "aesthetic" / "ViT-L-14.pt"), device="cpu")
    scores = {}
    for paths in by_prompt(work / "images").values():
        for path in paths:
            image = preprocess(Image.open(path)).unsqueeze(0)
            with torch.no_grad():
                features = model.encode_image(image).cpu().numpy()
            norm = np.atleast_1d(np.linalg.norm(features, 2, -1))
            norm[norm == 0] = 1
            embedding = features / np.expand_dims(norm, -1)
            with torch.no_grad():
                scores[Path(path).name] = float(head(torch.from_numpy(embedding).float())[0, 0])
    return scores


def score_pickscore(work: Path) -> dict[str, float]:
    from transformers import AutoModel, AutoProcessor

    folder = str(work / "pickscore")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    scores = {}
    for prompt, paths in by_prompt(work / "images").items():
        images = [Image.open(p) for p in paths]
        image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            values = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
        scores.update({Path(p).name: float(v) for p, v in zip(paths, values)})
    return scores


def score_imagereward(work: Path) -> dict[str, float]:
    import transformers

    folder = work / "imagereward"
    original = transformers.BertTokenizer.from_pretrained.__func__

    def local_vocabulary(cls, name, *args, **kwargs):
        if name == "bert-base-uncased":
            name = str(folder / "bert")
        return original(cls, name, *args, **kwargs)

    transformers.BertTokenizer.from_pretrained = classmethod(local_vocabulary)
    import ImageReward

    state = torch.load(folder / "ImageReward.pt", map_location="cpu", weights_only=True)
    model = ImageReward.load(str(folder / "ImageReward.pt"), device="cpu", med_config=str(folder / "med_config.json"))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(f"ImageReward.pt layout: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    scores = {}
    for prompt, paths in by_prompt(work / "images").items():
        with torch.no_grad():
            _, values = model.inference_rank(prompt, paths)
        scores.update({Path(p).name: float(v) for p, v in zip(paths, values)})
    return scores


SCORERS = {
    "hpsv2": score_hpsv2,
    "aesthetic": score_aesthetic,
    "pickscore": score_pickscore,
    "imagereward": score_imagereward,
}


if __name__ == "__main__":
    name, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "2")))
    out.write_text(json.dumps(SCORERS[name](work), indent=1))
    print(f"reference {name}: {out}")  # noqa: T201
