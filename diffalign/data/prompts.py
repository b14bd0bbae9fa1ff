"""Prompt lists: inline lists or text files with one prompt per line.

A string is a file when one exists at that path, else literal text, unless it looks like a path (see
:func:`looks_like_path`): then the missing file is an error, so that a mistyped file name never becomes the prompt.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path


# A file suffix at the very end: a dot, a letter, then at most four letters or digits (.txt, .jsonl, .md5); or a
# longer one known to hold prompts.
_SUFFIX = re.compile(r"\.([A-Za-z][A-Za-z0-9]{0,4}|prompts)\Z")
_SEPARATORS = tuple(sep for sep in {"/", os.sep, os.altsep} if sep)


def looks_like_path(value: str) -> bool:
    """Whether text that names no existing file reads as a file path rather than as a prompt.

    It does when it holds a path separator, or when it is a single word ending in a file suffix: ``prompts/x``,
    ``my_prompts.lst`` and ``eval.jsonl`` do; ``a photo of a cat.``, ``Mr. Smith waves`` and ``version 3.5`` do not.
    """
    if any(sep in value for sep in _SEPARATORS):
        return True
    return not any(char.isspace() for char in value) and _SUFFIX.search(value) is not None


def load_prompts(source: str | os.PathLike | Sequence[str], *, literal_hint: str = "['TEXT']") -> list[str]:
    """Prompts from a list, a text file (one per line; blank lines and ``#`` comments skipped) or one literal text.

    Args:
        source: a list of prompts; a path; or a string, read as a file when one exists there, else taken as the
            one prompt unless it looks like a path (:func:`looks_like_path`).
        literal_hint: how the caller passes literal text, named in the error about a missing file.

    Raises:
        FileNotFoundError: the file does not exist (a path, or a string that looks like one).
        ValueError: no prompt at all.
    """
    if isinstance(source, (str, os.PathLike)):
        prompts, where = _text_or_file(source, literal_hint)
    else:
        prompts, where = [str(p) for p in source], "the prompt list"
    if not prompts:
        raise ValueError(f"no prompts in {where}")
    return prompts


def _text_or_file(source: str | os.PathLike, literal_hint: str) -> tuple[list[str], str]:
    """The prompts of a path or a string, and where they come from (for errors)."""
    path = Path(source)
    if _is_file(path):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")], str(path)
    if not isinstance(source, str):
        raise FileNotFoundError(f"prompt file '{path}' does not exist (one prompt per line expected)")
    if looks_like_path(source):
        raise FileNotFoundError(
            f"prompt file '{source}' does not exist; to pass literal text as the prompt use {literal_hint}"
        )
    return [source], "the prompt argument"


def _is_file(path: Path) -> bool:
    """``path.is_file()``, and False for text no file can have as its name (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
