"""Pairwise preference data for Diffusion-DPO, in the Pick-a-Pic v2 layout.

A pair is a caption, two images and ``label_0``: 1 means image 0 is preferred, 0 means image 1, 0.5 is a tie
(any value above/below 0.5 picks image 0/1). ``label_1`` is optional; when present it must equal ``1 - label_0``.

Formats read by :func:`load_preference_dataset` (detected from ``source``; :func:`parquet_files` tells parquet apart):

- **Parquet**: a ``.parquet`` file, or a folder whose top level holds parquet shards (read in name order).
  Columns: ``caption``, ``label_0`` (+ optional ``label_1``), and per side k in {0, 1} either ``jpg_k`` (encoded
  image bytes, as in ``yuvalkirstain/pickapic_v2``) or ``image_k`` (a path relative to the parquet file's folder,
  encoded bytes, or a ``datasets`` Image struct ``{"bytes", "path"}``). :func:`stream_preference_dataset` (what the
  DPO trainer uses) streams it row group by row group, memory flat in the data-set size, each process reading its
  own share (:class:`StreamingPreferenceDataset`); :func:`load_preference_dataset` holds the table in memory as
  Arrow buffers (images stay encoded), for small sets.
- **JSON lines**: a ``.jsonl`` file, or a folder with ``data.jsonl``. One object per line with keys ``caption``,
  ``image_0``, ``image_1`` (paths relative to the jsonl's folder, or absolute), ``label_0`` (+ optional ``label_1``).
- **datasets**: a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``; pick ``split``), with
  the parquet column names. Needs the optional extra ``diffalign[data]``.

Every format may also carry ``caption_1``, the caption image 1 is judged under (default: ``caption``, which then
belongs to image 0). A text preference pair (docs/methods/dpo.md#text-preference-pairs) has the same image on both
sides, ``caption`` the preferred caption and ``caption_1`` the rejected one.

Transform (as the diffusers SDXL Diffusion-DPO script, docs/methods/dpo.md#data): image 1 is brought to image 0's
size, both are resized (bilinear) so the shorter side is ``resolution``, flipped together, then cropped together
(center or random). ``original_size`` is image 0's ``(H, W)`` before resizing and ``crop_top_left`` is the
``(top, left)`` of the crop in the resized, possibly flipped image: exactly SDXL's micro-conditioning for both images
of the pair.
Pixels are returned in [0, 1]; adapters normalise.

Bad data is skipped, up to a limit. Rows are dropped at load time, with counts in :meth:`PreferenceDataset.stats`
and a warning per bad jsonl record, for ties (unless ``keep_ties``), invalid labels, bad jsonl records and missing
images (null/empty values, paths that do not exist). Ties are ordinary filtering; the other three are bad rows, and
when their share of the rows read exceeds ``max_bad_fraction`` (default 0.1) loading fails with a
:class:`PreferenceDataError` naming the first bad rows. Images are decoded lazily; a pair whose image fails to decode
(corrupt, truncated) makes ``__getitem__`` return an :class:`UnreadablePair` (row and description), is logged once,
and :func:`collate_preference_batch` drops it and reports ``num_skipped`` and the descriptions (``skipped``) per
batch: counters inside DataLoader workers do not reach the main process, so the trainer sums these and applies the
same limit to them (:mod:`diffalign.trainers.diffusion_dpo`).

Randomness (crop, flip, caption dropout) comes from a generator seeded by ``(seed, epoch, row)``, so the stream is
reproducible on resume regardless of the order the sampler visits rows. Call :meth:`PreferenceDataset.set_epoch`
before creating each epoch's iterator (with ``persistent_workers=True`` the workers keep the old epoch).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.seeding import derive_seed


logger = logging.getLogger(__name__)

JSONL_NAME = "data.jsonl"
PARQUET_NAME = "data.parquet"
IMAGE_DIR = "images"
REQUIRED_KEYS = ("caption", "label_0")
# Per side, the accepted image column/key names in order of preference.
IMAGE_KEYS = (("jpg_0", "image_0"), ("jpg_1", "image_1"))
EXPECTED_LAYOUT = (
    "expected the Pick-a-Pic layout: 'caption' (str), 'label_0' (1 = image 0 preferred, 0 = image 1, 0.5 = tie), "
    "optional 'label_1', and the images as 'jpg_0'/'jpg_1' (encoded bytes) or 'image_0'/'image_1' (paths relative "
    "to the data file's folder, or bytes)"
)
# What PIL raises on unreadable image data; UnidentifiedImageError and truncated files are OSErrors.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
MAX_NAMED = 5
"""How many bad records an error message names."""
_NOTE_CHARS = 300  # a decode error's message is cut to this length in a description


class PreferenceDataError(ValueError):
    """Too much of the preference data is unusable; the message names the first bad records and the fix."""


class UnreadablePair(NamedTuple):
    """``dataset[i]`` for a pair whose image fails to decode.

    ``row`` is the row in the source data; ``note`` names the source, the row (and jsonl line), the image and the
    decode error, e.g. ``"data.jsonl line 3 (row 2), image_1 'images/000002_1.png': UnidentifiedImageError: ..."``.
    """

    row: int
    note: str


class PreferenceRecord(NamedTuple):
    """One pair for :func:`write_preference_dataset`; plain 4-tuples in this order work too.

    ``label_0`` follows Pick-a-Pic: 1.0 if ``image_0`` is preferred, 0.0 if ``image_1`` is, 0.5 for a tie.
    Images are PIL images or tensors ``[3, H, W]`` (float in [0, 1], or uint8).
    """

    caption: str
    image_0: Any
    image_1: Any
    label_0: float
    caption_1: str | None = None
    """The caption image 1 is judged under, when it is not ``caption`` (a text preference pair); jsonl only."""


# --------------------------------------------------------------------------------------------------- reading


@dataclass
class _PairTable:
    """Rows as read from disk, before filtering. ``images(i)`` returns the two raw image values of row ``i``."""

    origin: str
    root: Path
    captions: list[str]
    labels_0: list[Any]
    labels_1: list[Any] | None
    images: Callable[[int], tuple[Any, Any]]
    missing_images: list[bool]
    captions_1: list[str | None] | None = None
    """Each row's ``caption_1`` (``None``: the row's caption); ``None`` when the source has no such column."""
    num_bad_records: int = 0
    missing_keys: Counter = field(default_factory=Counter)
    line_numbers: list[int] | None = None
    """The file line of each row (jsonl), to name rows as an editor shows them."""
    bad_record_notes: list[tuple[int, str]] = field(default_factory=list)
    """The first :data:`MAX_NAMED` records dropped while reading, as ``(line, description)``."""

    @property
    def num_read(self) -> int:
        """Rows read, including the records dropped while reading (bad jsonl lines)."""
        return len(self.captions) + self.num_bad_records

    def position(self, row: int) -> int:
        """Where ``row`` is in the file (its line for jsonl), for ordering descriptions."""
        return self.line_numbers[row] if self.line_numbers is not None else row

    def where(self, row: int) -> str:
        """``"line 7 (row 6)"`` (jsonl) or ``"row 6"``."""
        return f"line {self.line_numbers[row]} (row {row})" if self.line_numbers is not None else f"row {row}"


class _ArrowImages:
    """Row access to two image columns of an Arrow table (a class, not a lambda, so DataLoader workers pickle it)."""

    def __init__(self, table: pa.Table, names: tuple[str, str]) -> None:
        self.columns = (table.column(names[0]), table.column(names[1]))

    def __call__(self, row: int) -> tuple[Any, Any]:
        return self.columns[0][row].as_py(), self.columns[1][row].as_py()


def _pick_image_columns(names: Sequence[str], origin: str) -> tuple[str, str]:
    """The image column of each side, or a ValueError naming every missing column."""
    chosen = [next((name for name in side if name in names), None) for side in IMAGE_KEYS]
    missing = [f"'{side[0]}' or '{side[1]}'" for side, name in zip(IMAGE_KEYS, chosen) if name is None]
    missing += [f"'{key}'" for key in REQUIRED_KEYS if key not in names]
    if missing:
        raise ValueError(f"{origin} lacks column(s) {', '.join(missing)}; found {sorted(names)}; {EXPECTED_LAYOUT}.")
    return chosen[0], chosen[1]


def _missing_mask(column: pa.ChunkedArray, root: Path) -> list[bool]:
    """Which rows of an image column hold no image: null, empty bytes, or a path to no file."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return [not value or not _resolve(value, root).is_file() for value in column.to_pylist()]
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return pc.fill_null(pc.equal(pc.binary_length(column), 0), True).to_pylist()
    return column.is_null().to_pylist()


def _arrow_table(table: pa.Table, origin: str, root: Path) -> _PairTable:
    """A :class:`_PairTable` over an Arrow table (parquet, or a ``datasets`` dataset)."""
    image_names = _pick_image_columns(table.column_names, origin)
    missing = [a or b for a, b in zip(*(_missing_mask(table.column(name), root) for name in image_names))]
    return _PairTable(
        origin=origin,
        root=root,
        captions=table.column("caption").to_pylist(),
        labels_0=table.column("label_0").to_pylist(),
        labels_1=table.column("label_1").to_pylist() if "label_1" in table.column_names else None,
        images=_ArrowImages(table, image_names),
        missing_images=missing,
        captions_1=table.column("caption_1").to_pylist() if "caption_1" in table.column_names else None,
    )


def _read_parquet(files: list[Path], origin: str) -> _PairTable:
    """Read parquet file(s); image columns stay encoded in Arrow buffers."""
    schema_names = pq.read_schema(files[0]).names
    image_names = _pick_image_columns(schema_names, origin)
    optional = [name for name in ("label_1", "caption_1") if name in schema_names]
    wanted = [*REQUIRED_KEYS, *optional, *image_names]
    table = pa.concat_tables(pq.read_table(path, columns=wanted) for path in files)
    return _arrow_table(table, origin, files[0].parent)


def _read_jsonl(path: Path) -> _PairTable:
    """Read a jsonl file; malformed lines and records without the needed keys are counted, not fatal."""
    captions, captions_1, labels_0, labels_1, paths, missing, lines = [], [], [], [], [], [], []
    num_bad, missing_keys, notes = 0, Counter(), []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                logger.warning("%s line %d is not valid JSON (%s); skipped.", path, line_number, error)
                num_bad += 1
                notes.append((line_number, f"line {line_number}: not valid JSON ({error})"))
                continue
            keys = record if isinstance(record, dict) else {}
            absent = [key for key in (*REQUIRED_KEYS, "image_0", "image_1") if key not in keys]
            if absent:
                missing_keys.update(absent)
                num_bad += 1
                notes.append((line_number, f"line {line_number}: lacks {', '.join(map(repr, absent))}"))
                continue
            pair = (record["image_0"], record["image_1"])
            captions.append(str(record["caption"] or ""))
            captions_1.append(None if record.get("caption_1") is None else str(record["caption_1"]))
            labels_0.append(record["label_0"])
            labels_1.append(record.get("label_1"))
            paths.append(pair)
            missing.append(any(_is_missing(p, path.parent) for p in pair))
            lines.append(line_number)
    return _PairTable(
        origin=str(path),
        root=path.parent,
        captions=captions,
        labels_0=labels_0,
        labels_1=labels_1,
        images=paths.__getitem__,  # a bound list method pickles, so DataLoader workers can use it
        missing_images=missing,
        captions_1=captions_1 if any(c is not None for c in captions_1) else None,
        num_bad_records=num_bad,
        missing_keys=missing_keys,
        line_numbers=lines,
        bad_record_notes=notes[:MAX_NAMED],
    )


def _read_saved_dataset(path: Path, split: str) -> _PairTable:
    """Read a folder written by ``datasets`` ``save_to_disk``; images stay encoded in the memory-mapped Arrow file."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"{path} is a folder written by datasets' save_to_disk; reading it needs the `datasets` package: "
            "pip install 'diffalign[data]'"
        ) from error
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} has splits {sorted(dataset)}, not {split!r}; pass split=...")
        dataset = dataset[split]
    # The whole table as Arrow: a zero-copy view of the memory-mapped files, images still encoded.
    return _arrow_table(dataset.with_format("arrow")[:], str(path), path)


def parquet_files(source: str | Path) -> list[Path] | None:
    """The parquet file(s) of ``source``, a ``.parquet`` file or a folder of parquet shards (in name order); ``None``
    when ``source`` holds another format (jsonl, a ``datasets`` folder) or does not exist."""
    source = Path(source)
    if source.is_file():
        return [source] if source.suffix == ".parquet" else None
    if not source.is_dir() or (source / JSONL_NAME).is_file() or _is_saved_dataset(source):
        return None
    return sorted(source.glob("*.parquet")) or None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _parquet_origin(source: Path, files: list[Path]) -> str:
    """How messages name a parquet source: the file, or the folder and its shard count."""
    return str(source) if source.is_file() else f"{source} ({len(files)} parquet file(s))"


def _read_any(source: Path, split: str) -> _PairTable:
    """Detect the format of ``source`` (see the module docstring) and read it."""
    if not source.exists():
        raise FileNotFoundError(f"Preference dataset not found: {source}")
    files = parquet_files(source)
    if files:
        return _read_parquet(files, _parquet_origin(source, files))
    if source.is_file():
        if source.suffix == ".jsonl":
            return _read_jsonl(source)
        raise ValueError(f"{source}: unknown preference data file; expected a .parquet or .jsonl file.")
    if (source / JSONL_NAME).is_file():
        return _read_jsonl(source / JSONL_NAME)
    if _is_saved_dataset(source):
        return _read_saved_dataset(source, split)
    raise ValueError(
        f"{source}: no preference data found; expected parquet shards, a {JSONL_NAME}, or a folder written by "
        "datasets' save_to_disk."
    )


def _resolve(path: str, root: Path) -> Path:
    """A path from a data file, relative to that file's folder unless absolute."""
    return Path(path) if os.path.isabs(path) else root / path


def _is_missing(value: Any, root: Path) -> bool:
    """Whether an image value holds no image: null, empty, or a path to no file (a struct: its bytes or path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return not value or not _resolve(value, root).is_file()
    return not isinstance(value, (bytes, bytearray)) or not value


def _value_name(value: Any) -> str:
    """An image value for a message: its path quoted, or its size when it is encoded bytes."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("bytes")
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (bytes, bytearray)):
        return f"({len(value)} bytes)"
    return f"({'null' if value is None else type(value).__name__})"


def _error_text(error: BaseException) -> str:
    """``"Type: message"``, without the memory address PIL puts in messages about in-memory files, and cut short."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the bytes", str(error))
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= _NOTE_CHARS else text[: _NOTE_CHARS - 3] + "..."


def _label_0(raw_0: Any, raw_1: Any) -> float | None:
    """``label_0`` as a float in [0, 1], or None if missing, out of range, or inconsistent with ``label_1``."""
    try:
        label = float(raw_0)
    except (TypeError, ValueError):
        return None
    if not 0.0 <= label <= 1.0:  # also rejects NaN
        return None
    if raw_1 is not None:
        try:
            if not math.isclose(label + float(raw_1), 1.0, abs_tol=1e-6):
                return None
        except (TypeError, ValueError):
            return None
    return label


# --------------------------------------------------------------------------------------------------- dataset


class PreferenceDataset(Dataset):
    """Preference pairs, preferred image first. Build with :func:`load_preference_dataset`.

    ``dataset[i]`` is an :class:`UnreadablePair` when an image of the pair cannot be decoded (see the module
    docstring), else a dict:

    - ``pixel_values_w``, ``pixel_values_l``: float32 ``[3, R, R]`` in [0, 1], the preferred and the other image
      (for a kept tie, image 0 and image 1);
    - ``caption``: str, ``""`` with probability ``empty_caption_prob``;
    - ``original_size``: ``(H, W)`` of image 0 before resizing; ``crop_top_left``: ``(top, left)`` of the crop;
    - ``is_tie``: bool; ``index``: the row in the source data.
    """

    def __init__(
        self,
        table: _PairTable,
        *,
        resolution: int,
        random_crop: bool = False,
        random_flip: bool = False,
        keep_ties: bool = False,
        empty_caption_prob: float = 0.0,
        seed: int = 0,
        max_bad_fraction: float = 0.1,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not 0.0 <= empty_caption_prob <= 1.0:
            raise ValueError(f"empty_caption_prob must be in [0, 1], got {empty_caption_prob}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.table = table
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.keep_ties, self.empty_caption_prob, self.seed = keep_ties, empty_caption_prob, seed
        self.max_bad_fraction = max_bad_fraction
        self.epoch = 0
        self._broken_rows: dict[int, str] = {}
        self._row_notes: list[tuple[int, str]] = []
        self.rows, self.labels, self._load_counts = self._filter_rows()
        self._log_load_summary()
        self._check_bad_share()

    def _filter_rows(self) -> tuple[list[int], list[float], dict[str, int]]:
        """Usable rows and their ``label_0``; counts of what was dropped, and why."""
        table, rows, labels = self.table, [], []
        counts = Counter(invalid_labels=0, ties_dropped=0, ties_kept=0, missing_images=0)
        labels_1 = table.labels_1 or [None] * len(table.captions)
        for row, (raw_0, raw_1) in enumerate(zip(table.labels_0, labels_1)):
            label = _label_0(raw_0, raw_1)
            if label is None:
                counts["invalid_labels"] += 1
                self._note_bad_row(row, "invalid_labels")
            elif label == 0.5 and not self.keep_ties:
                counts["ties_dropped"] += 1
            elif table.missing_images[row]:
                counts["missing_images"] += 1
                self._note_bad_row(row, "missing_images")
            else:
                counts["ties_kept"] += label == 0.5
                rows.append(row)
                labels.append(label)
        if not rows:
            raise PreferenceDataError(
                f"No usable preference pair in {table.origin}: {self._describe(counts)}.{self._first_bad_rows()}"
            )
        return rows, labels, dict(counts)

    def _note_bad_row(self, row: int, cause: Literal["invalid_labels", "missing_images"]) -> None:
        """Describe a row dropped at load time (only the first :data:`MAX_NAMED` are kept)."""
        if len(self._row_notes) >= MAX_NAMED:
            return
        if cause == "invalid_labels":
            labels_1 = self.table.labels_1[row] if self.table.labels_1 is not None else None
            why = f"invalid label_0={self.table.labels_0[row]!r}, label_1={labels_1!r}"
        else:
            why = "missing image " + self._missing_names(row)
        self._row_notes.append((self.table.position(row), f"{self.table.where(row)}: {why}"))

    def _missing_names(self, row: int) -> str:
        """The image value(s) of ``row`` that hold no image, e.g. ``'images/7_1.png'`` or ``image_0 (null)``."""
        values = self.table.images(row)
        missing = [(side, value) for side, value in enumerate(values) if _is_missing(value, self.table.root)]
        names = [
            _value_name(v) if isinstance(v, str) and v else f"image_{side} {_value_name(v)}" for side, v in missing
        ]
        return ", ".join(names) or "(image column empty)"

    def _first_bad_rows(self) -> str:
        """``" First bad rows of <origin>: ..."`` for an error message (in file order), or ``""`` if none."""
        notes = sorted(self.table.bad_record_notes + self._row_notes)[:MAX_NAMED]
        if not notes:
            return ""
        return f" First bad rows of {self.table.origin}: " + "; ".join(note for _, note in notes) + "."

    def _check_bad_share(self) -> None:
        """Raise when the rows dropped as bad (not ties) are more than ``max_bad_fraction`` of the rows read."""
        counts = self._load_counts
        num_bad = self.table.num_bad_records + counts["invalid_labels"] + counts["missing_images"]
        num_read = self.table.num_read
        if num_bad / num_read <= self.max_bad_fraction:
            return
        raise PreferenceDataError(
            f"{num_bad} of the {num_read} rows read from {self.table.origin} ({num_bad / num_read:.0%}) are bad "
            f"(unreadable records, invalid labels or missing images), more than the allowed share, "
            f"data.max_bad_fraction = {self.max_bad_fraction}.{self._first_bad_rows()} Counts: "
            f"{self._describe(counts)}. Repair or remove the bad rows, or raise data.max_bad_fraction "
            "(max_bad_fraction=... in Python) to train on the usable ones."
        )

    def _describe(self, counts: Counter | dict) -> str:
        """A human summary of the load-time counts, with hints for the common causes."""
        parts = [f"{self.table.num_read} row(s) read", f"{self.table.num_bad_records} bad record(s)"]
        parts.append(f"{counts['invalid_labels']} with an invalid label_0/label_1")
        parts.append(
            f"{counts['ties_dropped']} tie(s) dropped" + ("" if self.keep_ties else " (keep_ties=True keeps them)")
        )
        parts.append(
            f"{counts['missing_images']} with a missing image (null/empty, or no such file under {self.table.root})"
        )
        if self.table.missing_keys:
            keys = ", ".join(f"'{key}' ({n})" for key, n in sorted(self.table.missing_keys.items()))
            parts.append(f"records lacking keys: {keys}; {EXPECTED_LAYOUT}")
        return "; ".join(parts)

    def _log_load_summary(self) -> None:
        # Dropping ties is the normal Pick-a-Pic case; anything else dropped is a data problem worth a warning.
        problems = (
            self.table.num_bad_records + self._load_counts["invalid_labels"] + self._load_counts["missing_images"]
        )
        log = logger.warning if problems else logger.info
        log("%s: %d usable pair(s); %s.", self.table.origin, len(self.rows), self._describe(self._load_counts))

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's crops, flips and caption dropout (deterministic per ``(seed, epoch, row)``)."""
        self.epoch = int(epoch)

    def stats(self) -> dict[str, int]:
        """Counts for logging: usable pairs, rows dropped at load time by cause, pairs skipped at decode time.

        ``broken_images`` counts distinct pairs that failed to decode in *this* process; with DataLoader workers
        sum the per-batch ``num_skipped`` of :func:`collate_preference_batch` instead. Rows read = ``num_rows +
        bad_records``; ``max_bad_fraction`` applies to ``(bad_records + invalid_labels + missing_images) / rows
        read``.
        """
        return {
            "num_pairs": len(self.rows),
            "num_rows": len(self.table.captions),
            "bad_records": self.table.num_bad_records,
            **self._load_counts,
            "broken_images": len(self._broken_rows),
        }

    def _decode(self, row: int) -> list[Image.Image] | UnreadablePair:
        """Both images of ``row`` as RGB, or an :class:`UnreadablePair` naming the first that fails to decode."""
        if row in self._broken_rows:
            return UnreadablePair(row, self._broken_rows[row])
        images = _decode_pair(self.table.images(row), self.table.root, f"{self.table.origin} {self.table.where(row)}")
        if isinstance(images, str):
            self._broken_rows[row] = images
            logger.warning("unreadable image, pair skipped: %s", images)
            return UnreadablePair(row, images)
        return images

    def __getitem__(self, index: int) -> dict[str, Any] | UnreadablePair:
        row, label = self.rows[index], self.labels[index]
        images = self._decode(row)
        if isinstance(images, UnreadablePair):
            return images
        transform = _PairTransform(
            self.resolution, self.random_crop, self.random_flip, self.empty_caption_prob, self.seed
        )
        caption_1 = self.table.captions_1[row] if self.table.captions_1 is not None else None
        return transform(
            images, row=row, label=label, caption=self.table.captions[row], epoch=self.epoch, caption_1=caption_1
        )


@dataclass(frozen=True)
class _PairTransform:
    """Geometry and per-pair randomness shared by both datasets. Crop, flip and caption dropout are drawn from
    ``(seed, epoch, row)``, ``row`` being the pair's index in the data set, so an item is the same whichever
    process, worker or order makes it."""

    resolution: int
    random_crop: bool
    random_flip: bool
    empty_caption_prob: float
    seed: int

    def __call__(
        self,
        images: Sequence[Image.Image],
        *,
        row: int,
        label: float,
        caption: str,
        epoch: int,
        caption_1: str | None = None,
    ) -> dict[str, Any]:
        """The dataset item of a decoded pair (see :class:`PreferenceDataset`); ``label`` is ``label_0``;
        ``caption_1`` is image 1's caption when it has its own (a text preference pair)."""
        # One draw per decision, in a fixed order, so that switching one option off leaves the others unchanged.
        draws = np.random.default_rng((self.seed, epoch, row)).random(4)
        pixels, original_size, crop_top_left = _transform_pair(
            images,
            self.resolution,
            random_crop=self.random_crop,
            flip=self.random_flip and draws[0] < 0.5,
            crop_draws=(draws[1], draws[2]),
        )
        captions = (caption, caption if caption_1 is None else caption_1)
        if label < 0.5:  # image 1 preferred: put it first, as the reference flips the tuple
            pixels, captions = pixels[::-1], captions[::-1]
        dropped = draws[3] < self.empty_caption_prob  # both captions or neither: "" against a caption means nothing
        return {
            "pixel_values_w": pixels[0],
            "pixel_values_l": pixels[1],
            "caption": "" if dropped else captions[0],
            "caption_l": "" if dropped else captions[1],
            "judged_captions": captions,  # kept through the dropout: what a reward scores the pair under
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "is_tie": label == 0.5,
            "index": row,
        }


def _decode_pair(values: Sequence[Any], root: Path, where: str) -> list[Image.Image] | str:
    """Both image values decoded as RGB, or the description of the first that fails:
    ``"<where>, image_<k> <value>: <error>"`` (a missing value fails too: null, empty bytes, no such file)."""
    images = []
    for side, value in enumerate(values):
        try:
            images.append(_open_image(value, root))
        except _DECODE_ERRORS as error:
            return f"{where}, image_{side} {_value_name(value)}: {_error_text(error)}"
    return images


def _open_image(value: Any, root: Path) -> Image.Image:
    """Decode one image value (bytes, a path, or a ``{"bytes", "path"}`` struct) fully, as RGB."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(_resolve(value, root))
    else:
        raise ValueError(f"no image in value of type {type(value).__name__}")
    image.load()  # decode now: truncated or corrupt data must fail here, inside the skip, not later
    return ImageOps.exif_transpose(image).convert("RGB")


def _transform_pair(
    images: Sequence[Image.Image], resolution: int, *, random_crop: bool, flip: bool, crop_draws: tuple[float, float]
) -> tuple[list[Tensor], tuple[int, int], tuple[int, int]]:
    """Resize, flip and crop both images identically.

    Args:
        images: image 0 and image 1 (any sizes; image 1 is brought to image 0's size, as the reference does).
        resolution: output side R; the shorter side is resized to R (bilinear), the longer one scaled alike.
        random_crop: random crop position from ``crop_draws`` (uniform in [0, 1)), else center crop.
        flip: mirror both images horizontally (before the crop, so the crop is in the frame the model sees).
        crop_draws: two uniforms for the crop's top and left.

    Returns:
        The two images as float32 ``[3, R, R]`` in [0, 1], image 0's ``(H, W)`` before resizing, and the crop's
        ``(top, left)`` in the resized image.
    """
    width, height = images[0].size
    # The shorter side maps to exactly R; int() on the longer one as torchvision's Resize does.
    if width <= height:
        new_w, new_h = resolution, int(height * resolution / width)
    else:
        new_w, new_h = int(width * resolution / height), resolution
    resized = [
        image if image.size == (new_w, new_h) else image.resize((new_w, new_h), Image.BILINEAR) for image in images
    ]
    if flip:
        resized = [image.transpose(Image.FLIP_LEFT_RIGHT) for image in resized]
    if random_crop:
        top, left = int(crop_draws[0] * (new_h - resolution + 1)), int(crop_draws[1] * (new_w - resolution + 1))
    else:
        top, left = round((new_h - resolution) / 2), round((new_w - resolution) / 2)
    box = (left, top, left + resolution, top + resolution)
    pixels = [TF.pil_to_tensor(image.crop(box)).float().div_(255.0) for image in resized]
    return pixels, (height, width), (top, left)


def collate_preference_batch(items: Sequence[dict[str, Any] | UnreadablePair | None]) -> dict[str, Any]:
    """Stack dataset items into a batch, dropping the pairs whose images failed to decode (:class:`UnreadablePair`;
    ``None`` is dropped too).

    Returns:
        ``pixel_values_w``, ``pixel_values_l``: float32 ``[B, 3, R, R]``; ``captions``: list of B str (``""`` where
        the caption was dropped), ``captions_l`` the losers' own; ``judged_captions``: B ``(winner's, loser's)``
        captions before the dropout (what a reward scores them under);
        ``original_sizes``, ``crop_top_lefts``: int64 ``[B, 2]`` as ``(H, W)`` / ``(top, left)``; ``is_tie``:
        bool ``[B]``; ``indices``: int64 ``[B]`` source rows; ``num_skipped``: int, pairs dropped from this batch;
        ``skipped``: their descriptions (``UnreadablePair.note``), plain strings, so they cross DataLoader workers.
        When every pair was dropped, B = 0 and the pixel tensors are ``[0, 3, 0, 0]``: skip such a batch.
    """
    kept = [item for item in items if isinstance(item, dict)]
    skipped = [item.note if item is not None else "unreadable pair" for item in items if not isinstance(item, dict)]
    if not kept:
        empty = torch.zeros(0, 3, 0, 0)
        sizes = torch.zeros(0, 2, dtype=torch.long)
        return {
            "pixel_values_w": empty,
            "pixel_values_l": empty.clone(),
            "captions": [],
            "captions_l": [],
            "judged_captions": [],
            "original_sizes": sizes,
            "crop_top_lefts": sizes.clone(),
            "is_tie": torch.zeros(0, dtype=torch.bool),
            "indices": torch.zeros(0, dtype=torch.long),
            "num_skipped": len(items),
            "skipped": skipped,
        }
    return {
        "pixel_values_w": torch.stack([item["pixel_values_w"] for item in kept]),
        "pixel_values_l": torch.stack([item["pixel_values_l"] for item in kept]),
        "captions": [item["caption"] for item in kept],
        "captions_l": [item.get("caption_l", item["caption"]) for item in kept],
        "judged_captions": [item.get("judged_captions", (item["caption"],) * 2) for item in kept],
        "original_sizes": torch.tensor([item["original_size"] for item in kept], dtype=torch.long),
        "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in kept], dtype=torch.long),
        "is_tie": torch.tensor([item["is_tie"] for item in kept], dtype=torch.bool),
        "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "num_skipped": len(items) - len(kept),
        "skipped": skipped,
    }


def load_preference_dataset(
    source: str | Path,
    *,
    resolution: int,
    random_crop: bool = False,
    random_flip: bool = False,
    keep_ties: bool = False,
    empty_caption_prob: float = 0.0,
    seed: int = 0,
    split: str = "train",
    max_bad_fraction: float = 0.1,
) -> PreferenceDataset:
    """Load preference pairs from parquet, jsonl + images, or a ``datasets`` folder (see the module docstring).

    Args:
        source: a ``.parquet`` or ``.jsonl`` file, or a folder (parquet shards, ``data.jsonl``, or ``save_to_disk``).
        resolution: side R of the square ``[3, R, R]`` images returned.
        random_crop: random crop position instead of the center crop (the same crop for both images).
        random_flip: mirror each pair (both images) with probability 0.5.
        keep_ties: keep ``label_0 == 0.5`` pairs (the reference drops them; a tie has no preferred image).
        empty_caption_prob: share of captions replaced by ``""`` so the model keeps its unconditional branch for
            CFG. The Diffusion-DPO reference uses 0.2 (docs/methods/dpo.md#caption-dropout); 0.0 here, the
            trainer's config sets it.
        seed: seeds crops, flips and caption dropout together with the epoch and the row.
        split: the split to read when ``source`` holds a ``datasets.DatasetDict``.
        max_bad_fraction: the largest share of the rows read that may be bad (unreadable records, invalid labels,
            missing images; ties do not count) before loading fails; in [0, 1].

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: unknown layout, missing columns (named).
        PreferenceDataError: (a ValueError) no usable pair, or more bad rows than ``max_bad_fraction``; the message
            names the first bad rows and the counts of what was dropped.
        ImportError: a ``datasets`` folder without the ``datasets`` package (``pip install 'diffalign[data]'``).
    """
    table = _read_any(Path(source), split)
    return PreferenceDataset(
        table,
        resolution=resolution,
        random_crop=random_crop,
        random_flip=random_flip,
        keep_ties=keep_ties,
        empty_caption_prob=empty_caption_prob,
        seed=seed,
        max_bad_fraction=max_bad_fraction,
    )


# --------------------------------------------------------------------------------------------------- streaming

STREAM_BALANCE = 0.9
"""Row groups go to streams whole when every stream then holds at least this share of the mean rows per stream."""


@dataclass(frozen=True)
class _Piece:
    """What one stream reads of a parquet row group: every row, or (row sharding) the rows whose data-set index is
    ``offset`` modulo ``stride``."""

    file: int
    group: int
    file_row: int
    """The row of the file where the group starts."""
    first_row: int
    """The data-set index of the group's first row (files in name order)."""
    num_rows: int
    stride: int = 1
    offset: int = 0

    def rows(self) -> range:
        """The piece's rows, as indices within the row group."""
        return range((self.offset - self.first_row) % self.stride, self.num_rows, self.stride)


class StreamItem(NamedTuple):
    """One pair as a stream hands it to the decoder (a DataLoader worker): small, picklable, images still encoded."""

    file: int
    """Index of the parquet file in :attr:`StreamingPreferenceDataset.files`."""
    row: int
    """Row in that file."""
    index: int
    """Data-set index: seeds the pair's crop, flip and caption dropout, as the in-memory dataset's row does."""
    label: float
    caption: str
    images: tuple[Any, Any] | None
    """The two raw image values; ``None`` from a stream run without images (:meth:`~StreamingPreferenceDataset.batches`
    with ``images=False``)."""
    epoch: int
    caption_1: str | None = None
    """Image 1's own caption (a text preference pair), else ``None``."""


class _PieceState:
    """A piece being streamed: the rows not yet handed out, and their image values once the first one was needed."""

    __slots__ = ("piece", "remaining", "images")

    def __init__(self, piece: _Piece, rows: Iterable[int]) -> None:
        self.piece = piece
        self.remaining = set(rows)
        self.images: dict[int, tuple[Any, Any]] | None = None


class _Entry(NamedTuple):
    """A usable pair in a stream's order, before its images are read."""

    state: _PieceState
    row: int
    """Row within the row group."""
    label: float
    caption: str
    caption_1: str | None = None


def _group_pieces(files: list[Path], origin: str) -> tuple[list[_Piece], tuple[str, str], list[str]]:
    """Every row group of ``files`` as a piece (from the footers only), the image columns and the label columns.

    Raises:
        ValueError: a file lacks a needed column (named with the file).
    """
    pieces, first_row = [], 0
    image_names, label_names = None, None
    for index, path in enumerate(files):
        with pq.ParquetFile(path) as handle:
            names, metadata = handle.schema_arrow.names, handle.metadata
        chosen = _pick_image_columns(names, f"{origin}: {path.name}")
        image_names = image_names or chosen
        if chosen != image_names:
            raise ValueError(f"{path} names its images {chosen}, the first shard {image_names}: use one layout")
        # caption_1 (text preference pairs) is read with the labels: it is as small as a caption.
        own = ["label_0", *[name for name in ("label_1", "caption_1") if name in names]]
        label_names = label_names or own
        if ("caption_1" in own) != ("caption_1" in label_names):
            raise ValueError(f"{path} and the first shard differ in having a caption_1 column: give all or none one")
        file_row = 0
        for group in range(metadata.num_row_groups):
            num_rows = metadata.row_group(group).num_rows
            pieces.append(_Piece(index, group, file_row, first_row, num_rows))
            file_row, first_row = file_row + num_rows, first_row + num_rows
    return pieces, image_names, label_names


def _assign_streams(groups: list[_Piece], num_streams: int) -> list[list[_Piece]]:
    """The pieces of each stream; every row of the data set is in exactly one stream.

    Row groups are dealt whole, largest first, each to the stream with the fewest rows so far, when every stream
    then holds at least :data:`STREAM_BALANCE` of the mean (many row groups, as Pick-a-Pic's shards have): each
    process reads only its own row groups. Otherwise (fewer or very unequal row groups) every stream takes, from
    every row group, the rows whose data-set index is its number modulo ``num_streams``."""
    streams: list[list[_Piece]] = [[] for _ in range(num_streams)]
    loads = [0] * num_streams
    for group in sorted(groups, key=lambda g: -g.num_rows):  # stable: equal sizes keep data-set order
        lightest = loads.index(min(loads))
        streams[lightest].append(group)
        loads[lightest] += group.num_rows
    if min(loads) >= STREAM_BALANCE * sum(loads) / num_streams:
        return [sorted(stream, key=lambda g: g.first_row) for stream in streams]
    return [[dataclasses.replace(g, stride=num_streams, offset=s) for g in groups] for s in range(num_streams)]


class StreamingPreferenceDataset(Dataset):
    """Preference pairs streamed from parquet row groups, memory flat in the data-set size. Build with
    :func:`stream_preference_dataset`.

    The data set is cut once into ``num_streams`` fixed streams (:func:`_assign_streams`: whole row groups, or rows
    modulo ``num_streams`` when the row groups are too few or too unequal); a process reads the streams it is given
    (``streams``) and nothing of the others but their labels. Epoch ``e`` of a stream visits its row groups in an
    order seeded by ``(seed, e, stream)``, each group's usable rows shuffled, through a shuffle buffer of
    ``shuffle_buffer`` pairs (the scheme of ``datasets``' ``IterableDataset.shuffle``). Batch ``b`` is the next
    ``stream_batch_size`` pairs of each given stream, stream after stream; every stream yields
    :attr:`num_batches` batches an epoch, the same number on every process. A stream's order depends only on
    ``(seed, epoch, stream)``, so batch ``b`` over all streams is the same however the streams are spread over
    processes (MosaicML streaming's canonical nodes give the same guarantee).

    :meth:`batches` yields :class:`StreamItem` lists: caption, label and the raw image values, read one row group
    at a time with column projection (labels and captions for the order, the image columns of a row group only
    when one of its pairs is handed out). ``dataset[item]`` decodes and transforms one item exactly as
    :class:`PreferenceDataset` does the same row, so a DataLoader with this dataset and a :meth:`batches` generator
    as ``batch_sampler`` decodes in its workers.

    Bad data: labels are read for the whole set when the dataset is built; invalid labels are counted and, beyond
    ``max_bad_fraction`` of the rows, an error. Images are seen only when streamed: a missing (null, empty, no such
    file) or undecodable image makes ``dataset[item]`` an :class:`UnreadablePair`, which
    :func:`collate_preference_batch` drops and counts, and the trainer judges against the same limit.
    """

    def __init__(
        self,
        files: list[Path],
        origin: str,
        transform: _PairTransform,
        *,
        keep_ties: bool,
        max_bad_fraction: float,
        num_streams: int,
        streams: Sequence[int],
        stream_batch_size: int,
        shuffle_buffer: int,
    ) -> None:
        self.files, self.origin, self.transform = files, origin, transform
        self.keep_ties, self.max_bad_fraction = keep_ties, max_bad_fraction
        self.streams, self.stream_batch_size, self.shuffle_buffer = list(streams), stream_batch_size, shuffle_buffer
        groups, self.image_names, self.label_names = _group_pieces(files, origin)
        self.pieces = _assign_streams(groups, num_streams)
        self.stream_pairs, self._counts, notes = self._scan_labels()
        self._check_bad_share(notes)
        self.num_batches = min(self.stream_pairs) // stream_batch_size
        """Batches an epoch: the fewest usable pairs of any stream, in batches of ``stream_batch_size``."""
        self._broken: set[int] = set()
        self._log_summary()

    # --- the label scan -----------------------------------------------------------------------------------------

    def _usable(self, label_0: Any, label_1: Any) -> float | None:
        """``label_0`` of a pair the stream hands out, or ``None`` for an invalid label or a dropped tie."""
        label = _label_0(label_0, label_1)
        return None if label is None or (label == 0.5 and not self.keep_ties) else label

    def _scan_labels(self) -> tuple[list[int], Counter, list[str]]:
        """Usable pairs per stream, load-time counts and the first invalid rows, from the label columns only."""
        counts = Counter(num_rows=0, invalid_labels=0, ties_dropped=0, ties_kept=0)
        notes: list[str] = []
        stream_pairs = [0] * len(self.pieces)
        by_file: dict[int, list[tuple[int, _Piece]]] = {}
        for stream, pieces in enumerate(self.pieces):
            for piece in pieces:
                by_file.setdefault(piece.file, []).append((stream, piece))
        for index, path in enumerate(self.files):
            usable = self._usable_rows(path, counts, notes)
            for stream, piece in by_file.get(index, []):
                rows = np.asarray(piece.rows(), dtype=np.int64) + piece.file_row
                stream_pairs[stream] += int(usable[rows].sum())
        return stream_pairs, counts, notes

    def _usable_rows(self, path: Path, counts: Counter, notes: list[str]) -> np.ndarray:
        """Which rows of the file ``path`` hold a usable pair (bool ``[rows]``), counting the others in ``counts``
        and naming the first invalid ones in ``notes``."""
        labels = pq.read_table(path, columns=self.label_names)
        labels_0 = labels.column("label_0").to_pylist()
        labels_1 = labels.column("label_1").to_pylist() if "label_1" in self.label_names else [None] * len(labels_0)
        usable = np.zeros(len(labels_0), dtype=bool)
        for row, (raw_0, raw_1) in enumerate(zip(labels_0, labels_1)):
            label = _label_0(raw_0, raw_1)
            if label is None:
                counts["invalid_labels"] += 1
                if len(notes) < MAX_NAMED:
                    notes.append(f"{path} row {row}: invalid label_0={raw_0!r}, label_1={raw_1!r}")
            elif label == 0.5 and not self.keep_ties:
                counts["ties_dropped"] += 1
            else:
                counts["ties_kept"] += label == 0.5
                usable[row] = True
        counts["num_rows"] += len(labels_0)
        return usable

    def _describe(self) -> str:
        counts = self._counts
        return (
            f"{counts['num_rows']} row(s) read; {counts['invalid_labels']} with an invalid label_0/label_1; "
            f"{counts['ties_dropped']} tie(s) dropped" + ("" if self.keep_ties else " (keep_ties=True keeps them)")
        )

    def _check_bad_share(self, notes: list[str]) -> None:
        """No usable pair, or more invalid labels than ``max_bad_fraction`` of the rows: an error naming them."""
        named = f" First bad rows: {'; '.join(notes)}." if notes else ""
        if sum(self.stream_pairs) == 0:
            raise PreferenceDataError(f"No usable preference pair in {self.origin}: {self._describe()}.{named}")
        num_bad, num_read = self._counts["invalid_labels"], self._counts["num_rows"]
        if num_bad / num_read > self.max_bad_fraction:
            raise PreferenceDataError(
                f"{num_bad} of the {num_read} rows read from {self.origin} ({num_bad / num_read:.0%}) have invalid "
                f"labels, more than the allowed share, data.max_bad_fraction = {self.max_bad_fraction}.{named} "
                "Repair or remove the bad rows, or raise data.max_bad_fraction (max_bad_fraction=... in Python) to "
                "train on the usable ones."
            )

    def _log_summary(self) -> None:
        pairs = sum(self.stream_pairs)
        used = self.num_batches * self.stream_batch_size * len(self.pieces)
        sharding = (
            "row groups"
            if all(p.stride == 1 for s in self.pieces for p in s)
            else "rows (too few or unequal row groups)"
        )
        log = logger.warning if self._counts["invalid_labels"] else logger.info
        log(
            "%s: %d usable pair(s) in %d stream(s) by %s, %d of them an epoch; %s.",
            self.origin,
            pairs,
            len(self.pieces),
            sharding,
            used,
            self._describe(),
        )

    # --- the streams --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Usable pairs in the whole data set (all streams)."""
        return sum(self.stream_pairs)

    def stats(self) -> dict[str, int]:
        """Load-time counts (as :meth:`PreferenceDataset.stats`; missing images are found when streamed, so they
        count as ``broken_images``, the distinct pairs this process failed to decode)."""
        return {
            "num_pairs": len(self),
            "num_rows": self._counts["num_rows"],
            "bad_records": 0,
            "invalid_labels": self._counts["invalid_labels"],
            "ties_dropped": self._counts["ties_dropped"],
            "ties_kept": self._counts["ties_kept"],
            "missing_images": 0,
            "broken_images": len(self._broken),
        }

    def _read(self, piece: _Piece, columns: Sequence[str]) -> pa.Table:
        """The given columns of the piece's row group (column projection: nothing else is read)."""
        with pq.ParquetFile(self.files[piece.file]) as handle:
            return handle.read_row_group(piece.group, columns=list(columns))

    def _entries(self, piece: _Piece, rng: np.random.Generator | None) -> list[_Entry]:
        """The usable pairs of ``piece`` from its caption and label columns, shuffled by ``rng`` when given."""
        table = self._read(piece, ["caption", *self.label_names])
        captions = table.column("caption").to_pylist()
        labels_0 = table.column("label_0").to_pylist()
        labels_1 = table.column("label_1").to_pylist() if "label_1" in self.label_names else None
        captions_1 = table.column("caption_1").to_pylist() if "caption_1" in self.label_names else None
        usable = []
        for row in piece.rows():
            label = self._usable(labels_0[row], labels_1[row] if labels_1 is not None else None)
            if label is not None:
                usable.append((row, label, str(captions[row] or ""), captions_1[row] if captions_1 else None))
        state = _PieceState(piece, (row for row, *_ in usable))
        entries = [_Entry(state, row, label, caption, caption_1) for row, label, caption, caption_1 in usable]
        return entries if rng is None else [entries[i] for i in rng.permutation(len(entries))]

    def _order(self, stream: int, epoch: int) -> Iterator[_Entry]:
        """Stream ``stream``'s pairs in epoch ``epoch``'s order: seeded row-group order, shuffled rows, shuffle
        buffer. Reads captions and labels only; the order is the same whether or not images are read later."""
        rng = np.random.default_rng(derive_seed(self.transform.seed, "preference/stream", epoch, stream))
        pieces = self.pieces[stream]
        buffer: list[_Entry] = []
        for position in rng.permutation(len(pieces)):
            for entry in self._entries(pieces[position], rng):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(entry)
                    continue
                if self.shuffle_buffer:
                    slot = int(rng.integers(self.shuffle_buffer))
                    entry, buffer[slot] = buffer[slot], entry
                yield entry
        yield from (buffer[i] for i in rng.permutation(len(buffer)))

    def _item(self, entry: _Entry, epoch: int, images: bool) -> StreamItem:
        """Hand out ``entry``: its image values are read with the rest of its piece's pending rows, once."""
        state, piece = entry.state, entry.state.piece
        values = None
        if images:
            if state.images is None:
                columns = self._read(piece, self.image_names)
                image_0, image_1 = (columns.column(name) for name in self.image_names)
                state.images = {row: (image_0[row].as_py(), image_1[row].as_py()) for row in state.remaining}
            values = state.images.pop(entry.row)
        elif state.images is not None:
            state.images.pop(entry.row, None)
        state.remaining.discard(entry.row)
        return StreamItem(
            piece.file,
            piece.file_row + entry.row,
            piece.first_row + entry.row,
            entry.label,
            entry.caption,
            values,
            epoch,
            entry.caption_1,
        )

    def batches(self, epoch: int, start: int = 0, images: bool = True) -> Iterator[list[StreamItem]]:
        """This process's batches ``start .. num_batches - 1`` of ``epoch``: in each, ``stream_batch_size`` pairs of
        every given stream, stream after stream.

        Starting at ``start`` replays the order from the epoch's beginning without reading any image column (only
        the pairs still waiting in a shuffle buffer have theirs read), so batch ``start`` is exactly the one an
        uninterrupted epoch makes. ``images=False`` runs the order alone (items without image values)."""
        orders = [self._order(stream, epoch) for stream in self.streams]
        for index in range(self.num_batches):
            entries = [next(order) for order in orders for _ in range(self.stream_batch_size)]
            batch = [self._item(entry, epoch, images and index >= start) for entry in entries]
            if index >= start:
                yield batch

    def captions(self) -> Iterator[str]:
        """The captions of this process's usable pairs (a text pair's ``caption_1`` too), in data-set order; reads
        the caption and label columns of its streams only (what the text-embedding cache needs)."""
        for stream in self.streams:
            for piece in self.pieces[stream]:
                for entry in self._entries(piece, None):
                    yield entry.caption
                    if entry.caption_1 is not None:
                        yield entry.caption_1

    def __getitem__(self, item: StreamItem) -> dict[str, Any] | UnreadablePair:
        """Decode and transform one :class:`StreamItem` (what a DataLoader worker runs)."""
        if item.images is None:
            raise ValueError("this item was streamed without its images (batches(..., images=False))")
        path = self.files[item.file]
        images = _decode_pair(item.images, path.parent, f"{path} row {item.row}")
        if isinstance(images, str):
            if item.index not in self._broken:
                self._broken.add(item.index)
                logger.warning("unreadable image, pair skipped: %s", images)
            return UnreadablePair(item.index, images)
        return self.transform(
            images, row=item.index, label=item.label, caption=item.caption, epoch=item.epoch, caption_1=item.caption_1
        )


def stream_preference_dataset(
    source: str | Path,
    *,
    resolution: int,
    random_crop: bool = False,
    random_flip: bool = False,
    keep_ties: bool = False,
    empty_caption_prob: float = 0.0,
    seed: int = 0,
    max_bad_fraction: float = 0.1,
    num_streams: int = 1,
    streams: Sequence[int] | None = None,
    stream_batch_size: int = 1,
    shuffle_buffer: int = 1000,
) -> StreamingPreferenceDataset:
    """Stream the pairs of a parquet source (see :class:`StreamingPreferenceDataset`).

    Args:
        source: a ``.parquet`` file or a folder of parquet shards (Pick-a-Pic layout, module docstring).
        resolution, random_crop, random_flip, keep_ties, empty_caption_prob, seed, max_bad_fraction: as
            :func:`load_preference_dataset`; an item equals the in-memory dataset's item of the same row.
        num_streams: the fixed streams the data set is cut into.
        streams: the streams this process reads (default: all); disjoint over processes, together all of them.
        stream_batch_size: pairs of each stream in a batch.
        shuffle_buffer: pairs each stream holds for shuffling (0: row groups in seeded order, rows shuffled within
            each); memory grows with it, not with the data set.

    Raises:
        ValueError: ``source`` is not parquet, a column is missing, or an option is out of range.
        PreferenceDataError: no usable pair, or more invalid labels than ``max_bad_fraction``.
    """
    files = parquet_files(source)
    if not files:
        raise ValueError(f"{source}: streaming reads parquet (a .parquet file or a folder of shards)")
    streams = list(range(num_streams)) if streams is None else list(streams)
    if num_streams < 1 or not streams or not set(streams) <= set(range(num_streams)):
        raise ValueError(f"streams {streams} must be a non-empty subset of range(num_streams={num_streams})")
    if stream_batch_size < 1 or shuffle_buffer < 0 or resolution < 1:
        raise ValueError(
            f"need stream_batch_size >= 1, shuffle_buffer >= 0 and resolution >= 1, got {stream_batch_size}, "
            f"{shuffle_buffer}, {resolution}"
        )
    if not 0.0 <= empty_caption_prob <= 1.0 or not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(
            f"empty_caption_prob and max_bad_fraction must be in [0, 1], got {empty_caption_prob}, {max_bad_fraction}"
        )
    return StreamingPreferenceDataset(
        files,
        _parquet_origin(Path(source), files),
        _PairTransform(resolution, random_crop, random_flip, empty_caption_prob, seed),
        keep_ties=keep_ties,
        max_bad_fraction=max_bad_fraction,
        num_streams=num_streams,
        streams=streams,
        stream_batch_size=stream_batch_size,
        shuffle_buffer=shuffle_buffer,
    )


# --------------------------------------------------------------------------------------------------- writing


def _to_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image or a ``[3, H, W]`` tensor (float in [0, 1], or uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return TF.to_pil_image(image.cpu())
    raise TypeError(f"expected a PIL image or a [3, H, W] tensor, got {type(image).__name__}")


def _encode(image: Any, image_format: str) -> bytes:
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format=image_format)
    return buffer.getvalue()


def _write_jsonl(records: Iterable[Sequence[Any]], out_dir: Path, image_format: str) -> Path:
    """``data.jsonl`` + ``images/{row:06d}_{k}.{ext}``; written to a temporary name, then renamed."""
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    extension = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    target, partial = out_dir / JSONL_NAME, out_dir / (JSONL_NAME + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row, (caption, image_0, image_1, label_0, *rest) in enumerate(records):
            names = [f"{IMAGE_DIR}/{row:06d}_{k}.{extension}" for k in (0, 1)]
            if image_1 is image_0:  # a text preference pair: one file for both sides
                names[1] = names[0]
            for name, image in dict(zip(names, (image_0, image_1))).items():
                _to_pil(image).save(out_dir / name, format=image_format)
            record = {"caption": caption, "image_0": names[0], "image_1": names[1]}
            record.update(label_0=float(label_0), label_1=1.0 - float(label_0))
            if rest and rest[0] is not None:
                record["caption_1"] = rest[0]
            handle.write(json.dumps(record) + "\n")
    os.replace(partial, target)  # a crash mid-write leaves no half-written data.jsonl behind
    return target


_PARQUET_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
    ]
)


def _write_parquet(
    records: Iterable[Sequence[Any]], out_dir: Path, image_format: str, rows_per_group: int = 256
) -> Path:
    """``data.parquet`` with Pick-a-Pic columns and the images encoded inline, written in row groups."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target, partial = out_dir / PARQUET_NAME, out_dir / (PARQUET_NAME + ".partial")
    columns: dict[str, list] = {name: [] for name in _PARQUET_SCHEMA.names}
    with pq.ParquetWriter(partial, _PARQUET_SCHEMA) as writer:
        for caption, image_0, image_1, label_0, *rest in records:
            if rest and rest[0] is not None:
                raise ValueError("pairs with their own caption_1 (text preference pairs) are written as jsonl")
            columns["caption"].append(caption)
            columns["jpg_0"].append(_encode(image_0, image_format))
            columns["jpg_1"].append(_encode(image_1, image_format))
            columns["label_0"].append(float(label_0))
            columns["label_1"].append(1.0 - float(label_0))
            if len(columns["caption"]) == rows_per_group:
                writer.write_table(pa.table(columns, schema=_PARQUET_SCHEMA))
                columns = {name: [] for name in columns}
        if columns["caption"]:
            writer.write_table(pa.table(columns, schema=_PARQUET_SCHEMA))
    os.replace(partial, target)
    return target


def write_preference_dataset(
    records: Iterable[PreferenceRecord | Sequence[Any]],
    out_dir: str | Path,
    format: Literal["jsonl", "parquet"] = "jsonl",
    *,
    image_format: str = "png",
    rows_per_group: int = 256,
) -> Path:
    """Write pairs in the layout :func:`load_preference_dataset` reads (``load_preference_dataset(out_dir, ...)``).

    Args:
        records: ``(caption, image_0, image_1, label_0[, caption_1])`` per pair (see :class:`PreferenceRecord`);
            ``label_0`` is 1.0 when image_0 is preferred, 0.0 when image_1 is, 0.5 for a tie. ``caption_1`` (jsonl
            only) is image 1's own caption; a text preference pair passes the same image object twice, written
            once. Streamed: any iterable works.
        out_dir: folder to write to (created).
        format: ``"jsonl"`` writes ``data.jsonl`` + ``images/``; ``"parquet"`` writes ``data.parquet`` with the images
            encoded in the ``jpg_0``/``jpg_1`` columns (the Pick-a-Pic names, whatever ``image_format``).
        image_format: PIL format name; PNG (default) is lossless, so pairs keep the model's exact pixels.
        rows_per_group: parquet only: pairs per row group, the unit that streaming reads and spreads over
            processes (:class:`StreamingPreferenceDataset`).

    Returns:
        The data file written.
    """
    out_dir = Path(out_dir)
    if format == "jsonl":
        path = _write_jsonl(records, out_dir, image_format)
    elif format == "parquet":
        path = _write_parquet(records, out_dir, image_format, rows_per_group)
    else:
        raise ValueError(f"format must be 'jsonl' or 'parquet', got {format!r}")
    logger.info("Wrote preference pairs to %s", path)
    return path
