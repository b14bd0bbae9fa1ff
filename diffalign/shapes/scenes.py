"""The shapes world: palette, scenes, a deterministic renderer, the caption grammar, samplers and prompt sets.

A scene is 1-4 solid shapes (circle, square, upright triangle) of a few well-separated colours on a white
background. Geometry is resolution independent (centres and sizes are fractions of the image side), so one
scene renders at 32x32 or 64x64 alike.

Caption grammar (lower case; a trailing full stop and extra spaces are tolerated)::

    caption  := phrase (" and " phrase)*                   # "single", "count" and "binding" prompts
              | single RELATION single                     # "relation" prompts
    phrase   := single | COUNT COLOUR SHAPE "s"            # COUNT in two..four ("one" is accepted too)
    single   := "a" COLOUR SHAPE
    RELATION := " to the left of " | " to the right of " | " above " | " below "

Prompt kinds: ``single`` ("a red circle"), ``count`` ("three blue squares"), ``binding`` ("a red circle and a
blue square") and ``relation`` ("a red circle to the left of a blue triangle").

Split rule (``train_prompts`` / ``heldout_prompts``): every single-object prompt is a training prompt, so the
base model learns every colour and every shape. The held-out set is made of *compositions* the model never saw,
of parts it did: one colour-shape combination per colour (``HELDOUT_COMBOS``) has half of its compositions held
out, namely a fixed half of the pairs of combinations that include one of them (``HELDOUT_PAIRS``: their binding
and relation prompts, in both orders and every relation) and one count of each (``HELDOUT_COUNTS``). Every part
of a held-out prompt, and every combination in it, appears in training compositions, just never together; as in
GenEval, the held-out set measures compositional generalisation.

(The shipped base model was first trained with all compositions of ``HELDOUT_COMBOS`` held out, then on this
split, so that it never saw a held-out prompt at either stage; see ``scripts/shapes/train_base.py``.)
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


BACKGROUND: tuple[float, float, float] = (1.0, 1.0, 1.0)
# Hue-separated, saturated colours: every pair stays far apart even after mixing with the background, which is
# what anti-aliased or blurred edges do (see verifier.segment_colours).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.62, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.80, 0.05),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
PROMPT_KINDS: tuple[str, ...] = ("single", "count", "binding", "relation")
SPLITS: tuple[str, ...] = ("train", "heldout", "all", "pretrain")
"""``pretrain``: the training prompts without any composition of ``HELDOUT_COMBOS`` (the base model's first stage)."""
# One combination per colour, cycling through the shapes, so that every colour and every shape has some.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    (colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS)
)


def _heldout_pairs() -> frozenset[frozenset[tuple[str, str]]]:
    """Half of the unordered pairs of combinations that include a ``HELDOUT_COMBOS`` one, balanced and fixed:
    for each held-out combination (in sorted order) 4 of its 8 partners outside ``HELDOUT_COMBOS``, and 3 of
    the 6 pairs of two held-out combinations (a seeded draw)."""
    rng = random.Random(0)
    combos = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    held = sorted(HELDOUT_COMBOS)
    others = [combo for combo in combos if combo not in HELDOUT_COMBOS]
    pairs = [frozenset((h, o)) for h in held for o in rng.sample(others, len(others) // 2)]
    between = [frozenset((a, b)) for i, a in enumerate(held) for b in held[i + 1 :]]
    return frozenset(pairs + rng.sample(between, len(between) // 2))


HELDOUT_PAIRS: frozenset[frozenset[tuple[str, str]]] = _heldout_pairs()
HELDOUT_COUNTS: frozenset[tuple[str, str, int]] = frozenset(
    (colour, shape, 2 + i % 3) for i, (colour, shape) in enumerate(sorted(HELDOUT_COMBOS))
)
MAX_OBJECTS = 4

_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


# --------------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObject:
    """One solid shape. Coordinates are fractions of the image side; y grows downwards.

    Attributes:
        colour: a key of ``PALETTE``.
        shape: one of ``SHAPES``.
        cx: horizontal centre of the bounding box, in [0, 1].
        cy: vertical centre of the bounding box, in [0, 1].
        size: side of the (square) bounding box: circle diameter, square side, triangle base and height.
    """

    colour: str
    shape: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """A list of non-overlapping shapes on the plain ``BACKGROUND``."""

    objects: tuple[ShapeObject, ...]


def _coverage(obj: ShapeObject, xs: Tensor, ys: Tensor) -> Tensor:
    """Boolean mask [S, S] of the sub-pixel centres ``(xs, ys)`` that lie inside ``obj``."""
    half = obj.size / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if obj.shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if obj.shape == "triangle":
        # Upright isosceles triangle filling half of its bounding box: apex at the top centre, base at the bottom.
        depth = dy + half  # distance below the apex
        return (depth >= 0) & (dy <= half) & (dx.abs() <= depth / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Tensor:
    """Render a scene deterministically, anti-aliased by supersampling then average pooling.

    Args:
        scene: the shapes to draw.
        size: output side in pixels.
        supersample: sub-pixels per pixel side; 4 gives smooth edges like a generative model's.

    Returns:
        Tensor [3, size, size] float32 in [0, 1].
    """
    side = size * supersample
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    canvas = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1).expand(3, side, side).clone()
    for obj in scene.objects:
        # Only the sub-pixels of the bounding box can be covered; testing just those is ~5x faster at 4 objects.
        x0, x1 = (max(0, math.floor((obj.cx + sign * obj.size / 2) * side) + sign) for sign in (-1, 1))
        y0, y1 = (max(0, math.floor((obj.cy + sign * obj.size / 2) * side) + sign) for sign in (-1, 1))
        box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        mask = _coverage(obj, xs[box], ys[box])
        canvas[:, box[0], box[1]][:, mask] = torch.tensor(PALETTE[obj.colour], dtype=torch.float32).view(3, 1)
    return F.avg_pool2d(canvas.unsqueeze(0), supersample).squeeze(0).clamp_(0.0, 1.0)


# -------------------------------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one colour and shape required by a caption."""

    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` (one of ``RELATIONS``) ``objects[reference]``."""

    subject: int
    relation: str
    reference: int


@dataclass(frozen=True)
class Constraints:
    """What a caption asks for: object specs with distinct (colour, shape) pairs, and spatial relations."""

    objects: tuple[ObjectSpec, ...]
    relations: tuple[Relation, ...] = ()

    @property
    def num_objects(self) -> int:
        return sum(spec.count for spec in self.objects)

    @property
    def kind(self) -> str:
        """The prompt kind (one of ``PROMPT_KINDS``) this caption belongs to."""
        if self.relations:
            return "relation"
        if len(self.objects) > 1:
            return "binding"
        return "count" if self.objects[0].count > 1 else "single"


def _phrase(spec: ObjectSpec) -> str:
    if spec.count == 1:
        return f"a {spec.colour} {spec.shape}"
    return f"{COUNT_WORDS[spec.count - 1]} {spec.colour} {spec.shape}s"


def make_caption(constraints: Constraints) -> str:
    """Write the caption of ``constraints`` in the grammar (the inverse of ``parse_caption``)."""
    if constraints.relations:
        (rel,) = constraints.relations
        subject, reference = constraints.objects[rel.subject], constraints.objects[rel.reference]
        return f"{_phrase(subject)} {_RELATION_TEXT[rel.relation]} {_phrase(reference)}"
    return " and ".join(_phrase(spec) for spec in constraints.objects)


class CaptionError(ValueError):
    """A caption outside the shapes grammar."""


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_PHRASE_RE = re.compile(rf"(a|an|{'|'.join(COUNT_WORDS)}) ({_COLOUR_RE}) ({_SHAPE_RE})(s?)")
_RELATION_RE = re.compile(r" (?:to the )?(left of|right of) | (above|below) ")


def _parse_phrase(text: str, caption: str) -> ObjectSpec:
    match = _PHRASE_RE.fullmatch(text)
    if match is None:
        raise CaptionError(
            f"cannot parse {text!r} in caption {caption!r}: expected '<a|one..four> <colour> <shape>[s]' with "
            f"colour in {COLOURS} and shape in {SHAPES}"
        )
    word, colour, shape, plural = match.groups()
    count = 1 if word in ("a", "an") else COUNT_WORDS.index(word) + 1
    if bool(plural) != (count > 1):
        raise CaptionError(f"number mismatch in {text!r} of caption {caption!r}: use the plural iff count > 1")
    return ObjectSpec(colour, shape, count)


@functools.lru_cache(maxsize=4096)
def parse_caption(caption: str) -> Constraints:
    """Parse a caption of the shapes grammar (see the module docstring).

    Raises:
        CaptionError: (a ``ValueError``) naming the caption, if it is outside the grammar, repeats a
            colour-shape pair, or relates plural phrases.
    """
    if not isinstance(caption, str):
        raise CaptionError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
    text = " ".join(caption.lower().strip().rstrip(".").split())
    parts = _RELATION_RE.split(text, maxsplit=1)
    if len(parts) > 1:
        left, rel_lr, rel_ab, right = parts
        specs = (_parse_phrase(left, caption), _parse_phrase(right, caption))
        if specs[0].count != 1 or specs[1].count != 1:
            raise CaptionError(f"relations take single objects ('a <colour> <shape>'), got caption {caption!r}")
        relations = (Relation(0, rel_lr or rel_ab, 1),)
    else:
        specs, relations = tuple(_parse_phrase(part, caption) for part in text.split(" and ")), ()
    pairs = [(spec.colour, spec.shape) for spec in specs]
    if len(set(pairs)) != len(pairs):
        raise CaptionError(f"caption {caption!r} names the same colour and shape twice; use a count instead")
    return Constraints(specs, relations)


# ------------------------------------------------------------------------------------------------ prompt sets


def _combos() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def _enumerate(kind: str) -> list[Constraints]:
    """Every constraint set of one prompt kind, in a fixed order."""
    combos = _combos()
    if kind == "single":
        return [Constraints((ObjectSpec(c, s),)) for c, s in combos]
    if kind == "count":
        return [Constraints((ObjectSpec(c, s, n),)) for n in range(2, MAX_OBJECTS + 1) for c, s in combos]
    pairs = [(a, b) for a in combos for b in combos if a != b]
    if kind == "binding":
        return [Constraints((ObjectSpec(*a), ObjectSpec(*b))) for a, b in pairs]
    if kind == "relation":
        return [
            Constraints((ObjectSpec(*a), ObjectSpec(*b)), (Relation(0, rel, 1),))
            for rel in RELATIONS
            for a, b in pairs
        ]
    raise ValueError(f"unknown prompt kind {kind!r}; expected one of {PROMPT_KINDS}")


def is_heldout(constraints: Constraints) -> bool:
    """The split rule: a count prompt in ``HELDOUT_COUNTS``, or a binding or relation prompt whose two combinations
    form a pair of ``HELDOUT_PAIRS``."""
    objects = constraints.objects
    if constraints.kind == "count":
        return (objects[0].colour, objects[0].shape, objects[0].count) in HELDOUT_COUNTS
    if constraints.kind in ("binding", "relation"):
        return frozenset((spec.colour, spec.shape) for spec in objects) in HELDOUT_PAIRS
    return False


@functools.lru_cache(maxsize=64)
def _prompt_specs(kind: str, split: str) -> tuple[Constraints, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    specs = _enumerate(kind)
    if split == "all":
        return tuple(specs)
    if split == "pretrain":
        return tuple(spec for spec in specs if spec.kind == "single" or not _mentions_heldout_combo(spec))
    return tuple(spec for spec in specs if is_heldout(spec) == (split == "heldout"))


def _mentions_heldout_combo(constraints: Constraints) -> bool:
    return any((spec.colour, spec.shape) in HELDOUT_COMBOS for spec in constraints.objects)


def prompts(kind: str, split: str = "all") -> list[str]:
    """Captions of one prompt kind in one split (one of ``SPLITS``), in a fixed order."""
    return [make_caption(spec) for spec in _prompt_specs(kind, split)]


def train_prompts() -> list[str]:
    """All single-object prompts and the compositional prompts outside the held-out set (514 captions)."""
    return [caption for kind in PROMPT_KINDS for caption in prompts(kind, "train")]


def heldout_prompts() -> list[str]:
    """Compositional prompts (count, binding, relation) never composed in training (194 captions: 4 count, 38 binding
    and 152 relation prompts; see ``is_heldout``)."""
    return [caption for kind in PROMPT_KINDS[1:] for caption in prompts(kind, "heldout")]


# --------------------------------------------------------------------------------------------------- sampler

_BORDER = 0.04  # empty margin between shapes and the image edge
_GAP = 0.08  # empty margin between two shapes' bounding boxes (2-3 px at 32x32, so blur never joins them)
_MAX_TRIES = 2000


def _size_range(num_objects: int) -> tuple[float, float]:
    # Big enough to classify at 32x32 (>= 8 px), small enough that four fit with margins.
    return (0.26, 0.40) if num_objects <= 2 else (0.25, 0.32)


def _separated(a: ShapeObject, b: ShapeObject) -> bool:
    reach = (a.size + b.size) / 2 + _GAP
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def _clearly_related(a: ShapeObject, relation: str, b: ShapeObject) -> bool:
    """``a`` is unambiguously ``relation`` ``b``: fully apart along the axis and within 30 degrees of it."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b; y grows downwards
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = dy if relation in ("left of", "right of") else dx
    return along >= (a.size + b.size) / 2 + _GAP and abs(across) <= 0.577 * along


def _place(specs: Sequence[tuple[str, str]], relation: Relation | None, rng: random.Random) -> Scene:
    """Place objects one at a time by rejection, restarting the scene when one no longer fits."""
    lo, hi = _size_range(len(specs))
    for _ in range(_MAX_TRIES):
        objects: list[ShapeObject] = []
        for colour, shape in specs:
            for _ in range(50):
                size = rng.uniform(lo, hi)
                low, high = _BORDER + size / 2, 1 - _BORDER - size / 2
                obj = ShapeObject(colour, shape, rng.uniform(low, high), rng.uniform(low, high), size)
                if all(_separated(obj, other) for other in objects):
                    objects.append(obj)
                    break
        if len(objects) < len(specs):
            continue
        if relation and not _clearly_related(
            objects[relation.subject], relation.relation, objects[relation.reference]
        ):
            continue
        return Scene(tuple(objects))
    raise RuntimeError(f"could not place {len(specs)} objects in {_MAX_TRIES} tries")  # pragma: no cover


def _as_rng(rng: random.Random | int | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def sample_scene(
    spec: str | Constraints, rng: random.Random | int | None = None, split: str = "all"
) -> tuple[Scene, str]:
    """Sample a scene that satisfies a caption.

    Args:
        spec: a prompt kind (one of ``PROMPT_KINDS``: a caption of that kind is drawn from ``split``), a caption,
            or parsed ``Constraints``.
        rng: a ``random.Random`` (advanced in place), a seed, or None for a fresh unseeded one.
        split: where a prompt kind draws its caption from: one of ``SPLITS``.

    Returns:
        ``(scene, caption)``: non-overlapping objects with margins, in the order of the caption's phrases.
    """
    rng = _as_rng(rng)
    if isinstance(spec, str) and spec in PROMPT_KINDS:
        choices = _prompt_specs(spec, split)
        if not choices:
            raise ValueError(f"split {split!r} has no prompts of kind {spec!r}")
        constraints = rng.choice(choices)
    else:
        constraints = parse_caption(spec) if isinstance(spec, str) else spec
    if constraints.num_objects > MAX_OBJECTS:
        raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, caption asks for {constraints.num_objects}")
    flat = [(s.colour, s.shape) for s in constraints.objects for _ in range(s.count)]
    relation = constraints.relations[0] if constraints.relations else None  # indices match: relations are 1-1
    return _place(flat, relation, rng), make_caption(constraints)


def render_dataset(
    num_images: int,
    rng: random.Random | int | None = None,
    kinds: Sequence[str] = PROMPT_KINDS,
    size: int = 32,
    split: str = "train",
) -> tuple[Tensor, list[str]]:
    """Render a training set for the base text-to-image model.

    Args:
        num_images: number of scenes N.
        rng: a ``random.Random``, a seed, or None.
        kinds: prompt kinds to draw from, uniformly per image (repeat a kind to weight it).
        size: image side in pixels.
        split: caption pool; "train" by default so that held-out compositions stay unseen.

    Returns:
        ``(images, captions)``: images [N, 3, size, size] float32 in [0, 1] and N captions.
    """
    rng = _as_rng(rng)
    unknown = [kind for kind in kinds if kind not in PROMPT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {PROMPT_KINDS}, got {list(kinds)}")
    images = torch.empty(num_images, 3, size, size)
    captions: list[str] = []
    for i in range(num_images):
        scene, caption = sample_scene(rng.choice(list(kinds)), rng, split)
        images[i] = render(scene, size)
        captions.append(caption)
    return images, captions
