"""Preference data: formats, winner order, joint crop/flip, SDXL sizes, caption dropout, broken images, writing."""

import importlib.util
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from diffalign.data.preference import (
    PreferenceRecord,
    collate_preference_batch,
    load_preference_dataset,
    write_preference_dataset,
)


RED, BLUE = (200, 0, 0), (0, 0, 200)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An image with no symmetry, so that a flip or a shifted crop always changes it."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def solid(color, size=(16, 16)) -> bytes:
    return encode(Image.new("RGB", size, color))


def write_parquet(path, rows, *, drop=()):
    """Pick-a-Pic columns from ``(caption, jpg_0, jpg_1, label_0)`` rows, leaving out the columns in ``drop``."""
    columns = {
        "caption": [r[0] for r in rows],
        "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
        "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
        "label_0": [float(r[3]) for r in rows],
        "label_1": [1.0 - float(r[3]) for r in rows],
    }
    pq.write_table(pa.table({k: v for k, v in columns.items() if k not in drop}), path)
    return path


def write_jsonl(folder, records, images):
    """``data.jsonl`` with the given records and ``images`` ({relative name: PIL image}) written beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def is_red(pixels: torch.Tensor) -> bool:
    return bool(pixels[0].mean() > 0.7 and pixels[2].mean() < 0.1)


def test_parquet_winner_first_and_ties_dropped(tmp_path):
    path = write_parquet(
        tmp_path / "pairs.parquet",
        [("a", solid(RED), solid(BLUE), 1), ("b", solid(RED), solid(BLUE), 0), ("c", solid(RED), solid(BLUE), 0.5)],
    )
    dataset = load_preference_dataset(path, resolution=16)
    assert len(dataset) == 2 and dataset.stats()["ties_dropped"] == 1
    first, second = dataset[0], dataset[1]
    assert first["caption"] == "a" and is_red(first["pixel_values_w"]) and not is_red(first["pixel_values_l"])
    # label_0 == 0: image 1 (blue) is the preferred one and comes first.
    assert second["caption"] == "b" and is_red(second["pixel_values_l"]) and not is_red(second["pixel_values_w"])
    assert first["pixel_values_w"].shape == (3, 16, 16) and first["pixel_values_w"].dtype == torch.float32


def test_keep_ties(tmp_path):
    path = write_parquet(
        tmp_path / "p.parquet", [("a", solid(RED), solid(BLUE), 1), ("t", solid(RED), solid(BLUE), 0.5)]
    )
    dataset = load_preference_dataset(path, resolution=16, keep_ties=True)
    assert len(dataset) == 2 and dataset.stats()["ties_kept"] == 1 and dataset.stats()["ties_dropped"] == 0
    tie = dataset[1]
    assert tie["is_tie"] and not dataset[0]["is_tie"]
    assert is_red(tie["pixel_values_w"])  # a tie keeps the stored order


def test_jsonl_file_and_folder_and_parquet_shards(tmp_path):
    records = [{"caption": "x", "image_0": "img/a.png", "image_1": "img/b.png", "label_0": 0, "label_1": 1}]
    folder = write_jsonl(
        tmp_path / "j",
        records,
        {"img/a.png": Image.new("RGB", (16, 16), RED), "img/b.png": Image.new("RGB", (16, 16), BLUE)},
    )
    for source in (folder, folder / "data.jsonl", str(folder)):
        item = load_preference_dataset(source, resolution=16)[0]
        assert is_red(item["pixel_values_l"]) and not is_red(item["pixel_values_w"])
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        write_parquet(shards / f"train-{k:05d}.parquet", [(f"s{k}", solid(RED), solid(BLUE), 1)])
    dataset = load_preference_dataset(shards, resolution=16)
    assert [dataset[i]["caption"] for i in range(len(dataset))] == ["s0", "s1"]


def test_parquet_path_columns_relative_to_the_file(tmp_path):
    Image.new("RGB", (16, 16), RED).save(tmp_path / "r.png")
    Image.new("RGB", (16, 16), BLUE).save(tmp_path / "b.png")
    table = pa.table({"caption": ["p"], "image_0": ["r.png"], "image_1": ["b.png"], "label_0": [1.0]})
    pq.write_table(table, tmp_path / "paths.parquet")
    item = load_preference_dataset(tmp_path / "paths.parquet", resolution=16)[0]
    assert is_red(item["pixel_values_w"])


def expected_views(image: Image.Image, resolution: int, crop_top_left):
    """The unflipped and the flipped crop a correct transform can produce at ``crop_top_left``."""
    width, height = image.size
    if width <= height:
        size = (resolution, int(height * resolution / width))
    else:
        size = (int(width * resolution / height), resolution)
    resized = image.resize(size, Image.BILINEAR)
    top, left = crop_top_left
    box = (left, top, left + resolution, top + resolution)
    views = [resized.crop(box), resized.transpose(Image.FLIP_LEFT_RIGHT).crop(box)]
    return [TF.pil_to_tensor(view).float() / 255 for view in views]


def test_pair_shares_crop_and_flip_and_flips_happen(tmp_path):
    images = [noise_image(40, 24, seed=k) for k in range(8)]
    # Image 1 is a copy of image 0: any difference between w and l would be a transform not applied jointly.
    rows = [(f"c{k}", encode(im), encode(im), 1) for k, im in enumerate(images)]
    path = write_parquet(tmp_path / "same.parquet", rows)
    dataset = load_preference_dataset(path, resolution=16, random_crop=True, random_flip=True, seed=3)
    num_flipped, lefts = 0, set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            assert torch.equal(item["pixel_values_w"], item["pixel_values_l"])
            assert item["original_size"] == (24, 40)
            plain, flipped = expected_views(images[i], 16, item["crop_top_left"])
            matches = [torch.equal(item["pixel_values_w"], view) for view in (plain, flipped)]
            assert any(matches), "output is not the reported crop of the resized image"
            num_flipped += matches[1]
            lefts.add(item["crop_top_left"][1])
    assert 0 < num_flipped < 24  # flips happen, and not always
    assert len(lefts) > 3  # random crop positions vary (resized width 26 -> left in 0..10)


def test_center_crop_original_size_and_mismatched_sizes(tmp_path):
    landscape, portrait = noise_image(48, 32, seed=1), noise_image(20, 30, seed=2)
    rows = [
        ("l", encode(landscape), encode(noise_image(24, 16, seed=5)), 1),  # image 1 smaller: brought to image 0's size
        ("p", encode(portrait), encode(portrait), 1),
    ]
    dataset = load_preference_dataset(write_parquet(tmp_path / "s.parquet", rows), resolution=16)
    first, second = dataset[0], dataset[1]
    assert first["original_size"] == (32, 48) and first["crop_top_left"] == (0, 4)  # resized 24x16 -> left 4
    assert torch.equal(first["pixel_values_w"], expected_views(landscape, 16, (0, 4))[0])
    assert first["pixel_values_l"].shape == (3, 16, 16)
    assert second["original_size"] == (30, 20) and second["crop_top_left"] == (4, 0)  # resized 16x24 -> top 4


def test_empty_caption_share(tmp_path):
    rows = [(f"cap{k}", solid(RED, (8, 8)), solid(BLUE, (8, 8)), 1) for k in range(4)]
    path = write_parquet(tmp_path / "c.parquet", rows)
    for prob in (0.0, 0.3):
        dataset = load_preference_dataset(path, resolution=8, empty_caption_prob=prob, seed=0)
        captions = []
        for epoch in range(100):
            dataset.set_epoch(epoch)
            captions += [dataset[i]["caption"] for i in range(len(dataset))]
        share = sum(c == "" for c in captions) / len(captions)
        assert abs(share - prob) < 0.07, share
        assert all(c in ("", "cap0", "cap1", "cap2", "cap3") for c in captions)


def broken_parquet(tmp_path):
    good = encode(noise_image(32, 32, seed=0), "JPEG")
    truncated = good[: len(good) // 2]
    corrupt = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    rows = [
        ("good-1", good, solid(BLUE), 1),
        ("corrupt", corrupt, solid(BLUE), 1),
        ("truncated", solid(RED), truncated, 0),
        ("good-2", solid(RED), good, 0),
        ("empty", b"", solid(BLUE), 1),  # no image at all: dropped at load time
        ("good-3", good, good, 1),
    ]
    return write_parquet(tmp_path / "broken.parquet", rows)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_images_are_skipped_and_counted_and_the_run_finishes(tmp_path, caplog, num_workers):
    source = broken_parquet(tmp_path)
    dataset = load_preference_dataset(source, resolution=16, random_crop=True, random_flip=True, max_bad_fraction=0.2)
    assert len(dataset) == 5 and dataset.stats()["missing_images"] == 1
    loader = DataLoader(
        dataset,
        batch_size=2,
        shuffle=True,
        collate_fn=collate_preference_batch,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    with caplog.at_level(logging.WARNING, logger="diffalign.data.preference"):
        for epoch in range(2):
            dataset.set_epoch(epoch)
            captions, num_skipped, skipped = [], 0, []
            for batch in loader:
                assert batch["pixel_values_w"].shape[0] == len(batch["captions"])
                assert len(batch["skipped"]) == batch["num_skipped"]
                captions += batch["captions"]
                num_skipped += batch["num_skipped"]
                skipped += batch["skipped"]
            assert sorted(captions) == ["good-1", "good-2", "good-3"] and num_skipped == 2
            # The descriptions cross worker processes: source, row, side and the decode error.
            skipped.sort()
            assert skipped[0].startswith(f"{source} row 1, image_0 (500 bytes): UnidentifiedImageError"), skipped
            assert skipped[1].startswith(f"{source} row 2, image_1 ("), skipped
            assert "truncated" in skipped[1] or "OSError" in skipped[1], skipped
    if num_workers == 0:  # counted in this process; with workers, per-batch num_skipped is the count
        assert dataset.stats()["broken_images"] == 2
        assert "unreadable image" in caplog.text


def test_missing_file_in_jsonl_is_dropped_and_counted(tmp_path):
    records = [
        {"caption": "ok", "image_0": "a.png", "image_1": "b.png", "label_0": 1},
        {"caption": "gone", "image_0": "a.png", "image_1": "nowhere.png", "label_0": 1},
    ]
    folder = write_jsonl(tmp_path, records, {"a.png": noise_image(16, 16), "b.png": noise_image(16, 16, 1)})
    dataset = load_preference_dataset(folder, resolution=16, max_bad_fraction=0.5)
    assert len(dataset) == 1 and dataset.stats()["missing_images"] == 1


def test_bad_records_and_labels_are_counted(tmp_path):
    images = {"a.png": noise_image(16, 16), "b.png": noise_image(16, 16, 1)}
    good = {"caption": "ok", "image_0": "a.png", "image_1": "b.png", "label_0": 1}
    folder = write_jsonl(tmp_path, [good, {**good, "label_0": 0.3, "label_1": 0.3}, {"caption": "no label"}], images)
    with open(folder / "data.jsonl", "a") as handle:
        handle.write("{not json\n")
    stats = load_preference_dataset(folder, resolution=16, max_bad_fraction=1.0).stats()
    assert stats["num_pairs"] == 1 and stats["bad_records"] == 2 and stats["invalid_labels"] == 1


def test_too_many_bad_rows_at_load_time_is_an_error_naming_them(tmp_path):
    images = {f"{k}.png": noise_image(16, 16, k) for k in range(2)}
    records = [{"caption": f"c{k}", "image_0": "0.png", "image_1": "1.png", "label_0": k % 2} for k in range(10)]
    for k in (2, 6):
        records[k]["image_1"] = f"missing-{k}.png"
    records[4]["label_0"] = 0.5  # a tie: dropped, but legitimate filtering, not a bad row
    folder = write_jsonl(tmp_path, records, images)
    with open(folder / "data.jsonl", "a") as handle:
        handle.write("{not json\n")
    # 3 bad rows (2 missing images + 1 bad record) of 11 read: 27% > the default 10%.
    with pytest.raises(ValueError, match=r"3 of the 11 rows .* data\.max_bad_fraction = 0\.1") as info:
        load_preference_dataset(folder, resolution=16)
    message = str(info.value)
    assert "line 3 (row 2): missing image 'missing-2.png'" in message, message
    assert "line 7 (row 6): missing image 'missing-6.png'" in message, message
    assert "line 11: not valid JSON" in message and "line 5" not in message, message
    dataset = load_preference_dataset(folder, resolution=16, max_bad_fraction=0.3)
    assert len(dataset) == 7 and dataset.stats()["missing_images"] == 2 and dataset.stats()["ties_dropped"] == 1
    with pytest.raises(ValueError, match=r"max_bad_fraction must be in \[0, 1\]"):
        load_preference_dataset(folder, resolution=16, max_bad_fraction=1.5)


def test_no_usable_pair_is_a_clear_error(tmp_path):
    ties = write_parquet(tmp_path / "ties.parquet", [("t", solid(RED), solid(BLUE), 0.5)])
    with pytest.raises(ValueError, match=r"No usable preference pair in .*ties\.parquet.*keep_ties=True"):
        load_preference_dataset(ties, resolution=16)
    records = [{"caption": "x", "image_0": "a.png", "image_1": "b.png", "label_0": 1}]
    folder = write_jsonl(tmp_path / "nofiles", records, {})
    with pytest.raises(ValueError, match=r"1 with a missing image"):
        load_preference_dataset(folder, resolution=16)


def test_missing_columns_are_named(tmp_path):
    path = write_parquet(tmp_path / "nolabel.parquet", [("a", solid(RED), solid(BLUE), 1)], drop=("label_0", "jpg_1"))
    with pytest.raises(ValueError, match=r"nolabel\.parquet lacks column\(s\) 'jpg_1' or 'image_1', 'label_0'"):
        load_preference_dataset(path, resolution=16)
    folder = write_jsonl(tmp_path / "j", [{"caption": "x", "image_0": "a.png", "image_1": "b.png"}], {})
    with pytest.raises(ValueError, match=r"records lacking keys: 'label_0' \(1\)"):
        load_preference_dataset(folder, resolution=16)
    with pytest.raises(FileNotFoundError):
        load_preference_dataset(tmp_path / "absent", resolution=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no preference data found"):
        load_preference_dataset(tmp_path / "empty", resolution=16)


@pytest.mark.parametrize("data_format", ["jsonl", "parquet"])
def test_write_then_load_round_trip(tmp_path, data_format):
    generator = torch.Generator().manual_seed(0)
    # Values on the uint8 grid, so that lossless PNG gives them back exactly.
    tensors = [torch.randint(0, 256, (3, 16, 16), generator=generator).float() / 255 for _ in range(4)]
    records = [
        PreferenceRecord("first wins", tensors[0], tensors[1], 1.0),
        ("second wins", TF.to_pil_image(tensors[2]), tensors[3], 0.0),
        ("tie", tensors[0], tensors[3], 0.5),
    ]
    written = write_preference_dataset(iter(records), tmp_path / "out", format=data_format)
    assert written.exists() and not list((tmp_path / "out").glob("*.partial"))
    dataset = load_preference_dataset(tmp_path / "out", resolution=16, keep_ties=True)
    items = [dataset[i] for i in range(3)]
    assert [item["caption"] for item in items] == ["first wins", "second wins", "tie"]
    for item, (w, loser) in zip(items, [(0, 1), (3, 2), (0, 3)]):
        assert torch.equal(item["pixel_values_w"], tensors[w]) and torch.equal(item["pixel_values_l"], tensors[loser])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        write_preference_dataset([("bad", torch.zeros(16, 16), tensors[0], 1.0)], tmp_path / "bad")


def test_deterministic_given_seed_index_and_epoch(tmp_path):
    rows = [(f"c{k}", encode(noise_image(40, 24, k)), encode(noise_image(40, 24, k + 9)), 1) for k in range(6)]
    path = write_parquet(tmp_path / "d.parquet", rows)
    options = {"resolution": 16, "random_crop": True, "random_flip": True, "empty_caption_prob": 0.5}

    def stream(seed, epoch):
        dataset = load_preference_dataset(path, seed=seed, **options)
        dataset.set_epoch(epoch)
        batch = collate_preference_batch([dataset[i] for i in range(len(dataset))])
        return batch["pixel_values_w"], batch["crop_top_lefts"], batch["captions"]

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]

    reference = stream(0, 0)
    assert same(reference, stream(0, 0))  # a fresh dataset (as on resume) replays the stream
    assert not same(reference, stream(0, 1)) and not same(reference, stream(1, 0))
    dataset = load_preference_dataset(path, seed=0, **options)
    dataset.set_epoch(1)
    dataset.set_epoch(0)
    assert torch.equal(dataset[2]["pixel_values_w"], reference[0][2])  # order of access does not matter


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_saved_dataset_folder_without_datasets_names_the_extra(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    with pytest.raises(ImportError, match=r"diffalign\[data\]"):
        load_preference_dataset(tmp_path, resolution=16)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the optional `datasets` package")
def test_saved_dataset_folder(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Image(),
            "jpg_1": datasets.Image(),
            "label_0": datasets.Value("float64"),
        }
    )
    data = {
        "caption": ["a", "b"],
        "jpg_0": [{"bytes": solid(RED), "path": None}] * 2,
        "jpg_1": [{"bytes": solid(BLUE), "path": None}] * 2,
        "label_0": [1.0, 0.0],
    }
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "saved"))
    dataset = load_preference_dataset(tmp_path / "saved", resolution=16)
    assert is_red(dataset[0]["pixel_values_w"]) and not is_red(dataset[1]["pixel_values_w"])
