"""Model-backed rewards: weight locations (hub id or local path), lazy loading and the per-process cache.

A model-backed reward is cheap to construct: it records where its weights are and loads them on the first
:meth:`~rewards.base.Reward.score` call (or :meth:`ModelReward.load_weights`). Loaded models are kept in a
process-wide cache keyed by ``(reward class, weight locations and options, device, dtype)``, so two
``rewards.load("pickscore")`` calls, or a reward used both alone and inside a ``WeightedSum``, share one copy.

A location is a local file or folder when it exists on disk, otherwise a hub repository id (``owner/name``); both
go through the same code (``from_pretrained`` for HF folders, :func:`resolve_file` for single checkpoint files).
Nothing here forces a download: with ``HF_HUB_OFFLINE=1`` a hub id resolves only from the local HF cache. A
``revision`` (branch, tag or commit) pins a hub id's files, as ``from_pretrained(..., revision=)`` and
``hf_hub_download(..., revision=)`` do; it is ignored for local paths, which have no revisions.

Integrity (docs/rewards.md#verifying-weights): a reward built with ``verify=True`` hashes its weight files (SHA-256,
streamed) before loading them and refuses a file whose digest differs from the published one, or from the ``sha256``
option the user gave. Where no published digest is known it refuses to guess: ``verify=True`` then needs ``sha256=``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rewards.base import Reward


logger = logging.getLogger(__name__)

_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.Lock()

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` -> float32; a ``torch.dtype`` as is; ``"bf16"``, ``"fp16"``, ``"float32"``... by name."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def is_hub_id(location: str | os.PathLike) -> bool:
    """True when ``location`` does not exist locally and reads as ``owner/name`` (or a bare ``name``)."""
    text = os.fspath(location)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.endswith((".pt", ".pth")):
        return False
    return text.count("/") <= 1 and "\\" not in text


def resolve_file(location: str | os.PathLike, filename: str, what: str, revision: str | None = None) -> Path:
    """Find a single checkpoint file given a file path, a folder holding ``filename``, or a hub repo id.

    Args:
        location: local file, local folder, or hub repository id.
        filename: the file's name inside a folder or a hub repository.
        what: a label for error messages, e.g. ``"HPSv2.1 checkpoint"``.
        revision: the hub revision (branch, tag or commit) of a hub id; ``None`` = the default branch.

    Returns:
        The local path of the file (for a hub id, its copy in the HF cache).

    Raises:
        FileNotFoundError: a local path that does not exist, or a folder without ``filename``.
        OSError: the hub file is neither cached nor downloadable (e.g. offline).
    """
    path = Path(os.fspath(location)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        listing = sorted(p.name for p in path.iterdir())[:20]
        raise FileNotFoundError(f"{what}: no {filename!r} in folder {path} (it holds {listing}).")
    if not is_hub_id(location):
        raise FileNotFoundError(f"{what}: {path} does not exist.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=os.fspath(location), filename=filename, revision=revision))
    except Exception as err:  # the hub raises many types (offline, gated, missing entry); all mean "not available"
        at = f" at revision {revision!r}" if revision is not None else ""
        raise OSError(
            f"{what}: could not get {filename!r} from the hub repository {os.fspath(location)!r}{at} ({err}). "
            f"Download it and pass the local file or folder as path=..."
        ) from err


# The single-file weights of a transformers folder, in from_pretrained's order of preference.
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_weights_file(location: str | os.PathLike, what: str, revision: str | None = None) -> Path:
    """The single weights file of a transformers folder or hub id: ``model.safetensors``, else ``pytorch_model.bin``.

    Raises:
        FileNotFoundError: neither file is there (e.g. a sharded checkpoint, which ``verify`` does not support).
    """
    errors = []
    for filename in WEIGHTS_FILES:
        try:
            return resolve_file(location, filename, what, revision)
        except (FileNotFoundError, OSError) as err:
            errors.append(str(err))
    raise FileNotFoundError(
        f"{what}: no single weights file ({' or '.join(WEIGHTS_FILES)}) in {os.fspath(location)!r}; sharded "
        f"checkpoints cannot be verified, pass verify=False ({'; '.join(errors)})"
    )


class WeightsHashError(ValueError):
    """A weight file's SHA-256 differs from the expected one (corrupt, truncated or another release)."""


class WeightFile(NamedTuple):
    """A file that ``verify=True`` hashes: where it is, its expected SHA-256 (``None``: unknown), and for messages
    what it is and which option sets its digest."""

    path: Path
    expected: str | None
    what: str
    option: str = "sha256"


# (resolved path, size, mtime, expected digest) of files already verified in this process: hashing a 2 GB file
# takes seconds, and a second reward on the same unchanged file need not pay for it again.
_VERIFIED: set[tuple[str, int, int, str]] = set()
_HASH_CHUNK = 8 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (weight files are GBs; memory use stays constant)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def normalize_sha256(value: str, option: str = "sha256") -> str:
    """A digest as 64 lowercase hex characters (an optional ``sha256:`` prefix is dropped).

    Raises:
        ValueError: not a SHA-256 hex digest.
    """
    text = str(value).strip().lower().removeprefix("sha256:")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{option}={value!r} is not a SHA-256 digest (64 hex characters, e.g. from `sha256sum FILE`)")
    return text


def require_known_sha256(expected: str | None, what: str, option: str = "sha256") -> str:
    """The digest ``verify=True`` will compare against; refuse when none is published and none was given.

    Raises:
        ValueError: ``expected`` is ``None``.
    """
    if expected is None:
        raise ValueError(
            f"{what}: verify=True, but no published SHA-256 is known for this file, and a digest is never guessed. "
            f"Pass the one you trust as {option}='<64 hex characters>' (e.g. from the model page or `sha256sum` of "
            "a copy you checked), or verify=False."
        )
    return normalize_sha256(expected, option)


def choose_sha256(
    given: str | None, published: str | None, verify: bool, what: str, option: str = "sha256"
) -> str | None:
    """The digest a reward will check: the user's ``given`` one, else the ``published`` one (``None``: unknown).

    Checked when the reward is built, so that a ``verify=True`` that cannot work fails before any weight is read.

    Raises:
        ValueError: ``given`` without ``verify=True`` (it would be ignored), ``given`` not a digest, or
            ``verify=True`` with no digest at all.
    """
    if given is not None and not verify:
        raise ValueError(f"{what}: {option}= is only checked with verify=True; pass verify=True as well")
    digest = normalize_sha256(given, option) if given is not None else published
    if verify:
        require_known_sha256(digest, what, option)
    return digest


def verify_sha256(path: str | os.PathLike, expected: str | None, what: str, option: str = "sha256") -> None:
    """Hash ``path`` and compare with ``expected``; an unchanged file verified before in this process is skipped.

    Args:
        path: the weight file.
        expected: the SHA-256 it must have; ``None`` (unknown) is refused.
        what: a label for messages, e.g. ``"HPSv2.0 checkpoint"``.
        option: the reward option that sets ``expected``, named in the messages.

    Raises:
        ValueError: ``expected`` is ``None`` or not a digest.
        WeightsHashError: the digests differ.
    """
    expected = require_known_sha256(expected, what, option)
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise WeightsHashError(
            f"{what}: {path} has SHA-256 {actual}, expected {expected}. The file is corrupt, truncated or another "
            f"release: delete it and download it again (for a hub copy, remove it from the HF cache), or, if this "
            f"file is the one you mean to use, pass {option}='{actual}'."
        )
    _VERIFIED.add(key)
    logger.info("%s: SHA-256 verified (%s)", what, path)


def from_pretrained(
    cls: Any, location: str | os.PathLike, what: str, revision: str | None = None, **kwargs: Any
) -> Any:
    """``cls.from_pretrained(location)`` for a local folder or a hub id (at ``revision``, a hub id's branch, tag or
    commit; ignored for a local folder), with an actionable error."""
    if revision is not None and is_hub_id(location):
        kwargs["revision"] = revision
    try:
        return cls.from_pretrained(os.fspath(location), **kwargs)
    except OSError as err:
        raise OSError(
            f"{what}: could not load {cls.__name__} from {os.fspath(location)!r} ({err}). Pass a local folder "
            "holding config.json and the weights (e.g. a `huggingface-cli download` copy) as the location option."
        ) from err


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """Return the process-wide object under ``key``, building it once (thread-safe: rewards may run in a pool)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded reward model (frees their memory once no reward object holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a loaded scorer to ``device``/``dtype``, put it in eval mode and freeze its parameters.

    Frozen parameters keep the scorer out of any optimiser while gradients still flow to the input images.
    """
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class ModelReward(Reward):
    """A reward backed by model weights, loaded lazily and cached per process.

    Subclasses implement :meth:`weights_key` (what identifies the weights and options) and :meth:`build`
    (load them). ``device=None`` means "the device of the first batch scored"; later batches on another device are
    moved to the model and their scores moved back.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: the model's dtype (``torch.bfloat16``, ``"fp16"``, ...); preprocessing and the final formula run in
            float32 and scores are float32 whatever this is (docs/rewards.md#precision).
        verify: hash the files of :meth:`weight_files` before loading and refuse a SHA-256 mismatch
            (docs/rewards.md#verifying-weights).
    """

    differentiable = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        verify: bool = False,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.verify = bool(verify)
        self._bundle: Any = None

    def weights_key(self) -> tuple:
        """Hashable description of the weights (locations, options that change the loaded model)."""
        raise NotImplementedError

    def build(self, device: torch.device, dtype: torch.dtype) -> Any:
        """Load the weights (and tokenizers) onto ``device``/``dtype``; called once per cache key."""
        raise NotImplementedError

    def weight_files(self) -> list[WeightFile]:
        """The files ``verify=True`` hashes, resolved to local paths, with their expected digests."""
        return []

    def verify_weights(self) -> None:
        """Hash every file of :meth:`weight_files` and compare (what ``verify=True`` does before the first load).

        Raises:
            ValueError: a file whose digest is unknown and was not given.
            WeightsHashError: a file whose digest differs.
        """
        for file in self.weight_files():
            verify_sha256(file.path, file.expected, file.what, file.option)

    def load_weights(self, device: torch.device | str | None = None) -> ModelReward:
        """Load the weights now instead of at the first score (``device`` defaults to the reward's, else CPU)."""
        self._ensure_loaded(torch.device(device) if device is not None else self.device or torch.device("cpu"))
        return self

    def _ensure_loaded(self, fallback_device: torch.device) -> Any:
        if self._bundle is None:
            if self.device is None:
                self.device = fallback_device
            if self.verify:
                self.verify_weights()  # before the cache: a model cached unverified must not pass unchecked
            key = (type(self).__module__, type(self).__qualname__, *self.weights_key(), str(self.device), self.dtype)
            self._bundle = cached(key, lambda: self.build(self.device, self.dtype))
        return self._bundle

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        bundle = self._ensure_loaded(images.device)
        return self._score_with(bundle, images.to(self.device), prompts)

    def _score_with(self, bundle: Any, images: Tensor, prompts: list[str] | None) -> Tensor:
        """Score checked images ``[B, 3, H, W]`` (already on the model's device) with the loaded ``bundle``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"
