"""The GenEval-like reward: the scoring rules on hand-made detections, metadata checks, OWLv2 preprocessing and
detections against transformers' own processor and post-processing, on a tiny random OWLv2 and a tiny CLIP."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rewards_testing import smooth_images, to_pil

import rewards
from rewards.base import RewardInputError
from rewards.geneval import (
    COLOR_TEMPLATES,
    GENEVAL_COLORS,
    Detection,
    GenEvalLike,
    check_geneval_metadata,
    crop,
    geneval_score,
    owlv2_preprocess,
    relative_position,
)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "geneval_prompts.jsonl"


def det(x0, y0, x1, y1, color=None, score=0.9):
    return Detection((x0, y0, x1, y1), score, color)


def meta(*include, tag="two_object"):
    return {"tag": tag, "include": list(include)}


# --- position rule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box_a", "box_b", "expected"),
    [
        ((0, 40, 20, 60), (60, 40, 80, 60), {"left of"}),  # offset (-60, 0), shrink 4 -> dx = -56/60
        ((60, 40, 80, 60), (0, 40, 20, 60), {"right of"}),
        ((40, 0, 60, 20), (40, 60, 60, 80), {"above"}),  # image y grows downwards
        ((40, 60, 60, 80), (40, 0, 60, 20), {"below"}),
        ((0, 0, 10, 10), (20, 20, 30, 30), {"left of", "above"}),  # (-20, -20) shrunk by 2: -18 / 28.28 = -0.64
        ((0, 0, 2, 2), (10, -8, 12, -6), {"left of", "below"}),  # (-10, 8): dx = -9.6/12.81, dy = 7.6/12.81 = 0.59
        ((0, 0, 10, 10), (1, 0, 11, 10), set()),  # offset (-1, 0) is shrunk to 0 by 0.1 * 20: no relation at all
        ((0, 0, 20, 10), (10, 0, 30, 10), {"left of"}),  # (-10, 0) - 0.1 * 40 = -6 -> -0.6
        ((0, 0, 30, 10), (10, 0, 40, 10), set()),  # (-10, 0) - 0.1 * 60 = -4 -> -0.4: too close to call
        ((0, 0, 10, 10), (12, 9, 22, 19), {"left of"}),  # (-12, -9): dx = -10/15 = -0.67, dy = -7/15 = -0.47
    ],
)
def test_relative_position_on_hand_computed_boxes(box_a, box_b, expected):
    assert relative_position(box_a, box_b) == expected


def test_position_shrink_is_an_option():
    assert relative_position((0, 0, 30, 10), (10, 0, 40, 10), shrink=0.0) == {"left of"}


# --- scoring rules ---------------------------------------------------------------------------------------------------

CAT = {"class": "cat", "count": 1}
CUP, COUCH_BELOW = {"class": "cup", "count": 1}, {"class": "couch", "count": 1, "position": ["below", 0]}
CUP_BOX, COUCH_BOX = det(40, 0, 60, 20), det(40, 60, 60, 80)  # the couch is below the cup


@pytest.mark.parametrize(
    ("found", "clauses", "expected"),
    [
        ({"cat": [det(0, 0, 5, 5)]}, [CAT], (1.0, True)),
        ({}, [CAT], (0.0, False)),
        ({"cat": [det(0, 0, 5, 5)] * 3}, [CAT], (1 - 2 / 1, False)),  # 3 found for 1: -1, negative as upstream
        ({"cat": [det(0, 0, 5, 5)] * 5}, [{"class": "cat", "count": 2}], (1 - 3 / 2, False)),
        ({"cat": [det(0, 0, 5, 5)]}, [{"class": "cat", "count": 2}], (0.5, False)),
        # two objects, one missing: terms [1, 0]
        ({"cat": [det(0, 0, 5, 5)]}, [CAT, {"class": "dog", "count": 1}], (0.5, False)),
        # colour: 1 of 2 red -> terms [1, 1 - 1/2]
        (
            {"car": [det(0, 0, 5, 5, "red"), det(9, 0, 14, 5, "blue")]},
            [{"class": "car", "count": 2, "color": "red"}],
            (0.75, False),
        ),
        (
            {"car": [det(0, 0, 5, 5, "red"), det(9, 0, 14, 5, "red")]},
            [{"class": "car", "count": 2, "color": "red"}],
            (1.0, True),
        ),
        # wrong count and a colour asked: the count term and a single 0 -> [0.5, 0]
        ({"car": [det(0, 0, 5, 5, "red")]}, [{"class": "car", "count": 2, "color": "red"}], (0.25, False)),
        # colour unknown (not classified) counts as wrong: [1, 0]
        ({"car": [det(0, 0, 5, 5)]}, [{"class": "car", "count": 1, "color": "red"}], (0.5, False)),
        # position holds: [1, 1, 1]
        ({"cup": [CUP_BOX], "couch": [COUCH_BOX]}, [CUP, COUCH_BELOW], (1.0, True)),
        # position fails: [1, 1, 0]
        ({"cup": [COUCH_BOX], "couch": [CUP_BOX]}, [CUP, COUCH_BELOW], (2 / 3, False)),
        # the referenced clause failed (no cup): [0, 1, 0]
        ({"couch": [COUCH_BOX]}, [CUP, COUCH_BELOW], (1 / 3, False)),
        # wrong count of the positioned object: [1, 0, 0] (one 0 for the skipped position check)
        ({"cup": [CUP_BOX], "couch": [COUCH_BOX] * 2}, [CUP, COUCH_BELOW], (1 / 3, False)),
        # a wrong colour skips the position check: [1, 1, 0]
        (
            {"cup": [CUP_BOX], "couch": [COUCH_BOX._replace(color="red")]},
            [CUP, {**COUCH_BELOW, "color": "blue"}],
            (2 / 3, False),
        ),
    ],
)
def test_geneval_score_on_hand_made_detections(found, clauses, expected):
    score, strict = geneval_score(found, meta(*clauses))
    assert score == pytest.approx(expected[0]) and strict is expected[1]


def test_position_must_hold_for_every_pair():
    cups = [det(0, 0, 10, 10), det(100, 0, 110, 10)]
    couches = [det(0, 50, 10, 60), det(100, 50, 110, 60)]  # each couch is below its own cup, not the other one
    clauses = [{"class": "cup", "count": 2}, {"class": "couch", "count": 2, "position": ["below", 0]}]
    # couch 0 vs cup 1: offset (-100, 50), shrink (2, 2): dx = -98/111.8, dy = 48/111.8 = 0.43 -> not "below"
    assert geneval_score({"cup": cups, "couch": couches}, meta(*clauses)) == (pytest.approx(2 / 3), False)


def test_upstream_position_quirk_adds_a_one_after_a_failed_relation():
    failed = {"cup": [COUCH_BOX], "couch": [CUP_BOX]}
    assert geneval_score(failed, meta(CUP, COUCH_BELOW), position_quirk=True) == (pytest.approx(3 / 4), False)
    # a success and a missing target are unaffected: [1, 1, 1] and [0, 1, 0]
    ok = {"cup": [CUP_BOX], "couch": [COUCH_BOX]}
    assert geneval_score(ok, meta(CUP, COUCH_BELOW), position_quirk=True) == (1.0, True)
    no_target = {"couch": [COUCH_BOX]}
    assert geneval_score(no_target, meta(CUP, COUCH_BELOW), position_quirk=True) == (pytest.approx(1 / 3), False)


# --- metadata checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({}, "'tag'"),
        ({"tag": "colors"}, "'include'"),
        ({"tag": "colors", "include": []}, "'include'"),
        ({"tag": "colors", "include": [{"count": 1}]}, r"'include\[0\].class'"),
        ({"tag": "colors", "include": [{"class": "cat", "count": 0}]}, r"'include\[0\].count'"),
        ({"tag": "colors", "include": [{"class": "cat", "count": True}]}, r"'include\[0\].count'"),
        ({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, r"'include\[0\].color'"),
        ({"tag": "position", "include": [CUP, {**CUP, "position": ["near", 0]}]}, r"'include\[1\].position'"),
        ({"tag": "position", "include": [{**CUP, "position": ["below", 0]}]}, r"'include\[0\].position'"),
        ({"tag": "counting", "include": [CAT], "exclude": [{"class": "cat"}]}, r"'exclude\[0\].count'"),
    ],
)
def test_malformed_metadata_names_the_image_and_the_field(record, field):
    with pytest.raises(RewardInputError, match=f"image 3: metadata field {field}"):
        check_geneval_metadata(record, 3)


def test_example_prompt_file_is_valid_geneval_metadata():
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    assert {r["tag"] for r in records} == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    for index, record in enumerate(records):
        check_geneval_metadata(record, index)
        assert isinstance(record["prompt"], str) and record["prompt"]


# --- OWLv2 preprocessing and detections ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "edge"), [((48, 80), 64), ((200, 150), 64), ((70, 100), 960)])
def test_owlv2_preprocess_matches_the_processor(size, edge):
    """(48, 80) -> 64: pad and shrink with a blur of sigma 0.125; (200, 150) -> 64: sigma 1.06, a 9-tap kernel;
    (70, 100) -> 960: enlarging, no blur (the real model's input size)."""
    from transformers import Owlv2ImageProcessor

    images = smooth_images(2, *size)
    processor = Owlv2ImageProcessor(size={"height": edge, "width": edge})
    ref = processor(to_pil(images), return_tensors="pt")["pixel_values"]
    ours = owlv2_preprocess(images, edge)
    assert ours.shape == ref.shape == (2, 3, edge, edge)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_crop_rounds_like_pil():
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).view(3, 20, 30) / (3 * 20 * 30)
    pil = to_pil(image[None])[0]
    for box in [(2.4, 3.6, 17.5, 12.5), (0.0, 0.0, 30.0, 20.0), (4.5, 6.5, 9.5, 7.5)]:  # PIL rounds half to even
        expected = torch.from_numpy(np.asarray(pil.crop(box)).copy()).permute(2, 0, 1).float() / 255
        ours = (crop(image, box) * 255).round() / 255
        assert ours.shape == expected.shape, box
        torch.testing.assert_close(ours, expected)
    assert crop(image, (29.8, 19.9, 31.0, 25.0)).shape == (3, 1, 1)  # clipped to the image, never empty


@pytest.fixture(scope="session")
def tiny_owlv2_dir(tmp_path_factory):
    """A tiny random ``Owlv2ForObjectDetection`` (64 px input, 16 patches) with an OWLv2-style CLIP tokenizer
    (16 tokens, padded with "!" = id 0) and its processor, saved like a hub folder."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from diffalign.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-owlv2")
    torch.manual_seed(7)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text.update(max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vision.update(image_size=64, patch_size=16)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder)
    tokenizer = build_clip_tokenizer(tmp_path_factory.mktemp("owl-tok"), model_max_length=16, pad_token="!")
    Owlv2Processor(Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer).save_pretrained(folder)
    return folder


def load_tiny(tiny_owlv2_dir, tiny_clip_dir, **options):
    return rewards.load("geneval_like", path=tiny_owlv2_dir, clip_path=tiny_clip_dir, **options)


def reference_detections(folder, images, classes, threshold, nms_iou=0.5, max_objects=16):
    """transformers' own path: ``Owlv2Processor`` on PIL images, the model, ``post_process_grounded_object_detection``
    (boxes scaled to the padded square), then per-class sorting, NMS and the cap."""
    from torchvision.ops import nms
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    processor = Owlv2Processor.from_pretrained(folder)
    model = Owlv2ForObjectDetection.from_pretrained(folder).eval()
    texts = [[f"a photo of a {name}" for name in names] for names in classes]
    inputs = processor(text=texts, images=to_pil(images), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = [tuple(images.shape[-2:])] * len(images)
    results = processor.post_process_grounded_object_detection(outputs, threshold, sizes, text_labels=texts)
    height, width = images.shape[-2:]
    found = []
    for names, result in zip(classes, results):
        boxes = result["boxes"].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        per_class = {}
        for q, name in enumerate(names):
            keep = (result["labels"] == q).nonzero().flatten()
            keep = keep[result["scores"][keep].argsort(descending=True)]
            keep = keep[nms(boxes[keep], result["scores"][keep], nms_iou)][:max_objects]
            if keep.numel():
                per_class[name] = (boxes[keep], result["scores"][keep])
        found.append(per_class)
    return found


def test_detections_match_transformers_processor_and_post_processing(tiny_owlv2_dir, tiny_clip_dir):
    images = smooth_images(2, 48, 80)
    classes = [["cat", "dog"], ["car", "bowl"]]
    records = [meta({"class": a, "count": 1}, {"class": b, "count": 1}) for a, b in classes]
    reward = load_tiny(tiny_owlv2_dir, tiny_clip_dir, threshold=0.5)
    ours = reward.detect(reward._ensure_loaded(torch.device("cpu")), images, records)
    ref = reference_detections(tiny_owlv2_dir, images, classes, threshold=0.5)
    total = 0
    for mine, theirs in zip(ours, ref):
        assert set(mine) == set(theirs)
        for name, (boxes, scores) in theirs.items():
            torch.testing.assert_close(torch.tensor([d.box for d in mine[name]]), boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(torch.tensor([d.score for d in mine[name]]), scores, atol=1e-5, rtol=0)
            total += len(boxes)
    assert 0 < total < 2 * 16, "the threshold keeps all or nothing: the comparison is vacuous"


def test_score_shapes_range_and_metadata_dependence(tiny_owlv2_dir, tiny_clip_dir):
    """Threshold 0 and no NMS keep every one of the 16 patch boxes of a single-class query, capped at 2: n = 2."""
    reward = load_tiny(tiny_owlv2_dir, tiny_clip_dir, threshold=0.0, nms_iou=1.0, max_objects=2)
    images = smooth_images(3, 64, 64)
    counts = [{"tag": "counting", "include": [{"class": "apple", "count": c}]} for c in (2, 1, 4)]
    scores = reward.score(images, None, counts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([1.0, 1 - 1 / 1, 1 - 2 / 4]))  # hand-computed count terms
    total, parts = reward.score_parts(images, None, counts)
    torch.testing.assert_close(parts["strict"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(total, scores)


def test_counting_tag_uses_the_counting_threshold(tiny_owlv2_dir, tiny_clip_dir):
    """A "counting" image is thresholded at counting_threshold, any other tag at threshold."""
    both = load_tiny(tiny_owlv2_dir, tiny_clip_dir, threshold=0.0, counting_threshold=0.5, nms_iou=1.0)
    at_half = load_tiny(tiny_owlv2_dir, tiny_clip_dir, threshold=0.5, nms_iou=1.0)
    bundle = both._ensure_loaded(torch.device("cpu"))
    images = smooth_images(1, 64, 64)
    include = [{"class": "apple", "count": 1}]
    counting = both.detect(bundle, images, [{"tag": "counting", "include": include}])[0]["apple"]
    other = both.detect(bundle, images, [{"tag": "single_object", "include": include}])[0]["apple"]
    half = at_half.detect(bundle, images, [{"tag": "single_object", "include": include}])[0]["apple"]
    assert counting == half and all(d.score > 0.5 for d in counting)
    assert len(other) > len(counting)  # threshold 0 keeps the low-scoring boxes too
    assert [d.score for d in other] == sorted((d.score for d in other), reverse=True)  # best first


def test_each_image_queries_only_its_own_classes(tiny_owlv2_dir, tiny_clip_dir):
    """A one-class image scored beside a three-class image gets the detections it gets alone: the empty queries
    that pad its query list never take a box. Threshold 0 and no NMS: every one of the 16 patch boxes is kept."""
    reward = load_tiny(tiny_owlv2_dir, tiny_clip_dir, threshold=0.0, nms_iou=1.0)
    bundle = reward._ensure_loaded(torch.device("cpu"))
    images = smooth_images(2, 64, 64)
    one = meta({"class": "apple", "count": 1}, tag="single_object")
    three = meta(*({"class": name, "count": 1} for name in ("cat", "dog", "apple")))
    together = reward.detect(bundle, images, [one, three])[0]
    alone = reward.detect(bundle, images[:1], [one])[0]
    assert together.keys() == alone.keys() == {"apple"} and len(alone["apple"]) == 16
    for field in ("box", "score"):  # batched and single forward passes differ by float rounding only
        torch.testing.assert_close(
            torch.tensor([getattr(d, field) for d in together["apple"]]),
            torch.tensor([getattr(d, field) for d in alone["apple"]]),
        )


def test_colour_classifier_is_the_normalised_template_mean(tiny_owlv2_dir, tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    reward = load_tiny(tiny_owlv2_dir, tiny_clip_dir)
    classifier = reward._color_classifier(reward._ensure_loaded(torch.device("cpu")), "car")
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoTokenizer.from_pretrained(tiny_clip_dir)
    rows = []
    for colour in GENEVAL_COLORS:
        texts = [template.format(c=colour, cls="car") for template in COLOR_TEMPLATES]
        with torch.no_grad():
            out = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        mean = torch.nn.functional.normalize(emb, dim=-1).mean(0)
        rows.append(mean / mean.norm())
    torch.testing.assert_close(classifier, torch.stack(rows), atol=1e-5, rtol=0)


def test_colour_terms_follow_the_classified_colours(tiny_owlv2_dir, tiny_clip_dir):
    """Two apples found (threshold 0, cap 2); whatever colours the random CLIP picks, score and strict agree with
    geneval_score on those detections."""
    reward = load_tiny(tiny_owlv2_dir, tiny_clip_dir, threshold=0.0, nms_iou=1.0, max_objects=2)
    bundle = reward._ensure_loaded(torch.device("cpu"))
    images = smooth_images(1, 64, 96)
    record = meta({"class": "apple", "count": 2, "color": "red"}, tag="colors")
    found = reward.detect(bundle, images, [record])[0]
    reward._classify_colours(bundle, images[0], found, record)
    assert all(d.color in GENEVAL_COLORS for d in found["apple"])
    reds = sum(d.color == "red" for d in found["apple"])
    total, parts = reward.score_parts(images, None, [record])
    torch.testing.assert_close(total, torch.tensor([(1 + 1 - abs(2 - reds) / 2) / 2]))
    assert parts["strict"].item() == float(reds == 2)


def test_missing_metadata_is_refused_naming_the_image(tiny_owlv2_dir, tiny_clip_dir):
    reward = load_tiny(tiny_owlv2_dir, tiny_clip_dir)
    images = smooth_images(2, 32, 32)
    with pytest.raises(RewardInputError, match="image 0: metadata field 'tag'"):
        reward.score(images, ["a", "b"])  # no metadata at all: empty dicts
    with pytest.raises(RewardInputError, match=r"image 1: metadata field 'include\[0\].count'"):
        reward.score(images, None, [meta(CAT), meta({"class": "cat"})])


def test_registered_lazy_and_not_differentiable(tmp_path):
    reward = rewards.load("geneval_like", path=tmp_path / "missing", position_quirk=True)
    assert isinstance(reward, GenEvalLike) and reward.takes_metadata and not reward.differentiable
    assert not reward.needs_prompts and reward.position_quirk
    assert "counting_threshold" in rewards.factory_options("geneval_like")
    with pytest.raises(OSError, match="GenEval-like detector"):
        reward.score(smooth_images(1, 16, 16), None, [meta(CAT)])
    with pytest.raises(ValueError, match="threshold must lie"):
        rewards.load("geneval_like", threshold=1.5)
