"""Prompt lists: inline lists, text files with one prompt per line, or JSONL files of prompt records.

A string is a file when one exists at that path, else literal text, unless it looks like a path (see
:func:`looks_like_path`): then the missing file is an error, so that a mistyped file name never becomes the prompt.

A ``.jsonl`` file holds one JSON object per line with a ``"prompt"`` field, as flow_grpo's GenEval prompt files
(``evaluation_metadata.jsonl``) do; the whole object is that prompt's metadata, which rewards that take metadata
receive beside the images (flow_grpo's ``GenevalPromptDataset`` passes the same dict; docs/rewards.md#per-prompt-
metadata). Prompts from a list or a text file have empty metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


# A file suffix at the very end: a dot, a letter, then at most four letters or digits (.txt, .jsonl, .md5); or a
# longer one known to hold prompts.
_SUFFIX = re.compile(r"\.([A-Za-z][A-Za-z0-9]{0,4}|prompts)\Z")
_SEPARATORS = tuple(sep for sep in {"/", os.sep, os.altsep} if sep)
JSONL_SUFFIXES = (".jsonl",)
"""File suffixes read as JSON Lines prompt records (anything else is read as one prompt per line)."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt and its metadata.

    Attributes:
        prompt: the text.
        metadata: the JSONL record the prompt came from (its ``"prompt"`` field included, as flow_grpo passes it),
            or ``{}`` for a prompt from a list or a text file.
    """

    prompt: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def looks_like_path(value: str) -> bool:
    """Whether text that names no existing file reads as a file path rather than as a prompt.

    It does when it holds a path separator, or when it is a single word ending in a file suffix: ``prompts/x``,
    ``my_prompts.lst`` and ``eval.jsonl`` do; ``a photo of a cat.``, ``Mr. Smith waves`` and ``version 3.5`` do not.
    """
    if any(sep in value for sep in _SEPARATORS):
        return True
    return not any(char.isspace() for char in value) and _SUFFIX.search(value) is not None


def load_prompts(source: str | os.PathLike | Sequence[str], *, literal_hint: str = "['TEXT']") -> list[str]:
    """Prompts from a list, a text file (one per line; blank lines and ``#`` comments skipped), a JSONL file (the
    ``"prompt"`` of each record, see :func:`load_prompt_records`) or one literal text.

    Args:
        source: a list of prompts; a path; or a string, read as a file when one exists there, else taken as the
            one prompt unless it looks like a path (:func:`looks_like_path`).
        literal_hint: how the caller passes literal text, named in the error about a missing file.

    Raises:
        FileNotFoundError: the file does not exist (a path, or a string that looks like one).
        ValueError: no prompt at all, or a malformed JSONL line (naming the file and the line).
    """
    return [record.prompt for record in load_prompt_records(source, literal_hint=literal_hint)]


def load_prompts_and_metadata(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """:func:`load_prompt_records` as two aligned lists, ``(prompts, metadata)``, the form trainers keep them in."""
    records = load_prompt_records(source)
    return [record.prompt for record in records], [record.metadata for record in records]


def load_prompt_records(
    source: str | os.PathLike | Sequence[str], *, literal_hint: str = "['TEXT']"
) -> list[PromptRecord]:
    """Prompts with their metadata, from anything :func:`load_prompts` reads.

    A ``.jsonl`` file gives one record per non-blank line, each a JSON object with a string ``"prompt"``, e.g.
    ``{"prompt": "a photo of two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]}``; its
    metadata is the whole object. A list, a text file or a literal text gives empty metadata.

    Raises:
        FileNotFoundError: the file does not exist (a path, or a string that looks like one).
        ValueError: no prompt at all, or a JSONL line that is not a JSON object with a string ``"prompt"``
            (the message names the file and the line number).
    """
    if isinstance(source, (str, os.PathLike)):
        records, where = _text_or_file(source, literal_hint)
    else:
        records, where = [PromptRecord(str(p)) for p in source], "the prompt list"
    if not records:
        raise ValueError(f"no prompts in {where}")
    return records


def _text_or_file(source: str | os.PathLike, literal_hint: str) -> tuple[list[PromptRecord], str]:
    """The prompt records of a path or a string, and where they come from (for errors)."""
    path = Path(source)
    if _is_file(path):
        if path.suffix.lower() in JSONL_SUFFIXES:
            return _jsonl_records(path), str(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return [PromptRecord(p) for p in prompts], str(path)
    if not isinstance(source, str):
        raise FileNotFoundError(f"prompt file '{path}' does not exist (one prompt per line expected)")
    if looks_like_path(source):
        raise FileNotFoundError(
            f"prompt file '{source}' does not exist; to pass literal text as the prompt use {literal_hint}"
        )
    return [PromptRecord(source)], "the prompt argument"


def _jsonl_records(path: Path) -> list[PromptRecord]:
    """One :class:`PromptRecord` per non-blank line of a JSON Lines file."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            records.append(_jsonl_record(line, f"{path}, line {number}"))
    return records


def _jsonl_record(line: str, where: str) -> PromptRecord:
    example = '{"prompt": "a photo of a cat", "tag": "single_object"}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where}: not valid JSON ({err.msg}); each line must be one JSON object, e.g. {example}"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object such as {example}, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        found = f"its fields are {sorted(record)}" if "prompt" not in record else f"it is {prompt!r}"
        raise ValueError(f'{where}: needs a non-empty string field "prompt" ({found})')
    return PromptRecord(prompt.strip(), record)


def _is_file(path: Path) -> bool:
    """``path.is_file()``, and False for text no file can have as its name (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
