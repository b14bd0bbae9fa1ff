"""Streamed parquet preference data: streams split the row groups (or rows) disjointly and cover the set, global
batches do not depend on the process count, the order is seeded by (seed, epoch), resume lands on the same batch,
items equal the in-memory dataset's, bad rows are counted, and memory stays flat in the data-set size."""

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffalign.data.preference import (
    PreferenceDataError,
    _assign_streams,
    _Piece,
    collate_preference_batch,
    load_preference_dataset,
    stream_preference_dataset,
)


SCHEMA = pa.schema(
    [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64())]
)


def png(seed: int, size: int = 12) -> bytes:
    """A small noise image (no symmetry: flips and crops always change it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_groups(path: Path, groups: list[list[float]], image=png, first: int = 0) -> Path:
    """One parquet row group per list of ``label_0`` values; the rows are named from ``first`` on (caption
    ``c<i>``, images from seeds ``2i`` and ``2i + 1``), ``first`` being the file's first data-set index."""
    row = first
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for labels in groups:
            rows = range(row, row + len(labels))
            table = {
                "caption": [f"c{i}" for i in rows],
                "jpg_0": pa.array([image(2 * i) for i in rows], pa.binary()),
                "jpg_1": pa.array([image(2 * i + 1) for i in rows], pa.binary()),
                "label_0": labels,
            }
            writer.write_table(pa.table(table, schema=SCHEMA))
            row += len(labels)
    return path


def usable_rows(groups: list[list[float]]) -> set[int]:
    labels = [label for group in groups for label in group]
    return {i for i, label in enumerate(labels) if label != 0.5}


def rows_of(dataset, epoch=0) -> list[list[int]]:
    return [[item.index for item in batch] for batch in dataset.batches(epoch, images=False)]


def spy_reads(dataset, log: list):
    """Record ``(file, row group, columns)`` of every row-group read of ``dataset``."""
    read = dataset._read

    def logged(piece, columns):
        log.append((piece.file, piece.group, tuple(columns)))
        return read(piece, columns)

    dataset._read = logged
    return dataset


IMAGE_COLUMNS = ("jpg_0", "jpg_1")
# 8 row groups of 6 rows; row 0 of each is a tie (dropped), the others alternate winners: 5 usable pairs a group.
EIGHT_GROUPS = [[0.5, *[float(i % 2) for i in range(5)]] for _ in range(8)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two parquet shards of 4 row groups each (48 rows, 40 usable pairs)."""
    folder = tmp_path_factory.mktemp("shards")
    write_groups(folder / "train-0.parquet", EIGHT_GROUPS[:4])
    write_groups(folder / "train-1.parquet", EIGHT_GROUPS[4:], first=24)
    return folder


def stream(source, **options):
    return stream_preference_dataset(source, **{"resolution": 8, "shuffle_buffer": 4, **options})


# --- how the data set is cut -----------------------------------------------------------------------------------------


def pieces(sizes):
    first = np.cumsum([0, *sizes])
    return [_Piece(0, g, int(first[g]), int(first[g]), n) for g, n in enumerate(sizes)]


def test_the_sharding_rule():
    # Many equal row groups: dealt whole, largest first to the lightest stream (equal loads).
    streams = _assign_streams(pieces([8, 8, 8, 8, 4, 4]), 2)
    assert [[p.group for p in s] for s in streams] == [[0, 2, 4], [1, 3, 5]]
    assert all(p.stride == 1 for s in streams for p in s)
    # Whole groups would leave a stream with 4 of the mean 8 rows (< 90%): rows modulo the stream count instead.
    streams = _assign_streams(pieces([12, 2, 2]), 2)
    assert all(len(s) == 3 and {(p.stride, p.offset) for p in s} == {(2, i)} for i, s in enumerate(streams))
    assert [list(p.rows()) for p in streams[1]] == [[1, 3, 5, 7, 9, 11], [1], [1]]  # data-set rows 1..11, 13, 15
    # Fewer row groups than streams: rows as well.
    (only,) = _assign_streams(pieces([9]), 3)[2]
    assert (only.stride, only.offset, list(only.rows())) == (3, 2, [2, 5, 8])


def test_each_process_reads_its_own_row_groups_and_the_union_is_the_set(shards):
    """2 processes x 1 stream: disjoint pairs from disjoint row groups; over an epoch, every usable pair once."""
    reads: list[list] = [[], []]
    datasets = [spy_reads(stream(shards, num_streams=2, streams=[rank]), reads[rank]) for rank in (0, 1)]
    seen = []
    for dataset in datasets:
        assert dataset.num_batches == 20 and dataset.stream_pairs == [20, 20] and len(dataset) == 40
        rows = []
        for batch in dataset.batches(0):
            rows += [item.index for item in batch]
            assert all(item.caption == f"c{item.index}" and item.images is not None for item in batch)
        seen.append(set(rows))
        assert len(rows) == len(set(rows)) == 20  # no pair twice in an epoch
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == usable_rows(EIGHT_GROUPS)
    image_groups = [{(f, g) for f, g, columns in log if columns == IMAGE_COLUMNS} for log in reads]
    assert len(image_groups[0]) == len(image_groups[1]) == 4 and not image_groups[0] & image_groups[1]
    for rank in (0, 1):  # a process reads nothing but labels of the other's row groups (the labels: when built)
        assert {(f, g) for f, g, _ in reads[rank]} == image_groups[rank]
    # Pairs come from the row groups that were read: group = (file, row in file // 6).
    for rank in (0, 1):
        assert {(r // 24, r % 24 // 6) for r in seen[rank]} == image_groups[rank]


def test_few_row_groups_are_shared_by_rows(tmp_path):
    source = write_groups(tmp_path / "one.parquet", [[1.0, 0.0] * 6])  # a single row group of 12 pairs
    per_process = [rows_of(stream(source, num_streams=3, streams=[rank])) for rank in range(3)]
    for rank, batches in enumerate(per_process):
        assert sorted(r for batch in batches for r in batch) == list(range(rank, 12, 3))


def test_global_batches_do_not_depend_on_the_process_count(shards):
    """With 2 streams, batch b of 1 process (4 pairs) is batch b of process 0 then of process 1 (2 pairs each)."""
    one = stream(shards, num_streams=2, stream_batch_size=2)
    two = [stream(shards, num_streams=2, streams=[rank], stream_batch_size=2) for rank in (0, 1)]
    for epoch in (0, 1):
        single, split = rows_of(one, epoch), [rows_of(dataset, epoch) for dataset in two]
        assert len(single) == 10 and single == [a + b for a, b in zip(*split)]
    batch = next(one.batches(0))
    halves = [next(dataset.batches(0)) for dataset in two]
    assert batch == halves[0] + halves[1]  # captions, labels, image bytes
    pixels = [one[item]["pixel_values_w"] for item in batch]
    assert all(torch.equal(a, two[i // 2][item]["pixel_values_w"]) for i, (a, item) in enumerate(zip(pixels, batch)))


def test_the_order_is_seeded_by_seed_and_epoch(shards):
    base = rows_of(stream(shards, seed=0), 0)
    assert base == rows_of(stream(shards, seed=0), 0)  # a fresh dataset (as on resume) replays it
    assert base != rows_of(stream(shards, seed=0), 1) and base != rows_of(stream(shards, seed=1), 0)
    assert sorted(sum(base, [])) == sorted(sum(rows_of(stream(shards, seed=0), 1), []))  # the same pairs

    def group_changes(batches):
        groups = [r // 6 for batch in batches for r in batch]
        return sum(a != b for a, b in zip(groups, groups[1:]))

    # No buffer: one row group after the other (7 changes for 8 groups), rows shuffled inside each.
    unbuffered = rows_of(stream(shards, shuffle_buffer=0))
    assert group_changes(unbuffered) == 7 and unbuffered != sorted(unbuffered)
    assert group_changes(rows_of(stream(shards, shuffle_buffer=16))) > 15  # the buffer mixes the row groups


@pytest.mark.parametrize("start", [1, 9, 19])
def test_resume_mid_epoch_lands_on_the_same_batch(shards, start):
    straight = list(stream(shards, num_streams=2, streams=[1]).batches(3))
    reads: list = []
    resumed = spy_reads(stream(shards, num_streams=2, streams=[1]), reads)
    assert list(resumed.batches(3, start=start)) == straight[start:]  # rows, captions, labels, image bytes
    image_reads = [read for read in reads if read[2] == IMAGE_COLUMNS]
    # Only the row groups with pairs still to come are read for images, each once.
    pending = {(item.file, item.row // 6) for batch in straight[start:] for item in batch}
    assert len(image_reads) == len(set(image_reads)) == len(pending)


def test_items_equal_the_in_memory_datasets(shards):
    options = {"resolution": 8, "random_crop": True, "random_flip": True, "empty_caption_prob": 0.5, "seed": 5}
    memory = load_preference_dataset(shards, **options)
    by_row = {row: index for index, row in enumerate(memory.rows)}
    streamed = stream_preference_dataset(shards, shuffle_buffer=4, **options)
    memory.set_epoch(2)
    for batch in list(streamed.batches(2))[:6]:
        for item in batch:
            got, expected = streamed[item], memory[by_row[item.index]]
            assert got.keys() == expected.keys()
            for key in got:
                assert torch.equal(got[key], expected[key]) if torch.is_tensor(got[key]) else got[key] == expected[key]


def test_decoding_in_dataloader_workers_gives_the_same_batches(shards):
    dataset = stream(shards, num_streams=2, stream_batch_size=2)
    batches = []
    for workers in (0, 1):
        loader = DataLoader(
            dataset, batch_sampler=dataset.batches(1), collate_fn=collate_preference_batch, num_workers=workers
        )
        batches.append([(b["indices"], b["pixel_values_w"], b["captions"]) for b in loader])
    assert len(batches[0]) == 10
    for (rows, pixels, captions), (rows_w, pixels_w, captions_w) in zip(*batches):
        assert torch.equal(rows, rows_w) and torch.equal(pixels, pixels_w) and captions == captions_w


# --- bad data --------------------------------------------------------------------------------------------------------


def test_invalid_labels_are_counted_and_too_many_stop_with_their_rows(tmp_path):
    labels = [1.0, 0.0, 0.5, 1.0, float("nan"), 0.0, 2.0, 1.0, 0.0, 1.0]
    source = write_groups(tmp_path / "labels.parquet", [labels[:5], labels[5:]])
    with pytest.raises(PreferenceDataError, match=r"2 of the 10 rows .* data\.max_bad_fraction = 0\.1") as info:
        stream(source)
    assert "labels.parquet row 4: invalid label_0=nan" in str(info.value)
    assert "labels.parquet row 6: invalid label_0=2.0" in str(info.value)
    dataset = stream(source, max_bad_fraction=0.2)
    stats = dataset.stats()
    assert (stats["num_pairs"], stats["invalid_labels"], stats["ties_dropped"], stats["num_rows"]) == (7, 2, 1, 10)
    assert sorted(sum(rows_of(dataset), [])) == [0, 1, 3, 5, 7, 8, 9]
    with pytest.raises(PreferenceDataError, match=r"No usable preference pair .*keep_ties=True"):
        stream(write_groups(tmp_path / "ties.parquet", [[0.5, 0.5]]))


def test_missing_and_broken_images_are_skipped_and_named(tmp_path):
    def image(seed):  # row 1: image 0 is empty; row 3: image 1 is not an image
        return {2: b"", 7: b"not a png"}.get(seed, png(seed))

    source = write_groups(tmp_path / "broken.parquet", [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]], image=image)
    dataset = stream(source, shuffle_buffer=0)
    batch = collate_preference_batch([dataset[item] for batch in dataset.batches(0) for item in batch])
    assert batch["num_skipped"] == 2 and sorted(batch["indices"].tolist()) == [0, 2, 4, 5]
    notes = sorted(batch["skipped"])
    assert notes[0].startswith(f"{source} row 1, image_0 (0 bytes): UnidentifiedImageError"), notes
    assert notes[1].startswith(f"{source} row 3, image_1 (9 bytes): UnidentifiedImageError"), notes
    assert dataset.stats()["broken_images"] == 2


def test_bad_options_and_sources_are_refused(tmp_path, shards):
    with pytest.raises(ValueError, match="streaming reads parquet"):
        stream(tmp_path)
    with pytest.raises(ValueError, match=r"subset of range\(num_streams=2\)"):
        stream(shards, num_streams=2, streams=[2])
    with pytest.raises(ValueError, match="shuffle_buffer >= 0"):
        stream(shards, shuffle_buffer=-1)


# --- memory ----------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow  # writes and streams 384 MB (about 4 s)
@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the RSS from /proc")
def test_streaming_memory_stays_flat_in_the_data_set_size(tmp_path):
    """384 MB of image bytes in 96 row groups: streaming every pair through decode grows the RSS by under 64 MB (the
    buffer holds 2 x 16 pairs of 0.5 MB; measured 10-26 MB for sets of 192-768 MB). The in-memory loader grows it
    by more than the set (435-846 MB measured for this one), so a reader that loads the set fails here.

    Each image is a tiny PNG followed by 256 KB of random bytes, which the decoder stops before (decoding stays
    cheap) and which compression cannot shrink."""
    small = png(0, size=8)
    rows, pad = 8, 256 * 1024
    rng = np.random.default_rng(0)
    path = tmp_path / "big.parquet"
    with pq.ParquetWriter(path, SCHEMA, compression="none", use_dictionary=False) as writer:
        for group in range(96):
            blob = rng.bytes(2 * rows * pad)
            images = [small + blob[i * pad : (i + 1) * pad] for i in range(2 * rows)]
            table = {
                "caption": [f"c{group}-{i}" for i in range(rows)],
                "jpg_0": pa.array(images[:rows], pa.binary()),
                "jpg_1": pa.array(images[rows:], pa.binary()),
                "label_0": [float(i % 2) for i in range(rows)],
            }
            writer.write_table(pa.table(table, schema=SCHEMA))
    size = path.stat().st_size
    assert size > 380 * 2**20
    dataset = stream_preference_dataset(path, resolution=8, num_streams=2, shuffle_buffer=16)
    before = peak = rss_bytes()
    pairs = 0
    for batch in dataset.batches(0):
        collated = collate_preference_batch([dataset[item] for item in batch])
        pairs += len(collated["captions"])
        peak = max(peak, rss_bytes())
    assert pairs == 96 * rows and collated["num_skipped"] == 0
    growth = peak - before
    assert growth < 64 * 2**20, f"RSS grew {growth / 2**20:.0f} MB streaming {size / 2**20:.0f} MB"
