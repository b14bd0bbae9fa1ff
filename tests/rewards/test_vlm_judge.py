"""The VLM judge on tiny random Qwen2.5-VL / Qwen2-VL models with an offline processor (docs/rewards.md#vlm-judge)."""

import logging

import pytest
import torch
from qwen_testing import (
    build_qwen_processor,
    build_qwen_tokenizer,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_vl_config,
)
from rewards_testing import smooth_images, to_pil

from rewards.vlm_judge import RATING_PATTERN, VLMJudge, parse_rating, yes_probability


MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64
HEIGHT, WIDTH = 84, 112  # already a multiple of 28 inside the bounds: the processor does not resize it


def _save_tiny(folder, family: str, seed: int):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    tokenizer = build_qwen_tokenizer()
    if family == "qwen2.5-vl":
        config, model_cls, processor_cls = (
            tiny_qwen2_5_vl_config(tokenizer),
            Qwen2_5_VLForConditionalGeneration,
            "Qwen2_5_VLProcessor",
        )
    else:
        config, model_cls, processor_cls = (
            tiny_qwen2_vl_config(tokenizer),
            Qwen2VLForConditionalGeneration,
            "Qwen2VLProcessor",
        )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # sharper next-token distributions, so that P(yes) clearly depends on the input
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(folder)
    build_qwen_processor(tokenizer, MIN_PIXELS, MAX_PIXELS, processor_cls).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen2-vl"])
def judge_dir(request, tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=11)


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("qwen2.5-vl-rating"), "qwen2.5-vl", seed=12)


def _reference_inputs(folder, question: str, image: torch.Tensor):
    """What the processor gives for one image and question (the transformers recipe, no tensor path)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor, processor(text=[chat], images=to_pil(image), return_tensors="pt")


def test_yes_prob_equals_hand_computation(judge_dir):
    from transformers import AutoModelForImageTextToText

    judge = VLMJudge(path=judge_dir).load_weights("cpu")
    image = smooth_images(1, HEIGHT, WIDTH, seed=1)
    prompt = "a dog on a skateboard"
    with torch.no_grad():
        score = judge.score(image, [prompt])
    processor, batch = _reference_inputs(judge_dir, judge.template.replace("{prompt}", prompt), image)
    model = AutoModelForImageTextToText.from_pretrained(judge_dir).eval()
    with torch.no_grad():
        probs = model(**batch).logits[0, -1].softmax(-1)
    ids = processor.tokenizer.convert_tokens_to_ids
    p_yes = probs[ids("Yes")] + probs[ids("yes")]
    p_no = probs[ids("No")] + probs[ids("no")]
    torch.testing.assert_close(score[0], p_yes / (p_yes + p_no), atol=1e-5, rtol=1e-4)


def test_model_inputs_give_the_processor_logits(judge_dir):
    """Our tensor-path inputs (pixels, image tokens, M-RoPE token types) give the logits of the processor's inputs."""
    judge = VLMJudge(path=judge_dir).load_weights("cpu")
    model, processor = judge._bundle
    image = smooth_images(1, HEIGHT, WIDTH, seed=3)
    ours = judge.model_inputs(processor, image, ["a bowl of soup"])
    _, reference = _reference_inputs(judge_dir, judge.questions(["a bowl of soup"])[0], image)
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["mm_token_type_ids"], reference["mm_token_type_ids"])
    with torch.no_grad():
        expected = model(**reference).logits[0, -1]
        torch.testing.assert_close(model(**ours).logits[0, -1], expected, atol=1e-5, rtol=1e-5)
        # without the token types the image gets 1-D positions: the logits move, so the check above can fail
        flat = {key: value for key, value in ours.items() if key != "mm_token_type_ids"}
        flat["position_ids"] = torch.arange(ours["input_ids"].shape[1])[None]
        assert (model(**flat).logits[0, -1] - expected).abs().max() > 1e-4


def test_yes_prob_batched_gradients_and_sensitivity(qwen25_dir):
    judge = VLMJudge(path=qwen25_dir).load_weights("cpu")
    images = smooth_images(2, HEIGHT, WIDTH, seed=2).requires_grad_(True)
    prompts = ["a cat", "a long caption about a lighthouse on a cliff at sunset"]  # different lengths: left padding
    scores = judge.score(images, prompts)
    scores.sum().backward()
    assert bool((images.grad.abs().flatten(1).sum(1) > 0).all())
    with torch.no_grad():
        alone = torch.cat([judge.score(images[i : i + 1], prompts[i : i + 1]) for i in range(2)])
        other_image = judge.score(images.flip(0), prompts)
    torch.testing.assert_close(scores.detach(), alone, atol=1e-5, rtol=1e-4)
    assert bool(((scores.detach() - other_image).abs() > 1e-4).all())
    assert bool(((scores > 0) & (scores < 1)).all())


def test_yes_probability_formula():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 0.0]])
    probs = logits.softmax(-1)
    expected = (probs[:, 0] + probs[:, 2]) / (probs[:, 0] + probs[:, 2] + probs[:, 1])
    torch.testing.assert_close(yes_probability(logits, [0, 2], [1]), expected)
    assert yes_probability(torch.tensor([[1e4, -1e4]]), [0], [1]).item() == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The caption is matched well.\nFinal Score: 4", 4.0),
        ("Final Score:3.5 because ...", 3.5),
        ("**Final Score:** 2", 2.0),
        ("<Thought>fine</Thought>\n<Score>5</Score>", 5.0),
        ("<Score> 1 </Score>", 1.0),
        ("Final Score: 4 ... Final Score: 1", 4.0),  # the first match counts, as re.search in flow_grpo
        ("Final Score: 7", None),  # out of range for max_rating 5
        ("Final Score: -2", None),
        ("I cannot rate this image.", None),
        ("Score: 4", None),
        ("", None),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text, RATING_PATTERN, max_rating=5.0) == expected


def test_parse_rating_custom_pattern_and_scale():
    assert parse_rating("Alignment Score (1-5): 2.5", r"Alignment Score \(1-5\): (\d+(?:\.\d+)?)") == 2.5
    assert parse_rating("Final Score: 7", max_rating=10) == 7.0
    assert parse_rating("rating 8", r"\d+", max_rating=10) == 8.0  # no group: the whole match


def test_rating_mode_with_controlled_generation(qwen25_dir, monkeypatch, caplog):
    judge = VLMJudge(path=qwen25_dir, mode="rating", max_new_tokens=7, unparsed_score=-1.0).load_weights("cpu")
    assert not judge.differentiable
    model, processor = judge._bundle
    answers = ["Looks right.\nFinal Score: 4", "<Score>2</Score>", "I refuse."]
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        tokenizer = processor.tokenizer
        tokens = tokenizer(
            answers[: len(kwargs["input_ids"])], padding=True, padding_side="right", return_tensors="pt"
        )["input_ids"]
        return torch.cat([kwargs["input_ids"], tokens], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    images = smooth_images(3, HEIGHT, WIDTH, seed=4)
    with caplog.at_level(logging.WARNING, logger="rewards.vlm_judge"):
        scores = judge.score(images, ["a", "b", "c"])
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.4, -1.0]))
    assert judge.unparsed == 1 and judge.last_answers == answers
    assert "no rating in [0, 5] in 1 of 3 answers" in caplog.text
    assert seen["max_new_tokens"] == 7 and seen["do_sample"] is False
    assert seen["pixel_values"].shape[0] == 3 * (HEIGHT // 14) * (WIDTH // 14)
    judge.score(images[:1], ["c"])
    assert judge.unparsed == 1  # "Looks right. Final Score: 4" parses; the count only grows on failures


def test_rating_mode_real_generation_matches_processor_inputs(qwen25_dir):
    """Greedy generation from our tensor inputs gives the tokens it gives from the processor's inputs."""
    from transformers import AutoModelForImageTextToText

    judge = VLMJudge(path=qwen25_dir, mode="rating", max_new_tokens=5, max_rating=10).load_weights("cpu")
    image = smooth_images(1, HEIGHT, WIDTH, seed=5)
    scores = judge.score(image, ["a red car"])
    assert scores.shape == (1,) and judge.last_answers and len(judge.last_answers) == 1
    processor, batch = _reference_inputs(qwen25_dir, judge.template.replace("{prompt}", "a red car"), image)
    model = AutoModelForImageTextToText.from_pretrained(qwen25_dir).eval()
    output = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert judge.last_answers == [expected]


def test_bad_options_give_clear_errors(qwen25_dir):
    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        VLMJudge(template="Is this image good?")
    with pytest.raises(ValueError, match="unknown mode"):
        VLMJudge(mode="logprob")
    with pytest.raises(ValueError, match="not a valid regex"):
        VLMJudge(mode="rating", pattern="Final Score: (")
    with pytest.raises(ValueError, match="max_rating must be positive"):
        VLMJudge(mode="rating", max_rating=0)
    judge = VLMJudge(path=qwen25_dir, yes_tokens=("Yes", "Sure")).load_weights("cpu")
    with pytest.raises(ValueError, match="'Sure' must be a single token"):
        judge.score(smooth_images(1, HEIGHT, WIDTH), ["a cat"])


def test_template_braces_and_registration():
    import rewards

    judge = rewards.load("vlm_judge", mode="rating", template='Rate {"json": 1} [{prompt}]', max_rating=10)
    assert isinstance(judge, VLMJudge) and judge.max_rating == 10.0 and not judge.differentiable
    assert judge.questions(["a {b}"]) == ['Rate {"json": 1} [a {b}]']
    assert rewards.load("vlm_judge").differentiable
