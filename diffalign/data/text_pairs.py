"""Text preference pairs without preference images: one real image, its true caption preferred over a perturbed one.

"Free Lunch Alignment of Text-to-Image Diffusion Models without Preference Image Pairs" (Xian, Li et al., arXiv
2509.25771) builds its pairs by asking a language model to rewrite each caption of an image-caption data set into a
mismatched one along four principles: content (objects, counts), attributes (colour, material, size), spatial
relations and context (time, weather, place). Diffusion-DPO then prefers the image under its true caption to the same
image under the rewritten one (docs/methods/dpo.md#text-preference-pairs).

Here the rewriting is a rule set with no language model (:func:`perturb_caption`): each rule swaps one word of a
small vocabulary for another of the same kind, or exchanges the attributes of two objects. A caption no rule applies
to is skipped and counted. A caption rewritten by any other means (a local language model) can be given directly as
``caption_1`` in a jsonl preference file.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from diffalign.data.image_captions import load_real_pairs
from diffalign.data.preference import JSONL_NAME


__all__ = ["PERTURBATIONS", "make_text_preference_pairs", "perturb_caption"]

_WORD_SETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "content": (
        ("one", "two", "three", "four", "five"),
        ("a single", "a pair of"),
        ("cat", "dog", "horse", "bird"),
        ("car", "bicycle", "bus", "truck"),
        ("circle", "square", "triangle", "star"),
        ("circles", "squares", "triangles", "stars"),
        ("man", "woman", "child"),
        ("apple", "banana", "orange"),
    ),
    "attribute": (
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray"),
        ("wooden", "metal", "glass", "plastic", "stone"),
        ("small", "large"),
        ("tiny", "huge"),
        ("old", "new"),
    ),
    "spatial": (
        ("left of", "right of"),
        ("above", "below"),
        ("on top of", "under"),
        ("in front of", "behind"),
        ("inside", "outside"),
        ("near", "far from"),
    ),
    "context": (
        ("day", "night"),
        ("sunny", "rainy", "snowy"),
        ("indoors", "outdoors"),
        ("summer", "winter"),
        ("morning", "evening"),
        ("beach", "forest", "city", "desert"),
    ),
}
"""The rule set's vocabulary: within each tuple, any word may replace any other (whole words, case kept)."""

_COLOURS = _WORD_SETS["attribute"][0]


def _word_pattern(word: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def _with_case(replacement: str, original: str) -> str:
    return replacement[:1].upper() + replacement[1:] if original[:1].isupper() else replacement


def _swaps(caption: str, kind: str) -> list[str]:
    """Every caption made by replacing one occurrence of a ``kind`` word with another word of its set."""
    found = []
    for words in _WORD_SETS[kind]:
        for word in words:
            for match in _word_pattern(word).finditer(caption):
                for other in words:
                    if other.lower() != word.lower():
                        start, end = match.span()
                        found.append(caption[:start] + _with_case(other, match.group()) + caption[end:])
    return found


def _exchange_colours(caption: str) -> list[str]:
    """The caption with its first two different colours exchanged (the attribute binding of two objects)."""
    matches = [m for colour in _COLOURS for m in _word_pattern(colour).finditer(caption)]
    matches.sort(key=lambda m: m.start())
    for second in matches[1:]:
        if second.group().lower() != matches[0].group().lower():
            first = matches[0]
            return [
                caption[: first.start()]
                + _with_case(second.group().lower(), first.group())
                + caption[first.end() : second.start()]
                + _with_case(first.group().lower(), second.group())
                + caption[second.end() :]
            ]
    return []


PERTURBATIONS: dict[str, Callable[[str], list[str]]] = {
    "content": lambda caption: _swaps(caption, "content"),
    "attribute": lambda caption: _swaps(caption, "attribute") + _exchange_colours(caption),
    "spatial": lambda caption: _swaps(caption, "spatial"),
    "context": lambda caption: _swaps(caption, "context"),
}
"""The four principles of the paper, each a function from a caption to its possible rewrites."""


def perturb_caption(caption: str, rng: random.Random, kinds: Sequence[str] = tuple(PERTURBATIONS)) -> str | None:
    """A mismatched caption: one rewrite drawn uniformly from every rewrite that ``kinds`` allow, or ``None`` when no
    rule applies.

    >>> perturb_caption("a red circle left of a blue square", random.Random(0), kinds=["spatial"])
    'a red circle right of a blue square'
    """
    unknown = [kind for kind in kinds if kind not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbation kind(s) {unknown}; choose from {', '.join(PERTURBATIONS)}")
    rewrites = sorted({text for kind in kinds for text in PERTURBATIONS[kind](caption) if text != caption})
    return rng.choice(rewrites) if rewrites else None


def make_text_preference_pairs(
    source: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    kinds: Sequence[str] = tuple(PERTURBATIONS),
) -> dict[str, int]:
    """Write a jsonl preference data set of text pairs from image-caption pairs (the Diffusion-DPO trainer reads it).

    Args:
        source: real image-caption pairs (:func:`~diffalign.data.image_captions.load_real_pairs`: a JSONL of
            ``{"prompt", "image"}`` records or a folder of images with ``.txt`` captions).
        out_dir: folder to write ``data.jsonl`` into; each record names its image by path (no copy) with
            ``image_0 == image_1``, ``caption`` the true caption, ``caption_1`` the perturbed one, ``label_0`` 1.
        seed: seed of the perturbation draws.
        kinds: which of :data:`PERTURBATIONS` may be used.

    Returns:
        ``{"pairs": written, "skipped": captions no rule applied to}`` (also written to ``summary.json``).
    """
    pairs = load_real_pairs(source, key="source")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = skipped = 0
    with open(out_dir / JSONL_NAME, "w", encoding="utf-8") as handle:
        for caption, image in pairs:
            negative = perturb_caption(caption, rng, kinds)
            if negative is None:
                skipped += 1
                continue
            path = str(Path(image).resolve())
            record = {"caption": caption, "caption_1": negative, "image_0": path, "image_1": path, "label_0": 1.0}
            handle.write(json.dumps(record) + "\n")
            written += 1
    if written == 0:
        raise ValueError(f"no caption of {source} matched a perturbation rule ({', '.join(kinds)}): nothing to train")
    summary = {"pairs": written, "skipped": skipped, "seed": seed, "kinds": list(kinds)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"pairs": written, "skipped": skipped}
