"""Prompt lists: a file is read, literal text stays text, and a missing file that looks like a path is an error;
JSONL files give prompts with their records as metadata."""

import json
import os

import pytest
import torch

from diffalign.data.prompts import PromptRecord, load_prompt_records, load_prompts, looks_like_path
from diffalign.eval.score import image_prompt_records, image_prompts, reward_scores, score_images


@pytest.mark.parametrize(
    "value",
    [
        "my_prompts.lst",
        "prompts.txt",
        "eval.csv",
        "data.json",
        "data.jsonl",
        "pairs.tsv",
        "train.prompts",
        "prompts/x",
        "prompts/missing.txt",
        "a cat/dog",  # any separator makes it a path
        f"folder{os.sep}file",
        "file.md5",  # letters then digits
    ],
)
def test_path_like_values(value):
    assert looks_like_path(value)


@pytest.mark.parametrize(
    "value",
    [
        "a photo of a cat.",
        "Mr. Smith waves",
        "version 3.5",
        "a red circle",
        "x",
        "cat",
        "the end.",
        "a cat.jpg on a table",  # a suffix, but followed by more words
        "photo of file.txt",  # whitespace in the (only) component
        "archive.tar.verylong",  # suffix longer than 5 characters
        "v1.2",  # suffix starting with a digit
        "",
    ],
)
def test_literal_text_values(value):
    assert not looks_like_path(value)


def test_a_file_is_read(tmp_path):
    file = tmp_path / "my_prompts.lst"  # any suffix: an existing file is read
    file.write_text("# a comment\na red circle\n\n  two blue squares  \n")
    assert load_prompts(str(file)) == ["a red circle", "two blue squares"]
    assert load_prompts(file) == ["a red circle", "two blue squares"]


def test_literal_text_and_lists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_prompts("a photo of a cat.") == ["a photo of a cat."]
    assert load_prompts(["prompts/x.txt", "b"]) == ["prompts/x.txt", "b"]  # list items are never files


@pytest.mark.parametrize("value", ["my_prompts.lst", "prompts/missing.txt", "prompts/x"])
def test_a_missing_path_is_an_error(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"prompt file '{value}' does not exist"):
        load_prompts(value)


def test_a_missing_path_object_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing")


def test_no_prompt_at_all(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts([])


def test_a_long_prompt_is_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "a very detailed prompt " * 20  # longer than any file name may be
    assert load_prompts(long) == [long]


def test_score_prompts_follow_the_same_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert image_prompts("a photo of a cat.", 2) == ["a photo of a cat."] * 2
    with pytest.raises(FileNotFoundError, match="prompt file 'my_prompts.lst' does not exist"):
        image_prompts("my_prompts.lst", 2)
    (tmp_path / "my_prompts.lst").write_text("p0\np1\n")
    assert image_prompts("my_prompts.lst", 2) == ["p0", "p1"]


# --- JSONL prompt records --------------------------------------------------------------------------------------------

GENEVAL_LIKE = [  # the shape of flow_grpo's dataset/geneval/{train,test}_metadata.jsonl lines
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


def write_jsonl(path, records, extra_lines=()):
    path.write_text("\n".join([*(json.dumps(r) for r in records), *extra_lines]) + "\n")
    return path


def test_a_jsonl_file_gives_prompts_and_their_records_as_metadata(tmp_path):
    path = write_jsonl(tmp_path / "metadata.jsonl", GENEVAL_LIKE, extra_lines=["", "   "])  # blank lines skipped
    records = load_prompt_records(path)
    assert records == [PromptRecord(r["prompt"], r) for r in GENEVAL_LIKE]
    assert records[0].metadata["include"] == [{"class": "cat", "count": 2}]
    assert load_prompts(str(path)) == ["a photo of two cats", "a photo of a red car"]  # never the raw JSON lines


def test_text_files_and_lists_give_empty_metadata(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# comment\na red circle\n")
    assert load_prompt_records(text) == [PromptRecord("a red circle", {})]
    assert load_prompt_records(["x", "y"]) == [PromptRecord("x"), PromptRecord("y")]
    assert load_prompt_records("a photo of a cat.")[0].metadata == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a cat"', "line 2: not valid JSON"),
        ('["a cat"]', 'line 2: expected a JSON object such as {"prompt": "a photo of a cat"'),
        ('{"text": "a cat"}', "line 2: needs a non-empty string field \"prompt\" (its fields are ['text'])"),
        ('{"prompt": 3}', 'line 2: needs a non-empty string field "prompt" (it is 3)'),
        ('{"prompt": "  "}', "line 2: needs a non-empty string field"),
    ],
)
def test_a_malformed_jsonl_line_names_the_file_and_the_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", GENEVAL_LIKE[:1], extra_lines=[line])
    with pytest.raises(ValueError) as info:
        load_prompt_records(path)
    assert str(info.value).startswith(f"{path}, {message}")


def test_an_empty_jsonl_file_has_no_prompts(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompt_records(tmp_path / "empty.jsonl")


def test_scoring_image_files_passes_each_images_record_to_a_metadata_reward(tmp_path):
    from PIL import Image

    import rewards

    for i, level in enumerate((0, 255)):
        Image.new("RGB", (8, 8), (level, level, level)).save(tmp_path / f"{i}.png")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", GENEVAL_LIKE)
    seen = []

    def by_count(images, prompts, metadata):
        seen.extend(zip(prompts, metadata))
        return [float(m["include"][0]["count"]) for m in metadata]

    assert [r.prompt for r in image_prompt_records(prompts, 2)] == ["a photo of two cats", "a photo of a red car"]
    report = score_images(tmp_path, prompts, {"count": rewards.load(by_count), "mean": rewards.load(_mean)})
    assert [r["scores"]["count"] for r in report.records] == [2.0, 1.0]
    assert [r["scores"]["mean"] for r in report.records] == [0.0, 1.0]  # a reward without metadata, as before
    assert seen == [(r["prompt"], r) for r in GENEVAL_LIKE]
    scores = reward_scores({"mean": rewards.load(_mean)}, torch.zeros(1, 3, 4, 4), ["x"], [{"unused": 1}])
    assert scores["mean"].tolist() == [0.0]


def _mean(images, prompts):
    return images.mean(dim=(1, 2, 3))
