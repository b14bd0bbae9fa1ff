"""GenEval-like compositional reward: an open-vocabulary detector checks objects, counts, colours and positions
against each prompt's GenEval metadata (docs/rewards.md#geneval-like).

GenEval (Ghosh et al. 2023, djghosh13/geneval ``evaluation/evaluate_images.py``) detects the prompt's objects with
Mask2Former, classifies the colour of each one with zero-shot CLIP and checks relative positions. flow_grpo trains on
a partial-credit score computed by its reward server (yifan123/reward-server ``reward_server/gen_eval.py``); this
module computes the same score with OWLv2 (``transformers.Owlv2ForObjectDetection``) as the detector.

Per ``include`` clause ``{class, count[, color][, position: [relation, clause_index]]}`` with ``n`` detections::

    count term     1 - |count - n| / count                (negative when n > 2 * count)
    if n != count  one extra 0 term when the clause also asks for a colour or a position
    colour term    1 - |count - n_colour| / count         (n_colour: detections classified as the asked colour)
    position term  1 if every detection has the relation to every detection of the referenced clause, else 0
                   (0 when the referenced clause itself failed)

    partial score  = mean of all terms;   strict = every clause has n == count, all colours and all relations right

Not differentiable (detections are thresholded and counted).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards import hf_clip
from rewards.base import RewardInputError, check_images, check_metadata, check_prompts, check_scores
from rewards.model import ModelReward, freeze, from_pretrained
from rewards.preprocess import clip_preprocess, normalize
from rewards.registry import register


OWLV2_MODEL = "google/owlv2-base-patch16-ensemble"
COLOR_CLIP_MODEL = "openai/clip-vit-large-patch14"  # the weights of GenEval's open_clip ViT-L-14 "openai"

# GenEval's colour vocabulary and zero-shot templates ({c}: colour, {cls}: the clause's class).
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
RELATIONS = ("left of", "right of", "above", "below")

# GenEval's detection settings. Its 0.3 / 0.9 confidence thresholds are Mask2Former's; OWLv2's sigmoid scores run
# lower (0.61 and 0.66 for the two cats of transformers' OWLv2 example), so 0.9 would reject almost every object and
# counting uses 0.5 here (docs/rewards.md#geneval-like).
DETECTION_THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.5
MAX_OBJECTS = 16
POSITION_SHRINK = 0.1
# GenEval keeps every Mask2Former instance (no NMS: set predictions rarely duplicate). OWLv2 predicts one box per
# image patch, so an object gets many overlapping boxes; 0.5 is torchvision's Faster R-CNN NMS threshold.
NMS_IOU = 0.5
QUERY_TEMPLATE = "a photo of a {}"


class Detection(NamedTuple):
    """One detected object: ``box`` (x0, y0, x1, y1) in pixels, detector ``score``, ``color`` (a GenEval colour,
    or ``None`` when not classified)."""

    box: tuple[float, float, float, float]
    score: float
    color: str | None = None


# --- scoring rules (pure functions) ----------------------------------------------------------------------------------


def relative_position(box_a: Sequence[float], box_b: Sequence[float], shrink: float = POSITION_SHRINK) -> set[str]:
    """GenEval's relations of box A to box B: a subset of ``{"left of", "right of", "above", "below"}``.

    The centre offset ``A - B`` is shrunk towards 0 by ``shrink * (size_A + size_B)`` on each axis, so that
    overlapping or adjacent objects are not called left/right of each other; a relation holds when its shrunk
    component exceeds half the length of the unshrunk offset (image y grows downwards: "above" is dy < -0.5).
    """
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box_a[:4], box_b[:4]
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    sizes = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))
    shrunk = [math.copysign(max(abs(o) - shrink * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    length = math.hypot(*offset)
    dx, dy = shrunk[0] / length, shrunk[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def geneval_score(
    detections: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    position_shrink: float = POSITION_SHRINK,
    position_quirk: bool = False,
) -> tuple[float, bool]:
    """flow_grpo's partial-credit GenEval score and the strict all-correct flag of one image.

    Args:
        detections: per class, the kept detections (after thresholds, NMS and the per-class cap); colours are read
            only for clauses that ask for one.
        metadata: the image's GenEval record (``include``; ``exclude`` and ``tag`` are not used here).
        position_shrink: GenEval's size shrink of the position rule.
        position_quirk: reproduce the reward server's extra ``1.0`` term after a failed position check (a failed
            relation then scores terms ``0, 1`` instead of ``0``); off by default (docs/rewards.md#geneval-like).

    Returns:
        ``(partial_score, strict_correct)``; the score is the mean of the terms in the module docstring, in
        ``(-inf, 1]`` (a count term is negative when more than twice the asked number of objects are found).
    """
    terms: list[float] = []
    strict = True
    matched_groups: list[Sequence[Detection] | None] = []
    for clause in metadata["include"]:
        found = list(detections.get(clause["class"], ()))
        count = clause["count"]
        terms.append(1.0 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in clause or "position" in clause:
                terms.append(0.0)  # one term for the checks that could not run
        else:
            if "color" in clause:
                right_colour = sum(d.color == clause["color"] for d in found)
                terms.append(1.0 - abs(count - right_colour) / count)
                matched = right_colour == count
            if "position" in clause and matched:  # as upstream: no position term after a wrong colour
                relation, target = clause["position"]
                others = matched_groups[target]
                matched = others is not None and all(
                    relation in relative_position(a.box, b.box, position_shrink) for a in found for b in others
                )
                if not matched:
                    terms.append(0.0)
                if matched or (position_quirk and others is not None):
                    terms.append(1.0)
        strict = strict and matched
        matched_groups.append(found if matched else None)
    return sum(terms) / len(terms), strict


def check_geneval_metadata(metadata: Mapping[str, Any], index: int, name: str = "geneval_like") -> None:
    """Refuse a record that is not GenEval metadata, naming the image and the field.

    Raises:
        RewardInputError: a missing or malformed ``tag``, ``include`` (a non-empty list of clauses ``{class,
            count[, color][, position: [relation, earlier_clause_index]]}``) or ``exclude``.
    """

    def fail(field: str, problem: str) -> RewardInputError:
        return RewardInputError(
            f"reward {name!r}: image {index}: metadata field {field!r} {problem}. Each image needs its GenEval "
            'record, e.g. {"tag": "counting", "include": [{"class": "cat", "count": 2}]} (a .jsonl prompt file).'
        )

    if not isinstance(metadata.get("tag"), str):
        raise fail("tag", f"must be a string, got {metadata.get('tag')!r}")
    include = metadata.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str) or not include:
        raise fail("include", f"must be a non-empty list of clauses, got {include!r}")
    for position, clause in enumerate(include):
        _check_clause(clause, f"include[{position}]", position, fail)
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, Sequence) or isinstance(exclude, str):
        raise fail("exclude", f"must be a list of clauses, got {exclude!r}")
    for position, clause in enumerate(exclude):
        _check_clause(clause, f"exclude[{position}]", None, fail)


def _check_clause(clause: Any, field: str, position: int | None, fail: Any) -> None:
    if not isinstance(clause, Mapping):
        raise fail(field, f"must be a dict, got {clause!r}")
    if not isinstance(clause.get("class"), str) or not clause["class"].strip():
        raise fail(f"{field}.class", f"must be a non-empty string, got {clause.get('class')!r}")
    count = clause.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise fail(f"{field}.count", f"must be an integer >= 1, got {count!r}")
    if position is None:
        return
    if "color" in clause and clause["color"] not in GENEVAL_COLORS:
        raise fail(f"{field}.color", f"must be one of {list(GENEVAL_COLORS)}, got {clause['color']!r}")
    if "position" in clause:
        value = clause["position"]
        valid = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        if not valid or value[0] not in RELATIONS:
            raise fail(f"{field}.position", f"must be [relation, clause_index] with a relation in {RELATIONS}")
        target = value[1]
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < position:
            raise fail(f"{field}.position", f"must refer to an earlier clause (0..{position - 1}), got {target!r}")


# --- detector -----------------------------------------------------------------------------------------------------


def owlv2_preprocess(images: Tensor, size: int, dtype: torch.dtype | None = None) -> Tensor:
    """``Owlv2ImageProcessor`` in torch: pad bottom/right to a black square, Gaussian anti-aliasing when shrinking,
    bilinear resize to ``size``, CLIP mean/std.

    As transformers 5's processor: blur sigma ``(side / size - 1) / 2`` with kernel ``2 * ceil(3 * sigma) + 1``, no
    blur when enlarging; then a bilinear resize without antialiasing.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        size: the detector's input edge (``vision_config.image_size``, 960 for OWLv2 base).
        dtype: the model's dtype; the math runs in float32.

    Returns:
        Pixel values ``[B, 3, size, size]``.
    """
    from torchvision.transforms.v2 import functional as tvF

    x = images.float()
    height, width = x.shape[-2:]
    side = max(height, width)
    x = F.pad(x, (0, side - width, 0, side - height), value=0.0)
    sigma = max((side / size - 1) / 2, 0.0)
    if sigma > 0:
        kernel = 2 * math.ceil(3 * sigma) + 1
        x = tvF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return normalize(x).to(dtype or torch.float32)


def select_detections(
    scores: Tensor,
    boxes: Tensor,
    classes: Sequence[str],
    threshold: float,
    max_objects: int = MAX_OBJECTS,
    nms_iou: float = NMS_IOU,
) -> dict[str, list[Detection]]:
    """Per class, the confident boxes of one image, best first.

    Each box is assigned to its best-scoring query (as transformers' OWLv2 post-processing), kept when that score
    exceeds ``threshold``, de-duplicated by non-maximum suppression and capped at ``max_objects`` per class.

    Args:
        scores: ``[P, Q]`` sigmoid class scores of the ``P`` predicted boxes for the ``Q`` classes.
        boxes: ``[P, 4]`` boxes (x0, y0, x1, y1) in pixels.
        classes: the ``Q`` class names.
        threshold: strict lower bound on the kept scores (GenEval's ``score > threshold``).
        max_objects: per-class cap (GenEval: 16).
        nms_iou: boxes overlapping a better box of the same class by more than this IoU are dropped; 1 = no NMS.
    """
    from torchvision.ops import nms

    best, label = scores.float().max(dim=-1)
    boxes = boxes.float()
    detections: dict[str, list[Detection]] = {}
    for query, name in enumerate(classes):
        keep = ((label == query) & (best > threshold)).nonzero().flatten()
        keep = keep[best[keep].argsort(descending=True, stable=True)]
        if nms_iou < 1.0 and keep.numel() > 1:
            keep = keep[nms(boxes[keep], best[keep], nms_iou)]  # nms returns indices sorted by score
        kept = [Detection(tuple(boxes[i].tolist()), float(best[i])) for i in keep[:max_objects]]
        if kept:
            detections[name] = kept
    return detections


def crop(image: Tensor, box: Sequence[float]) -> Tensor:
    """The pixels of ``box`` (x0, y0, x1, y1) in ``image [3, H, W]``, rounded as PIL's ``Image.crop``, >= 1 px."""
    height, width = image.shape[-2:]
    x0 = min(max(int(round(box[0])), 0), width - 1)
    y0 = min(max(int(round(box[1])), 0), height - 1)
    x1 = min(max(int(round(box[2])), x0 + 1), width)
    y1 = min(max(int(round(box[3])), y0 + 1), height)
    return image[:, y0:y1, x0:x1]


@register("geneval_like")
class GenEvalLike(ModelReward):
    """GenEval's checks with an OWLv2 detector and a CLIP colour classifier; flow_grpo's partial-credit score.

    Needs GenEval metadata per image (``tag``, ``include``, optional ``exclude``; prompts are not read).
    :meth:`score_parts` also reports the strict all-correct flag as ``"strict"``. Not differentiable.

    Args:
        device: where the models run; ``None`` follows the first batch.
        dtype: the models' dtype; scores are float32.
        path: hub id or local folder of an ``Owlv2ForObjectDetection``.
        tokenizer_path: its tokenizer (a CLIP tokenizer); ``None`` uses ``path``.
        clip_path: hub id or local folder of the ``CLIPModel`` that classifies colours (GenEval: OpenAI ViT-L/14).
        clip_tokenizer_path: its tokenizer; ``None`` uses ``clip_path``.
        revision: hub revision of ``path`` (and of its tokenizer when it comes from the same repository).
        clip_revision: hub revision of ``clip_path`` (and of its tokenizer likewise).
        threshold: detection confidence threshold (GenEval 0.3).
        counting_threshold: the threshold for images tagged ``"counting"`` (GenEval 0.9 for Mask2Former; 0.5 here).
        max_objects: per-class cap on detections (GenEval 16).
        nms_iou: IoU of the per-class non-maximum suppression; 1 disables it.
        position_shrink: GenEval's size shrink of the position rule (0.1).
        position_quirk: reproduce the reward server's extra 1.0 term after a failed position check.
        query_template: the detector's text query for a class.
        batch_size: images per detector forward pass (OWLv2 at 960 px holds 3,600 patch tokens per image).
    """

    name = "geneval_like"
    differentiable = False
    needs_prompts = False
    takes_metadata = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = OWLV2_MODEL,
        tokenizer_path: str | os.PathLike | None = None,
        clip_path: str | os.PathLike = COLOR_CLIP_MODEL,
        clip_tokenizer_path: str | os.PathLike | None = None,
        revision: str | None = None,
        clip_revision: str | None = None,
        threshold: float = DETECTION_THRESHOLD,
        counting_threshold: float = COUNTING_THRESHOLD,
        max_objects: int = MAX_OBJECTS,
        nms_iou: float = NMS_IOU,
        position_shrink: float = POSITION_SHRINK,
        position_quirk: bool = False,
        query_template: str = QUERY_TEMPLATE,
        batch_size: int = 8,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.path = os.fspath(path)
        self.tokenizer_path = os.fspath(tokenizer_path) if tokenizer_path is not None else self.path
        self.clip_path = os.fspath(clip_path)
        self.clip_tokenizer_path = (
            os.fspath(clip_tokenizer_path) if clip_tokenizer_path is not None else self.clip_path
        )
        self.revision, self.clip_revision = revision, clip_revision
        for label, value in (("threshold", threshold), ("counting_threshold", counting_threshold)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"reward 'geneval_like': {label} must lie in [0, 1), got {value}.")
        if "{}" not in query_template:
            raise ValueError(
                f"reward 'geneval_like': query_template must contain '{{}}' for the class, got {query_template!r}."
            )
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.nms_iou = int(max_objects), float(nms_iou)
        self.position_shrink, self.position_quirk = float(position_shrink), bool(position_quirk)
        self.query_template, self.batch_size = query_template, max(int(batch_size), 1)
        self._color_classifiers: dict[str, Tensor] = {}

    def weights_key(self) -> tuple:
        return (
            self.path,
            self.revision,
            self.tokenizer_path,
            self.clip_path,
            self.clip_revision,
            self.clip_tokenizer_path,
        )

    def build(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        detector = from_pretrained(Owlv2ForObjectDetection, self.path, "GenEval-like detector", revision=self.revision)
        tokenizer_revision = self.revision if self.tokenizer_path == self.path else None
        clip_tokenizer_revision = self.clip_revision if self.clip_tokenizer_path == self.clip_path else None
        return {
            "detector": freeze(detector, device, dtype),
            "tokenizer": from_pretrained(
                AutoTokenizer, self.tokenizer_path, "GenEval-like detector tokenizer", revision=tokenizer_revision
            ),
            "clip": freeze(
                hf_clip.load_clip_model(self.clip_path, "GenEval-like colour CLIP", self.clip_revision), device, dtype
            ),
            "clip_tokenizer": hf_clip.load_tokenizer(
                self.clip_tokenizer_path, "GenEval-like colour CLIP tokenizer", clip_tokenizer_revision
            ),
        }

    # -- protocol ---------------------------------------------------------------------------------------------------

    def score_parts(
        self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(partial [B], {"geneval_like": partial [B], "strict": [B] float 0/1})``, with the protocol's checks."""
        check_images(images, self.name)
        check_prompts(prompts, images.shape[0], self.name, required=False)
        records = check_metadata(metadata, images.shape[0], self.name)
        if images.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=images.device)
            return empty, {self.name: empty, "strict": empty}
        partial, strict = self.evaluate(images, records)
        partial = check_scores(partial, images.shape[0], self.name, device=images.device)
        return partial, {self.name: partial, "strict": strict.float().to(images.device)}

    def _score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict[str, Any]]) -> Tensor:
        return self.evaluate(images, metadata)[0]

    def evaluate(self, images: Tensor, metadata: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        """``(partial [B] float32, strict [B] bool)`` of checked images ``[B, 3, H, W]`` and their GenEval records."""
        for index, record in enumerate(metadata):
            check_geneval_metadata(record, index, self.name)
        bundle = self._ensure_loaded(images.device)
        images = images.detach().to(self.device)
        with torch.no_grad():
            detections = self.detect(bundle, images, metadata)
            results = []
            for image, found, record in zip(images, detections, metadata):
                self._classify_colours(bundle, image, found, record)
                results.append(geneval_score(found, record, self.position_shrink, self.position_quirk))
        partial = torch.tensor([r[0] for r in results], dtype=torch.float32, device=images.device)
        strict = torch.tensor([r[1] for r in results], dtype=torch.bool, device=images.device)
        return partial, strict

    # -- detection ----------------------------------------------------------------------------------------------------

    def detect(
        self, bundle: Mapping[str, Any], images: Tensor, metadata: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, list[Detection]]]:
        """Per image, ``{class: [Detection, ...]}`` for the classes of its ``include`` clauses."""
        results = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = slice(start, start + self.batch_size)
            results += self._detect_chunk(bundle, images[chunk], metadata[chunk])
        return results

    def _detect_chunk(
        self, bundle: Mapping[str, Any], images: Tensor, metadata: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, list[Detection]]]:
        detector = bundle["detector"]
        config = detector.config
        # Each image queries only its own classes: a shared query list would let a box go to another image's class.
        classes = [list(dict.fromkeys(clause["class"] for clause in record["include"])) for record in metadata]
        input_ids, attention_mask = self._queries(
            bundle["tokenizer"], classes, config.text_config.max_position_embeddings
        )
        pixels = owlv2_preprocess(images, config.vision_config.image_size, dtype=self.dtype)
        outputs = detector(
            input_ids=input_ids.to(images.device), attention_mask=attention_mask.to(images.device), pixel_values=pixels
        )
        scores = torch.sigmoid(outputs.logits.float())  # [B, P, Q]
        height, width = images.shape[-2:]
        boxes = _corners(outputs.pred_boxes.float()) * max(height, width)  # relative to the padded square
        limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp_min(0), limits)  # inside the image, as GenEval's mask-derived boxes
        return [
            select_detections(
                scores[i, :, : len(names)],  # the image's own queries, not the padding
                boxes[i],
                names,
                self.counting_threshold if record["tag"] == "counting" else self.threshold,
                self.max_objects,
                self.nms_iou,
            )
            for i, (names, record) in enumerate(zip(classes, metadata))
        ]

    def _queries(self, tokenizer: Any, classes: list[list[str]], max_length: int) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``[B * Q, L]`` of every image's queries, ``Q`` the longest query list.

        Shorter lists are padded with empty queries, whose scores :meth:`_detect_chunk` drops before assigning boxes.
        """
        width = max(len(names) for names in classes)
        texts = [
            self.query_template.format(names[q]) if q < len(names) else "" for names in classes for q in range(width)
        ]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    # -- colours ------------------------------------------------------------------------------------------------------

    def _classify_colours(
        self, bundle: Mapping[str, Any], image: Tensor, found: dict[str, list[Detection]], record: Mapping[str, Any]
    ) -> None:
        """Give the detections of every class that a clause asks a colour of their zero-shot CLIP colour."""
        for name in {clause["class"] for clause in record["include"] if "color" in clause}:
            if not found.get(name):
                continue
            pixels = torch.cat([clip_preprocess(crop(image, d.box)[None], crop_rounding="round") for d in found[name]])
            features = hf_clip.image_embeddings(bundle["clip"], pixels.to(self.dtype))
            picks = (features @ self._color_classifier(bundle, name).T).argmax(dim=-1).tolist()
            found[name] = [d._replace(color=GENEVAL_COLORS[k]) for d, k in zip(found[name], picks)]

    def _color_classifier(self, bundle: Mapping[str, Any], name: str) -> Tensor:
        """``[10, D]`` colour embeddings for class ``name``: per colour, the normalised mean of its normalised
        template embeddings (clip_benchmark's ``zero_shot_classifier``, which GenEval uses)."""
        if name not in self._color_classifiers:
            texts = [t.format(c=c, cls=name) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            device = next(bundle["clip"].parameters()).device
            embeddings = hf_clip.text_embeddings(bundle["clip"], bundle["clip_tokenizer"], texts, device)
            means = embeddings.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._color_classifiers[name] = F.normalize(means, dim=-1)
        return self._color_classifiers[name]


def _corners(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), last dimension."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
