"""The OCR reward: flow_grpo's formula on hand-computed cases, target extraction, and real RapidOCR (slow)."""

import sys

import numpy as np
import pytest
import torch

import rewards
from rewards.base import RewardInputError
from rewards.ocr import OCRReward, ocr_distance_reward, quoted_text


@pytest.mark.parametrize(
    ("target", "recognised", "expected"),
    [
        ("Hello", "hello", 1.0),  # case folded
        ("Hello World", "helloworld", 1.0),  # spaces removed on both sides
        ("cat", "THE CAT SAT", 1.0),  # substring: "thecatsat" contains "cat"
        ("hello", "hallo", 1 - 1 / 5),  # one substitution
        ("hello", "hell", 1 - 1 / 5),  # one deletion
        ("abcd", "xy", 0.0),  # Levenshtein 4 = len(target): nothing right
        ("abc", "zzzzzzzzzz", 0.0),  # Levenshtein 10, capped at len 3
        ("abcd", "abxdyyyyyy", 0.0),  # Levenshtein 7 capped at 4 although "ab" and "d" are right
        ("stop sign", "st0psign", 1 - 1 / 8),  # target "stopsign" has 8 letters, one substituted
        ("open", "", 0.0),  # nothing read: distance = len(target)
    ],
)
def test_formula_on_hand_computed_cases(target, recognised, expected):
    assert ocr_distance_reward(target, recognised) == pytest.approx(expected)


def test_empty_target_is_refused():
    with pytest.raises(ValueError, match="target text is empty"):
        ocr_distance_reward("  ", "anything")


def test_quoted_text_takes_the_first_closed_span():
    assert quoted_text('a sign that says "Hello World" and "Bye"') == "Hello World"
    assert quoted_text("no quotes here") is None
    assert quoted_text('only "one quote') is None


class FakeOCR:
    """Returns fixed lines and records the images it was shown."""

    def __init__(self, lines):
        self.lines, self.seen = lines, []

    def __call__(self, image):
        self.seen.append(image)
        return self.lines


def test_reward_joins_confident_lines_and_scores_each_image():
    fake = FakeOCR([("HEL", 0.9), ("zzz", 0.3), ("LO", 0.6)])  # "zzz" is below 0.5 and dropped
    reward = OCRReward(recognizer=fake)
    images = torch.rand(2, 3, 8, 10)
    scores = reward.score(images, ['a sign saying "hello"', 'a sign saying "help"'])
    # "hello" is read exactly; "help" vs "hello": 2 edits (p->l, insert o), 1 - 2/4.
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.5]))
    assert scores.dtype == torch.float32 and not reward.differentiable
    assert fake.seen[0].shape == (8, 10, 3) and fake.seen[0].dtype == np.uint8
    expected = (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(fake.seen[0], expected)


def test_min_confidence_zero_keeps_every_line():
    reward = OCRReward(recognizer=FakeOCR([("HEL", 0.9), ("zzz", 0.3), ("LO", 0.6)]), min_confidence=0.0)
    # "helzzzlo" contains no "hello": Levenshtein("helzzzlo", "hello") = 3 deletions, 1 - 3/5.
    torch.testing.assert_close(reward.score(torch.rand(1, 3, 4, 4), ['"hello"']), torch.tensor([0.4]))


def test_metadata_text_overrides_the_prompt():
    reward = OCRReward(recognizer=FakeOCR([("Diffalign", 0.99)]))
    scores = reward.score(torch.rand(2, 3, 4, 4), ["no quotes", '"other"'], [{"text": "diffalign"}, {}])
    # second image: target "other" vs "diffalign": 9 edits, capped at 5 -> 0.
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))


def test_metadata_text_alone_needs_no_prompts():
    reward = OCRReward(recognizer=FakeOCR([("Open 24h", 0.9)]))
    scores = reward.score(torch.rand(2, 3, 4, 4), None, [{"text": "open24h"}, {"text": "closed"}])
    # "closed" vs "open24h": 7 edits, capped at len("closed") = 6 -> 0.
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))
    with pytest.raises(RewardInputError, match=r"image 1: prompt '' has no double-quoted text"):
        reward.score(torch.rand(2, 3, 4, 4), None, [{"text": "open24h"}, {}])


def test_a_prompt_without_quoted_text_names_the_image_and_the_fix():
    reward = OCRReward(recognizer=FakeOCR([]))
    with pytest.raises(RewardInputError, match=r"image 1: prompt 'a plain sign' has no double-quoted text.*metadata"):
        reward.score(torch.rand(2, 3, 4, 4), ['"ok"', "a plain sign"])
    with pytest.raises(RewardInputError, match="image 0: metadata field 'text' must be a non-empty string"):
        reward.score(torch.rand(1, 3, 4, 4), ['"ok"'], [{"text": 3}])


def test_registered_with_its_options():
    assert rewards.factory_options("ocr") == ["min_confidence", "threads", "recognizer"]
    reward = rewards.load("ocr", min_confidence=0.2)
    assert isinstance(reward, OCRReward) and reward.min_confidence == 0.2 and reward.takes_metadata
    with pytest.raises(ValueError, match="min_confidence must lie in"):
        rewards.load("ocr", min_confidence=2)


def test_a_missing_ocr_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "Levenshtein", None)  # None in sys.modules makes import fail
    with pytest.raises(ImportError, match="needs the package 'Levenshtein': pip install rapidocr onnxruntime"):
        ocr_distance_reward("abc", "abd")


# --- real OCR (RapidOCR's bundled ONNX models, ~1 s to load and ~0.5-1 s per image on one CPU core) ------------------


def render_text(text: str, size: int = 256) -> torch.Tensor:
    """Black text in Pillow's bundled TrueType font (``load_default(size=)``) on white, ``[3, size, size]``."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((12, size // 2 - 20), text, fill="black", font=ImageFont.load_default(size=36))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.slow
def test_real_ocr_reads_rendered_text():
    reward = rewards.load("ocr", threads=1)
    images = torch.stack([render_text("Hello World"), render_text("Flow GRPO"), torch.ones(3, 256, 256)])
    right = reward.score(images, ['a sign "Hello World"', 'a poster "flow grpo"', 'a wall "Hello"'])
    wrong = reward.score(images[:2], ['a sign "Goodbye Moon"', 'a poster "quantum"'])
    assert right[0] > 0.9 and right[1] > 0.9  # read (almost) exactly
    assert right[2] == 0.0  # a blank image reads nothing
    assert (wrong < 0.5).all(), wrong  # most letters of the wrong target are absent
