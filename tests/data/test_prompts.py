"""Prompt lists: a file is read, literal text stays text, and a missing file that looks like a path is an error."""

import os

import pytest

from diffalign.data.prompts import load_prompts, looks_like_path
from diffalign.eval.score import image_prompts


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
