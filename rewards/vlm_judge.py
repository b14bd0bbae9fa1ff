"""A vision-language model as judge: Qwen2-VL / Qwen2.5-VL on transformers (docs/rewards.md#vlm-judge).

The judge sees one user turn holding the image and a question built from a template with ``{prompt}`` (the
caption), then answers. Two ways to turn the answer into a score:

- ``mode="yes_prob"`` (differentiable): the template asks a yes/no question; the score is
  ``P(yes) / (P(yes) + P(no))`` from the logits of the first answer token, where ``P(yes)`` sums the probabilities
  of the ``yes_tokens`` (``"Yes"``, ``"yes"``) and ``P(no)`` those of the ``no_tokens``. The image goes through the
  differentiable Qwen-VL tensor path (rewards/qwen_vl.py), so gradients reach the pixels.
- ``mode="rating"`` (not differentiable): greedy generation of up to ``max_new_tokens`` tokens, a rating parsed with
  a regex (by default ``Final Score: x`` as UnifiedReward asks for, or ``<Score>x</Score>`` as flow_grpo's ``qwenvl``
  reward asks for), divided by ``max_rating``. An answer with no rating, or one outside ``[0, max_rating]``, scores
  ``unparsed_score`` (0 by default, as flow_grpo's parsers) and is counted in :attr:`VLMJudge.unparsed`.

References: UnifiedReward (CodeGoat24/UnifiedReward, ``inference_qwen/image_generation/
qwen_point_score_image_generation.py``: a Qwen2.5-VL judge asked for ``Final Score:``), flow_grpo
(``flow_grpo/rewards.py``, ``unifiedreward_score_sglang``: ``Final Score:\\s*([1-5](?:\\.\\d+)?)`` / 5, 0 when
missing; ``flow_grpo/qwenvl.py``: ``<Score>(\\d+)</Score>`` / 5, 0 when missing). The default templates here are
written in that style; pass a checkpoint's own prompt as ``template=`` to reproduce it exactly.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from rewards.model import ModelReward, freeze, from_pretrained
from rewards.qwen_vl import (
    IMAGE_TOKEN,
    QwenVisionSpec,
    Resample,
    chat_texts,
    expand_image_tokens,
    image_token_count,
    qwen_pixel_values,
    single_token_id,
    tokenize_prompts,
)
from rewards.registry import register


logger = logging.getLogger(__name__)

VLM_JUDGE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
PROMPT_FIELD = "{prompt}"

YES_NO_TEMPLATE = (
    "You are given a text caption and an image generated from it. Judge two things: whether the image shows what "
    "the caption describes (objects, their attributes, counts and relations), and whether it is a clear, detailed, "
    "well-composed image without visual defects.\n"
    "Does the image match the caption and look good? Answer with one word, Yes or No.\n"
    "Text Caption: [{prompt}]"
)
RATING_TEMPLATE = (
    "You are given a text caption and an image generated from it. Evaluate the image on two criteria:\n"
    "1. Alignment with the caption: are the objects, their attributes, counts and relations as described?\n"
    "2. Overall image quality: clarity, detail, colour and aesthetic appeal.\n"
    "Explain briefly, then give one score from 1 to 5 after 'Final Score:'.\n"
    "Text Caption: [{prompt}]"
)
# "Final Score: 4", "**Final Score:** 3.5" (UnifiedReward) or "<Score>4</Score>" (flow_grpo's qwenvl reward).
RATING_PATTERN = r"Final Score[\s:*]*(\d+(?:\.\d+)?)|<Score>\s*(\d+(?:\.\d+)?)\s*</Score>"

Mode = Literal["yes_prob", "rating"]


def parse_rating(text: str, pattern: str | re.Pattern = RATING_PATTERN, max_rating: float = 5.0) -> float | None:
    """The rating in a judge's answer, or ``None`` when there is none or it lies outside ``[0, max_rating]``.

    The first match of ``pattern`` counts; its value is the first group that matched (the whole match for a
    pattern without groups).

    Examples:
        ``parse_rating("... Final Score: 4")`` -> 4.0; ``parse_rating("<Score>3</Score>")`` -> 3.0;
        ``parse_rating("Final Score: 7")`` -> None (above 5); ``parse_rating("no idea")`` -> None.
    """
    match = re.search(pattern, text)
    if match is None:
        return None
    groups = [group for group in match.groups() if group is not None]
    try:
        value = float(groups[0] if groups else match.group(0))
    except ValueError:
        return None
    return value if 0.0 <= value <= max_rating else None


def yes_probability(logits: Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> Tensor:
    """``P(yes) / (P(yes) + P(no))`` from next-token logits ``[B, V]`` -> ``[B]`` float32.

    Computed as ``sigmoid(logsumexp(yes logits) - logsumexp(no logits))``: the softmax normaliser over the whole
    vocabulary cancels, and the form stays finite for any logits.
    """
    logits = logits.float()
    log_yes = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)
    log_no = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
    return torch.sigmoid(log_yes - log_no)


def _as_tuple(tokens: str | Sequence[str], what: str) -> tuple[str, ...]:
    tokens = (tokens,) if isinstance(tokens, str) else tuple(tokens)
    if not tokens or not all(isinstance(token, str) and token for token in tokens):
        raise ValueError(f"vlm_judge: {what} must be one or more non-empty strings, got {tokens!r}.")
    return tokens


@register("vlm_judge")
class VLMJudge(ModelReward):
    """A Qwen-VL judge reward; differentiable in ``mode="yes_prob"``, not in ``mode="rating"``.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: model dtype; scores are float32.
        path: hub id or local folder of an image-text-to-text Qwen2-VL / Qwen2.5-VL model with its processor
            (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``, ``CodeGoat24/UnifiedReward-qwen-7b``).
        revision: hub revision of ``path`` when it is a hub id.
        mode: ``"yes_prob"`` or ``"rating"`` (module docstring).
        template: the question; must contain ``{prompt}``, replaced by the caption (other braces are kept as they
            are). ``None``: a yes/no question or a 1-5 ``Final Score:`` request, by mode.
        yes_tokens: answer strings counted as "yes" (each must be one token of the tokenizer).
        no_tokens: answer strings counted as "no".
        max_new_tokens: generation budget of ``mode="rating"``.
        pattern: regex of the rating (:func:`parse_rating`).
        max_rating: the top of the rating scale; the score is ``rating / max_rating``.
        unparsed_score: the score of an answer without a valid rating.
        min_pixels: smallest image area after resizing; ``None``: the processor's.
        max_pixels: largest image area after resizing; ``None``: the processor's (Qwen2.5-VL: 12845056, so a
            1024 x 1024 image is seen at 1036 x 1036; flow_grpo's UnifiedReward first shrinks images to 512 x 512,
            ``max_pixels=512 * 512`` comes close).
        resample: image resize kernel, ``"bicubic"`` (antialiased, like the processor) or ``"bilinear"``.

    Attributes:
        unparsed: how many answers had no valid rating so far (``mode="rating"``).
        last_answers: the decoded answers of the last ``mode="rating"`` batch.
    """

    name = "vlm_judge"

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = VLM_JUDGE_MODEL,
        revision: str | None = None,
        mode: Mode = "yes_prob",
        template: str | None = None,
        yes_tokens: str | Sequence[str] = ("Yes", "yes"),
        no_tokens: str | Sequence[str] = ("No", "no"),
        max_new_tokens: int = 512,
        pattern: str = RATING_PATTERN,
        max_rating: float = 5.0,
        unparsed_score: float = 0.0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        resample: Resample = "bicubic",
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        if mode not in ("yes_prob", "rating"):
            raise ValueError(f"vlm_judge: unknown mode {mode!r}; use 'yes_prob' or 'rating'.")
        template = template if template is not None else (YES_NO_TEMPLATE if mode == "yes_prob" else RATING_TEMPLATE)
        if PROMPT_FIELD not in template:
            raise ValueError(
                f"vlm_judge: the template must contain {PROMPT_FIELD} where the caption goes; got {template[:80]!r}."
            )
        if not max_rating > 0:
            raise ValueError(f"vlm_judge: max_rating must be positive, got {max_rating}.")
        if max_new_tokens < 1:
            raise ValueError(f"vlm_judge: max_new_tokens must be at least 1, got {max_new_tokens}.")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"vlm_judge: pattern {pattern!r} is not a valid regex ({err}).") from err
        if resample not in ("bicubic", "bilinear"):
            raise ValueError(f"vlm_judge: unknown resample {resample!r}; use 'bicubic' or 'bilinear'.")
        self.path = os.fspath(path)
        self.revision = revision
        self.mode = mode
        self.differentiable = mode == "yes_prob"
        self.template = template
        self.yes_tokens = _as_tuple(yes_tokens, "yes_tokens")
        self.no_tokens = _as_tuple(no_tokens, "no_tokens")
        self.max_new_tokens = int(max_new_tokens)
        self.pattern = pattern
        self.max_rating = float(max_rating)
        self.unparsed_score = float(unparsed_score)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.resample = resample
        self.unparsed = 0
        self.last_answers: list[str] = []
        self._model_takes_token_types = True

    def weights_key(self) -> tuple:
        return (self.path, self.revision)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = from_pretrained(AutoProcessor, self.path, "VLM judge processor", self.revision)
        model = from_pretrained(AutoModelForImageTextToText, self.path, "VLM judge model", self.revision, dtype=dtype)
        return freeze(model, device, dtype), processor

    def _ensure_loaded(self, fallback_device: torch.device) -> Any:
        bundle = super()._ensure_loaded(fallback_device)
        self._model_takes_token_types = "mm_token_type_ids" in inspect.signature(bundle[0].forward).parameters
        return bundle

    def questions(self, prompts: Sequence[str]) -> list[str]:
        """The template with each caption in place of ``{prompt}``."""
        return [self.template.replace(PROMPT_FIELD, prompt) for prompt in prompts]

    def model_inputs(self, processor: Any, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Left-padded model inputs for ``images`` ``[B, 3, H, W]`` and their captions (differentiable in pixels)."""
        spec = QwenVisionSpec.from_image_processor(processor.image_processor, self.min_pixels, self.max_pixels)
        pixel_values, grid = qwen_pixel_values(images, spec, self.resample, dtype=self.dtype)
        count = image_token_count(grid[0], spec)
        texts = [expand_image_tokens(text, count) for text in chat_texts(processor, self.questions(prompts))]
        # Left padding: the last position of every row is where the answer starts.
        input_ids, attention_mask = tokenize_prompts(processor.tokenizer, texts, "left", images.device)
        image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
        }
        if self._model_takes_token_types:
            # 1 on image tokens: transformers 5 needs it to build Qwen-VL's 3-D (M-RoPE) positions; transformers 4
            # finds the image tokens in input_ids itself and has no such argument.
            inputs["mm_token_type_ids"] = (input_ids == image_token_id).long()
        return inputs

    def _score_with(self, bundle: tuple[Any, Any], images: Tensor, prompts: list[str] | None) -> Tensor:
        model, processor = bundle
        inputs = self.model_inputs(processor, images, prompts)
        if self.mode == "yes_prob":
            tokenizer = processor.tokenizer
            yes_ids = [single_token_id(tokenizer, token, "vlm_judge yes token") for token in self.yes_tokens]
            no_ids = [single_token_id(tokenizer, token, "vlm_judge no token") for token in self.no_tokens]
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
            return yes_probability(logits, yes_ids, no_ids)
        with torch.no_grad():
            answers = self.generate_answers(model, processor, inputs)
        return torch.tensor(self.ratings(answers), dtype=torch.float32, device=images.device)

    def generate_answers(self, model: Any, processor: Any, inputs: dict[str, Tensor]) -> list[str]:
        """Greedy answers to the prepared inputs, decoded without special tokens."""
        tokenizer = processor.tokenizer
        output = model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def ratings(self, answers: Sequence[str]) -> list[float]:
        """Normalised ratings ``rating / max_rating`` of decoded answers; ``unparsed_score`` (counted) for the rest."""
        self.last_answers = list(answers)
        scores, failed = [], []
        for answer in answers:
            rating = parse_rating(answer, self.pattern, self.max_rating)
            if rating is None:
                failed.append(answer)
                scores.append(self.unparsed_score)
            else:
                scores.append(rating / self.max_rating)
        if failed:
            self.unparsed += len(failed)
            logger.warning(
                "vlm_judge: no rating in [0, %g] in %d of %d answers (%d so far), scored %g; first: %r",
                self.max_rating,
                len(failed),
                len(answers),
                self.unparsed,
                self.unparsed_score,
                failed[0][:200],
            )
        return scores
