"""Tests for the shapes world: renderer, grammar, sampler, prompt splits and dataset helper."""

from __future__ import annotations

import random

import pytest
import torch

from diffalign.shapes.scenes import (
    BACKGROUND,
    COLOURS,
    HELDOUT_COMBOS,
    HELDOUT_COUNTS,
    HELDOUT_PAIRS,
    MAX_OBJECTS,
    PALETTE,
    PROMPT_KINDS,
    SHAPES,
    CaptionError,
    Constraints,
    ObjectSpec,
    Relation,
    Scene,
    ShapeObject,
    heldout_prompts,
    is_heldout,
    make_caption,
    parse_caption,
    prompts,
    render,
    render_dataset,
    sample_scene,
    train_prompts,
)


def test_palette_is_well_separated() -> None:
    colours = torch.tensor([BACKGROUND, *PALETTE.values()])
    distances = torch.cdist(colours, colours) + torch.eye(len(colours)) * 10
    assert distances.min() > 0.6


# ------------------------------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("size", [32, 64])
def test_render_shape_range_and_colours(size: int) -> None:
    scene = Scene((ShapeObject("red", "square", 0.3, 0.3, 0.3), ShapeObject("blue", "circle", 0.7, 0.7, 0.3)))
    image = render(scene, size)
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    assert torch.allclose(image[:, 0, 0], torch.tensor(BACKGROUND))
    assert torch.allclose(image[:, int(0.3 * size), int(0.3 * size)], torch.tensor(PALETTE["red"]))
    assert torch.allclose(image[:, int(0.7 * size), int(0.7 * size)], torch.tensor(PALETTE["blue"]))
    assert torch.equal(image, render(scene, size)), "the renderer must be deterministic"


def test_render_areas_match_geometry() -> None:
    # Coverage sums to the analytic area: square s^2, circle pi s^2 / 4, triangle s^2 / 2.
    size, side = 64, 0.5
    expected = {"square": side**2, "circle": torch.pi * side**2 / 4, "triangle": side**2 / 2}
    for shape, area in expected.items():
        image = render(Scene((ShapeObject("blue", shape, 0.5, 0.5, side),)), size)
        coverage = (1 - image[0]) / (1 - PALETTE["blue"][0])  # red channel falls linearly with coverage
        assert coverage.sum().item() / size**2 == pytest.approx(area, rel=0.02), shape


def test_render_triangle_points_up() -> None:
    image = render(Scene((ShapeObject("green", "triangle", 0.5, 0.5, 0.6),)), 64)
    ink = 1 - image[2]  # the blue channel drops where green is drawn
    assert ink[20:24].sum() < ink[40:44].sum()  # narrow near the apex (top), wide near the base


def test_render_rejects_unknown_shape() -> None:
    with pytest.raises(ValueError, match="hexagon"):
        render(Scene((ShapeObject("red", "hexagon", 0.5, 0.5, 0.3),)))


# -------------------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_caption_round_trip(kind: str) -> None:
    for caption in prompts(kind):
        constraints = parse_caption(caption)
        assert constraints.kind == kind
        assert make_caption(constraints) == caption


def test_parse_examples() -> None:
    assert parse_caption("a red circle") == Constraints((ObjectSpec("red", "circle"),))
    assert parse_caption("Three Blue squares.") == Constraints((ObjectSpec("blue", "square", 3),))
    assert parse_caption("a red circle and  two green triangles") == Constraints(
        (ObjectSpec("red", "circle"), ObjectSpec("green", "triangle", 2))
    )
    expected = Constraints((ObjectSpec("red", "circle"), ObjectSpec("blue", "triangle")), (Relation(0, "left of", 1),))
    assert parse_caption("a red circle to the left of a blue triangle") == expected
    assert parse_caption("a red circle left of a blue triangle") == expected
    below = parse_caption("a yellow square below a green circle")
    assert below.relations == (Relation(0, "below", 1),)


@pytest.mark.parametrize(
    ("caption", "match"),
    [
        ("a purple circle", "colour in"),
        ("a red hexagon", "shape in"),
        ("two red circle", "number mismatch"),
        ("a red circles", "number mismatch"),
        ("five red circles", "expected"),
        ("a red circle and a red circle", "same colour and shape"),
        ("two red circles to the left of a blue square", "single objects"),
        ("a red circle next to a blue square", "expected"),
        ("", "expected"),
    ],
)
def test_parse_errors_name_the_caption(caption: str, match: str) -> None:
    with pytest.raises(CaptionError, match=match) as info:
        parse_caption(caption)
    assert repr(caption) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(CaptionError, match="must be a str"):
        parse_caption(3)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- sampler


def _check_scene(scene: Scene, constraints: Constraints) -> None:
    expected = sorted((s.colour, s.shape) for s in constraints.objects for _ in range(s.count))
    assert sorted((o.colour, o.shape) for o in scene.objects) == expected
    for obj in scene.objects:
        assert obj.size * 32 >= 8, "objects must stay classifiable at 32x32"
        assert obj.size / 2 < obj.cx < 1 - obj.size / 2 and obj.size / 2 < obj.cy < 1 - obj.size / 2
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            reach = (a.size + b.size) / 2
            assert abs(a.cx - b.cx) > reach or abs(a.cy - b.cy) > reach, "objects overlap"
    for rel in constraints.relations:
        a, b = scene.objects[rel.subject], scene.objects[rel.reference]
        dx, dy = b.cx - a.cx, b.cy - a.cy
        along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel.relation]
        assert along > (a.size + b.size) / 2, "a relation must be unambiguous"


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_sample_scene_satisfies_caption(kind: str) -> None:
    rng = random.Random(0)
    for _ in range(100):
        scene, caption = sample_scene(kind, rng)
        constraints = parse_caption(caption)
        assert constraints.kind == kind
        _check_scene(scene, constraints)


def test_sample_scene_from_caption_and_constraints_is_seeded() -> None:
    caption = "a red circle above a blue square"
    scene, text = sample_scene(caption, 7)
    assert text == caption
    _check_scene(scene, parse_caption(caption))
    assert sample_scene(parse_caption(caption), 7) == (scene, caption)
    assert sample_scene("relation", 3) == sample_scene("relation", 3)
    assert sample_scene("relation", 3) != sample_scene("relation", 4)


def test_sample_scene_errors() -> None:
    with pytest.raises(ValueError, match="at most 4 objects"):
        sample_scene("four red circles and a blue square", 0)
    with pytest.raises(ValueError, match="split"):
        sample_scene("count", 0, split="test")
    with pytest.raises(ValueError, match="no prompts of kind 'single'"):
        sample_scene("single", 0, split="heldout")


def test_sample_scene_respects_split() -> None:
    rng = random.Random(0)
    train, heldout = set(train_prompts()), set(heldout_prompts())
    for kind in PROMPT_KINDS[1:]:
        assert all(sample_scene(kind, rng, split="train")[1] in train for _ in range(50))
        assert all(sample_scene(kind, rng, split="heldout")[1] in heldout for _ in range(50))


# ---------------------------------------------------------------------------------------------- prompt sets


def test_prompt_sets_are_deterministic_and_sized() -> None:
    assert train_prompts() == train_prompts() and heldout_prompts() == heldout_prompts()
    assert len(train_prompts()) == len(set(train_prompts())) == 514
    assert len(heldout_prompts()) == len(set(heldout_prompts())) == 194


def test_split_rule() -> None:
    train, heldout = train_prompts(), heldout_prompts()
    assert not set(train) & set(heldout)
    everything = {caption for kind in PROMPT_KINDS for caption in prompts(kind)}
    assert set(train) | set(heldout) == everything
    # Every colour-shape combination is trained alone and in compositions.
    assert {caption for caption in train if parse_caption(caption).kind == "single"} == set(prompts("single"))
    composed = {
        (s.colour, s.shape) for c in train if parse_caption(c).kind != "single" for s in parse_caption(c).objects
    }
    assert composed == {(colour, shape) for colour in COLOURS for shape in SHAPES}
    pairs_in = {
        kind: {frozenset((s.colour, s.shape) for s in parse_caption(c).objects) for c in captions}
        for kind, captions in (("train", train), ("heldout", heldout))
    }
    for caption in heldout:
        constraints = parse_caption(caption)
        assert constraints.kind != "single" and is_heldout(constraints)
        # Every held-out prompt mentions a held-out combination (so the first training stage never saw it) ...
        assert any((s.colour, s.shape) in HELDOUT_COMBOS for s in constraints.objects), caption
        # ... and its pair of combinations is never composed in training, in any order, kind or relation.
        if len(constraints.objects) == 2:
            assert frozenset((s.colour, s.shape) for s in constraints.objects) not in pairs_in["train"], caption
    assert pairs_in["heldout"] - {frozenset([combo]) for combo in HELDOUT_COMBOS} == set(HELDOUT_PAIRS)
    # Each held-out combination keeps training partners and held-out partners, and trained and held-out counts.
    for combo in HELDOUT_COMBOS:
        assert any(combo in pair for pair in pairs_in["train"] if len(pair) == 2)
        assert any(combo in pair for pair in HELDOUT_PAIRS)
        counts = {
            parse_caption(c).objects[0].count
            for c in train
            if parse_caption(c).kind == "count"
            and (parse_caption(c).objects[0].colour, parse_caption(c).objects[0].shape) == combo
        }
        assert counts and len(counts) == 2, (combo, counts)
    # The held-out set covers every compositional kind and every colour and shape.
    assert {parse_caption(c).kind for c in heldout} == {"count", "binding", "relation"}
    assert {c for c, _ in HELDOUT_COMBOS} == set(COLOURS)
    assert {s for _, s in HELDOUT_COMBOS} == set(SHAPES)
    assert len(HELDOUT_PAIRS) == 19 and len(HELDOUT_COUNTS) == 4


def test_pretrain_split_leaves_out_every_composition_of_the_heldout_combos() -> None:
    pretrain = [caption for kind in PROMPT_KINDS for caption in prompts(kind, "pretrain")]
    assert len(pretrain) == 316 and set(pretrain) < set(train_prompts())
    for caption in pretrain:
        constraints = parse_caption(caption)
        mentions = any((s.colour, s.shape) in HELDOUT_COMBOS for s in constraints.objects)
        assert constraints.kind == "single" or not mentions, caption


def test_counts_stay_within_scene_capacity() -> None:
    for caption in train_prompts() + heldout_prompts():
        assert 1 <= parse_caption(caption).num_objects <= MAX_OBJECTS


# -------------------------------------------------------------------------------------------------- dataset


def test_render_dataset() -> None:
    images, captions = render_dataset(24, random.Random(0), kinds=("single", "relation"), size=32)
    assert images.shape == (24, 3, 32, 32) and images.dtype == torch.float32
    assert len(captions) == 24 and images.min() >= 0 and images.max() <= 1
    assert {parse_caption(c).kind for c in captions} == {"single", "relation"}
    assert set(captions) <= set(train_prompts()), "the base model's data must come from the train split"
    again, captions_again = render_dataset(24, random.Random(0), kinds=("single", "relation"), size=32)
    assert torch.equal(images, again) and captions == captions_again


def test_render_dataset_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kinds"):
        render_dataset(2, 0, kinds=("single", "colour"))
