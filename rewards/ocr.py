"""OCR reward: how closely the text read in the image matches the text the prompt asks for (docs/rewards.md#ocr).

flow_grpo's text-rendering reward (yifan123/flow_grpo, ``flow_grpo/ocr.py``), per image::

    target     = the first double-quoted span of the prompt (or metadata["text"])
    recognised = "".join(OCR lines with confidence >= min_confidence)
    t, r       = target and recognised, lower-cased, spaces removed
    dist       = 0 if t is a substring of r else min(Levenshtein(r, t), len(t))
    reward     = 1 - dist / len(t)                                              in [0, 1]

The cap at ``len(t)`` keeps a page of unrelated text from scoring below an empty image. Not differentiable.

Engine: RapidOCR (``rapidocr`` on PyPI, Apache-2.0), PaddleOCR's PP-OCR detector and recogniser exported to ONNX and
run by onnxruntime on the CPU. Its models ship inside its wheel, so nothing is downloaded; flow_grpo ran PaddleOCR
itself (``lang="en"``), whose framework and model downloads this package avoids. The engine's multilingual models
read Latin text as well, but scores are not bit-identical to flow_grpo's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rewards.base import Reward, RewardInputError
from rewards.model import cached
from rewards.registry import register


# PaddleOCR drops lines scored below its ``drop_score`` default of 0.5 before flow_grpo's own ``> 0`` check ran, so
# 0.5 is the threshold flow_grpo's reward effectively used; RapidOCR's ``text_score`` default is 0.5 as well.
OCR_MIN_CONFIDENCE = 0.5

# An OCR recogniser: uint8 RGB image [H, W, 3] -> the lines it read, as (text, confidence) pairs in reading order.
Recognizer = Callable[[np.ndarray], Sequence[tuple[str, float]]]

_QUOTED = re.compile(r'"([^"]*)"')


def _require(module: str) -> Any:
    """Import an optional dependency of this reward, with the install command when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"reward 'ocr' needs the package {module!r}: pip install rapidocr onnxruntime Levenshtein ({err})."
        ) from err


def normalize_text(text: str) -> str:
    """Lower-case and drop spaces, so that case and word spacing do not count as OCR errors (as flow_grpo)."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between ``a`` and ``b``."""
    return _require("Levenshtein").distance(a, b)


def ocr_distance_reward(target: str, recognised: str) -> float:
    """flow_grpo's OCR reward of the recognised text against the target, in [0, 1].

    Both strings are compared after :func:`normalize_text`; a target found anywhere in the recognised text scores 1,
    otherwise ``1 - min(Levenshtein(recognised, target), len(target)) / len(target)``.

    Raises:
        ValueError: the target is empty once spaces are removed (the formula divides by its length).
    """
    target, recognised = normalize_text(target), normalize_text(recognised)
    if not target:
        raise ValueError("the OCR target text is empty (after removing spaces); there is nothing to score against.")
    distance = 0 if target in recognised else min(levenshtein(recognised, target), len(target))
    return 1.0 - distance / len(target)


def quoted_text(prompt: str) -> str | None:
    """The first double-quoted span of ``prompt`` (without the quotes), or ``None`` when there is none."""
    match = _QUOTED.search(prompt)
    return match.group(1) if match else None


def target_text(prompt: str, metadata: Mapping[str, Any], index: int, name: str = "ocr") -> str:
    """The text image ``index`` should show: ``metadata["text"]`` if given, else the prompt's first quoted span.

    Raises:
        RewardInputError: neither gives a non-empty text; the message names the image, the prompt and the fix.
    """
    if "text" in metadata:
        text = metadata["text"]
        if not isinstance(text, str) or not normalize_text(text):
            raise RewardInputError(
                f"reward {name!r}: image {index}: metadata field 'text' must be a non-empty string, got {text!r}."
            )
        return text
    text = quoted_text(prompt)
    if text is None or not normalize_text(text):
        found = "an empty quoted span" if text is not None else "no double-quoted text"
        raise RewardInputError(
            f"reward {name!r}: image {index}: prompt {prompt!r} has {found}; put the text to render in double "
            'quotes (a sign that says "Hello") or give it as metadata field "text".'
        )
    return text


class RapidOCRRecognizer:
    """RapidOCR with flow_grpo's settings (no text-direction classifier), returning every line it reads.

    Args:
        threads: onnxruntime intra-op threads; ``None`` lets onnxruntime choose (all cores).
    """

    def __init__(self, threads: int | None = None) -> None:
        RapidOCR = _require("rapidocr").RapidOCR
        _require("onnxruntime")  # rapidocr's default engine, which its wheel does not declare

        params: dict[str, Any] = {
            "Global.use_cls": False,  # flow_grpo: PaddleOCR(use_angle_cls=False), ocr(img, cls=False)
            "Global.text_score": 0.0,  # keep every line: the reward applies its own confidence threshold
            "Global.log_level": "error",  # an image without text is a normal case, not a warning
        }
        if threads is not None:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
            params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        self.engine = RapidOCR(params=params)

    def __call__(self, image: np.ndarray) -> list[tuple[str, float]]:
        # RapidOCR takes arrays in OpenCV's BGR order; ours are RGB.
        output = self.engine(np.ascontiguousarray(image[..., ::-1]))
        if getattr(output, "txts", None) is None:
            return []
        return [(str(text), float(score)) for text, score in zip(output.txts, output.scores)]


def default_recognizer(threads: int | None = None) -> RapidOCRRecognizer:
    """The process-wide RapidOCR engine (built on first use: ~1 s to load its ONNX models)."""
    return cached(("rewards.ocr", "RapidOCRRecognizer", threads), lambda: RapidOCRRecognizer(threads))


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> uint8 ``[B, H, W, 3]`` with flow_grpo's ``(x * 255).round()`` conversion."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@register("ocr")
class OCRReward(Reward):
    """flow_grpo's OCR reward: 1 - capped normalised edit distance between the prompt's quoted text and the OCR.

    Not differentiable; the OCR runs on the CPU whatever the images' device. Per-image metadata may give the target
    as ``"text"``, which takes precedence over the prompt's quoted span.

    Args:
        device, dtype: accepted for the factory protocol and unused (the engine runs on the CPU).
        min_confidence: OCR lines scored below this are ignored (0.5, PaddleOCR's ``drop_score`` that flow_grpo ran
            with; 0 keeps every line).
        threads: onnxruntime threads of the default engine; ``None`` = onnxruntime's default (all cores).
        recognizer: a replacement OCR, ``fn(uint8 RGB [H, W, 3]) -> [(text, confidence), ...]``; ``None`` uses
            RapidOCR, built on the first score and shared by the process.
    """

    name = "ocr"
    differentiable = False
    needs_prompts = False  # the target may come from metadata "text" alone; target_text says when neither has it
    takes_metadata = True

    def __init__(
        self,
        device: object = None,
        dtype: object = None,
        min_confidence: float = OCR_MIN_CONFIDENCE,
        threads: int | None = None,
        recognizer: Recognizer | None = None,
    ) -> None:
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise ValueError(f"reward 'ocr': min_confidence must lie in [0, 1], got {min_confidence}.")
        self.min_confidence = float(min_confidence)
        self.threads = threads
        self.recognizer = recognizer

    def recognise(self, image: np.ndarray) -> str:
        """The text read in one uint8 RGB image ``[H, W, 3]``: its confident lines joined without separator."""
        recognizer = self.recognizer or default_recognizer(self.threads)
        return "".join(text for text, score in recognizer(image) if score >= self.min_confidence)

    def _score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict[str, Any]]) -> Tensor:
        # Targets first: a prompt without quoted text fails before any OCR time is spent.
        prompt_list = prompts if prompts is not None else [""] * len(metadata)
        targets = [target_text(p, m, i, self.name) for i, (p, m) in enumerate(zip(prompt_list, metadata))]
        pixels = to_uint8_hwc(images)
        scores = [ocr_distance_reward(target, self.recognise(image)) for target, image in zip(targets, pixels)]
        return torch.tensor(scores, dtype=torch.float32)
