"""The on-disk dataset format: round trip, resizing, seeded patient-level splits, and one clear
``DatasetError`` naming the file (or split) at fault for every kind of bad input."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import rectangle_samples, write_rectangles
from spineseg.data import DatasetError, Sample, assign_splits, load_split, read_manifest, splits_present, write_dataset
from spineseg.data import dataset as dataset_module
from spineseg.data.dataset import MANIFEST, check_dataset, read_image

# ---------------------------------------------------------------------------------------------
# helpers


def _manifest(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / MANIFEST, dtype=str, keep_default_na=False)


def _write_manifest(folder: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(folder / MANIFEST, index=False)


def _first(folder: Path, split: str = "train") -> pd.Series:
    frame = _manifest(folder)
    return frame[frame["split"] == split].iloc[0]


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _error(folder: Path, split: str = "train", size: int = 64) -> str:
    with pytest.raises(DatasetError) as info:
        load_split(folder, split, size)
    return str(info.value)


def _names(message: str, path: Path) -> bool:
    """The message names `path` (as given or resolved: the loader works on resolved folders)."""
    return str(path) in message or str(Path(path).resolve()) in message


# ---------------------------------------------------------------------------------------------
# round trip and resizing


def test_round_trip_keeps_pixels_ids_and_split(tmp_path):
    samples = rectangle_samples(20, size=64, seed=3)
    folder = write_dataset(tmp_path, "rt", samples, seed=3)
    frame = read_manifest(folder)
    by_id = {s.id: s for s in samples}
    assert sorted(frame["id"]) == sorted(by_id)
    for split in ("train", "val", "test"):
        loaded = load_split(folder, split, 64)
        assert loaded.split == split and loaded.dataset == "rt"
        assert list(loaded.ids) == list(frame.loc[frame["split"] == split, "id"])
        assert loaded.images.dtype == np.float32 and loaded.images.shape == (len(loaded), 64, 64)
        assert loaded.masks.dtype == np.uint8 and set(np.unique(loaded.masks)) <= {0, 1}
        assert loaded.images.min() >= 0.0 and loaded.images.max() <= 1.0
        for k, sample_id in enumerate(loaded.ids):
            np.testing.assert_allclose(loaded.images[k], by_id[sample_id].image / 255.0, atol=1e-6)
            np.testing.assert_array_equal(loaded.masks[k], by_id[sample_id].mask.astype(np.uint8))


def test_manifest_records_paths_and_mask_png_is_0_255(tmp_path):
    folder = write_rectangles(tmp_path, "m", 5)
    frame = read_manifest(folder)
    row = frame.iloc[0]
    assert row["image"] == f"images/{row['id']}.png" and row["mask"] == f"masks/{row['id']}.png"
    with Image.open(folder / row["mask"]) as img:
        assert set(np.unique(np.asarray(img))) == {0, 255}


def test_tiny_dataset_fixture_is_split_70_10_20(tiny_dataset):
    counts = Counter(read_manifest(tiny_dataset)["split"])
    assert counts == {"train": 14, "val": 2, "test": 4}
    assert splits_present(tiny_dataset) == ["train", "val", "test"]


def _stripes(size: int) -> np.ndarray:
    """Alternating one-pixel columns of 0 and 255: any averaging resize turns them grey."""
    row = np.where(np.arange(size) % 2 == 0, 0, 255).astype(np.uint8)
    return np.tile(row, (size, 1))


def test_resize_is_bilinear_for_images_and_nearest_for_masks(tmp_path):
    stripes = _stripes(64)
    sample = Sample(id="s", image=stripes, mask=stripes.astype(bool))
    folder = write_dataset(tmp_path, "stripes", [sample], test_only=True)
    loaded = load_split(folder, "test", 32)
    assert loaded.images.shape == (1, 32, 32) and loaded.masks.shape == (1, 32, 32)
    image, mask = loaded.images[0], loaded.masks[0]
    # bilinear shrink of 0/1 stripes gives mid-grey everywhere; nearest would give 0 or 1
    assert np.all(np.abs(image - 0.5) < 0.1)
    # nearest keeps the mask binary and picks whole source columns: PIL samples pixel centres, i.e.
    # source column 2x + 1, the 255 ones; a bilinear resize + threshold would erase the lines (0.5)
    assert set(np.unique(mask)) <= {0, 1}
    assert mask.all()


def test_upscaling_interpolates_image_but_keeps_mask_binary(tmp_path):
    image = np.zeros((32, 32), dtype=np.uint8)
    image[:, 16:] = 255
    mask = image > 0
    folder = write_dataset(tmp_path, "edge", [Sample(id="e", image=image, mask=mask)], test_only=True)
    loaded = load_split(folder, "test", 64)
    values = np.unique(loaded.images[0])
    assert np.any((values > 0.05) & (values < 0.95)), "bilinear upscaling should create intermediate values"
    assert set(np.unique(loaded.masks[0])) == {0, 1}
    assert loaded.masks[0].mean() == pytest.approx(0.5, abs=1 / 64)
    # the mask edge sits where the image crosses 0.5
    np.testing.assert_array_equal(loaded.masks[0], (loaded.images[0] > 0.5).astype(np.uint8))


def test_shrinking_rectangle_mask_keeps_area_fraction(tmp_path):
    folder = write_rectangles(tmp_path, "r", 6, test_only=True)
    full, half = load_split(folder, "test", 64), load_split(folder, "test", 32)
    assert set(np.unique(half.masks)) <= {0, 1}
    np.testing.assert_allclose(half.masks.mean(axis=(1, 2)), full.masks.mean(axis=(1, 2)), atol=0.05)


def test_size_below_16_is_rejected(tiny_dataset):
    with pytest.raises(DatasetError, match="at least 16"):
        load_split(tiny_dataset, "train", 8)


# ---------------------------------------------------------------------------------------------
# splits


def test_split_fractions_on_100_ids_are_70_10_20():
    ids = [f"x{i}" for i in range(100)]
    counts = Counter(assign_splits(ids, [None] * 100, seed=0))
    assert counts == {"train": 70, "val": 10, "test": 20}


def test_custom_fractions_are_respected():
    ids = [f"x{i}" for i in range(50)]
    counts = Counter(assign_splits(ids, [""] * 50, seed=4, fractions=(0.5, 0.3, 0.2)))
    assert counts == {"train": 25, "val": 15, "test": 10}


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.7, 0.3), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_rejected(fractions):
    with pytest.raises(DatasetError, match="fractions"):
        assign_splits(["a", "b"], [None, None], seed=0, fractions=fractions)


def test_split_is_deterministic_per_seed_and_changes_with_seed():
    ids = [f"x{i}" for i in range(100)]
    first = assign_splits(ids, [None] * 100, seed=7)
    assert assign_splits(ids, [None] * 100, seed=7) == first
    assert assign_splits(ids, [None] * 100, seed=8) != first


def test_written_manifest_is_identical_for_the_same_seed(tmp_path):
    a = write_rectangles(tmp_path / "a", "d", 30, seed=5)
    b = write_rectangles(tmp_path / "b", "d", 30, seed=5)
    c = write_rectangles(tmp_path / "c", "d", 30, seed=6)
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()
    assert list(read_manifest(a)["split"]) != list(read_manifest(c)["split"])


@settings(max_examples=60, deadline=None)
@given(
    patients=st.lists(st.one_of(st.none(), st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"])),
                      min_size=1, max_size=60),
    seed=st.integers(0, 2**16),
)
def test_patients_never_cross_splits(patients, seed):
    ids = [f"id{i}" for i in range(len(patients))]
    splits = assign_splits(ids, patients, seed=seed)
    assert len(splits) == len(ids) and set(splits) <= {"train", "val", "test"}
    seen: dict[str, set[str]] = {}
    for patient, split in zip(patients, splits):
        if patient is not None:
            seen.setdefault(patient, set()).add(split)
    assert all(len(s) == 1 for s in seen.values()), seen
    assert assign_splits(ids, patients, seed=seed) == splits


def test_patient_grouping_survives_write_dataset(tmp_path):
    base = rectangle_samples(40, seed=2)
    samples = [Sample(s.id, s.image, s.mask, patient=f"pat{i % 9}") for i, s in enumerate(base)]
    frame = read_manifest(write_dataset(tmp_path, "p", samples, seed=11))
    assert (frame.groupby("patient")["split"].nunique() == 1).all()
    assert set(frame["split"]) == {"train", "val", "test"}


def test_test_only_dataset_is_all_test(tmp_path):
    folder = write_rectangles(tmp_path, "ext", 5, test_only=True)
    assert set(read_manifest(folder)["split"]) == {"test"}
    assert splits_present(folder) == ["test"]


# ---------------------------------------------------------------------------------------------
# errors: each one a DatasetError naming the culprit


@pytest.mark.parametrize("column", ["image", "mask"])
def test_missing_file_names_the_file(tiny_dataset, column):
    path = tiny_dataset / _first(tiny_dataset)[column]
    path.unlink()
    message = _error(tiny_dataset)
    assert "missing" in message and _names(message, path)


def test_garbage_png_names_the_file(tiny_dataset):
    row = _first(tiny_dataset)
    path = tiny_dataset / row["image"]
    path.write_bytes(b"this is not a png at all \x00\x01\x02" * 10)
    message = _error(tiny_dataset)
    assert "unreadable" in message and _names(message, path)


def test_truncated_png_names_the_file(tiny_dataset):
    row = _first(tiny_dataset)
    path = tiny_dataset / row["mask"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _error(tiny_dataset)
    assert "unreadable" in message and _names(message, path)


def test_size_mismatch_names_both_files(tiny_dataset):
    row = _first(tiny_dataset)
    _save_png(tiny_dataset / row["mask"], np.zeros((32, 48), dtype=np.uint8))
    message = _error(tiny_dataset)
    assert "size mismatch" in message
    assert _names(message, tiny_dataset / row["image"]) and _names(message, tiny_dataset / row["mask"])


def test_write_dataset_refuses_image_mask_size_mismatch(tmp_path):
    bad = Sample(id="bad1", image=np.zeros((16, 16), np.uint8), mask=np.zeros((16, 17), bool))
    with pytest.raises(DatasetError, match="bad1"):
        write_dataset(tmp_path, "x", [bad])


def test_non_binary_mask_names_the_file_and_value(tiny_dataset):
    row = _first(tiny_dataset)
    path = tiny_dataset / row["mask"]
    with Image.open(path) as img:
        mask = np.asarray(img).copy()
    mask[0, 0] = 128
    _save_png(path, mask)
    message = _error(tiny_dataset)
    assert "not binary" in message and "128" in message and _names(message, path)


def test_duplicate_ids_in_manifest_are_named(tiny_dataset):
    frame = _manifest(tiny_dataset)
    dup = frame.iloc[3]["id"]
    _write_manifest(tiny_dataset, pd.concat([frame, frame.iloc[[3]]], ignore_index=True))
    message = _error(tiny_dataset)
    assert "duplicate" in message and dup in message and _names(message, tiny_dataset / MANIFEST)


def test_an_id_pandas_would_read_as_missing_is_a_name_and_a_blank_id_is_refused(tiny_dataset):
    frame = _manifest(tiny_dataset)
    frame.loc[frame["split"] == "test", "id"] = ["NA", "nan", "null", "None"]
    _write_manifest(tiny_dataset, frame)
    assert load_split(tiny_dataset, "test", 64).ids == ("NA", "nan", "null", "None")
    frame.loc[5, "id"] = " "
    _write_manifest(tiny_dataset, frame)
    message = _error(tiny_dataset)
    assert "line(s) [7] have no id" in message and _names(message, tiny_dataset / MANIFEST)


def test_write_dataset_refuses_duplicate_ids(tmp_path):
    samples = rectangle_samples(3)
    samples.append(samples[1])
    with pytest.raises(DatasetError, match=samples[1].id):
        write_dataset(tmp_path, "dup", samples)
    assert not (tmp_path / "dup" / MANIFEST).exists()


def test_header_only_manifest_is_an_empty_dataset(tiny_dataset):
    (tiny_dataset / MANIFEST).write_text("id,split,image,mask\n")
    message = _error(tiny_dataset)
    assert "dataset is empty" in message and _names(message, tiny_dataset / MANIFEST)
    with pytest.raises(DatasetError, match="empty"):
        splits_present(tiny_dataset)


def test_zero_byte_manifest_is_unreadable(tiny_dataset):
    (tiny_dataset / MANIFEST).write_bytes(b"")
    message = _error(tiny_dataset)
    assert _names(message, tiny_dataset / MANIFEST)


def test_write_dataset_refuses_no_samples(tmp_path):
    with pytest.raises(DatasetError, match="no samples"):
        write_dataset(tmp_path, "none", [])


def test_empty_split_requested_names_split_and_manifest(tmp_path):
    folder = write_rectangles(tmp_path, "ext", 4, test_only=True)
    message = _error(folder, split="train")
    assert "'train'" in message and "empty" in message and _names(message, folder / MANIFEST)
    assert len(load_split(folder, "test", 64)) == 4


def test_unknown_split_in_manifest_is_named(tiny_dataset):
    frame = _manifest(tiny_dataset)
    frame.loc[2, "split"] = "training"
    _write_manifest(tiny_dataset, frame)
    message = _error(tiny_dataset, split="test")
    assert "training" in message and _names(message, tiny_dataset / MANIFEST)


def test_unknown_split_requested_is_named(tiny_dataset):
    message = _error(tiny_dataset, split="validation")
    assert "'validation'" in message and "val" in message


def test_missing_manifest_names_the_path(tiny_dataset):
    (tiny_dataset / MANIFEST).unlink()
    message = _error(tiny_dataset)
    assert _names(message, tiny_dataset / MANIFEST)
    with pytest.raises(DatasetError):
        splits_present(tiny_dataset)


@pytest.mark.parametrize("column", ["id", "split", "image", "mask"])
def test_missing_column_is_named(tiny_dataset, column):
    frame = _manifest(tiny_dataset).drop(columns=[column])
    _write_manifest(tiny_dataset, frame)
    message = _error(tiny_dataset)
    assert f"'{column}'" in message and _names(message, tiny_dataset / MANIFEST)


def test_edited_manifest_is_reread_not_served_from_cache(tiny_dataset):
    before = load_split(tiny_dataset, "test", 64)
    frame = _manifest(tiny_dataset)
    frame.loc[frame["split"] == "train", "split"] = "test"
    _write_manifest(tiny_dataset, frame)
    after = load_split(tiny_dataset, "test", 64)
    assert len(after) == 18 and len(before) == 4


def test_an_image_replaced_in_place_is_read_again(tiny_dataset):
    before = load_split(tiny_dataset, "test", 64)
    assert load_split(tiny_dataset, "test", 64) is before  # unchanged files: kept in memory
    _save_png(tiny_dataset / _first(tiny_dataset, "test")["image"], np.full((64, 64), 255))
    after = load_split(tiny_dataset, "test", 64)
    assert after.images[0].min() == 1.0 and before.images[0].min() < 1.0


def test_loaded_splits_are_kept_within_a_memory_budget(tiny_dataset, monkeypatch):
    def nbytes(split):
        return split.images.nbytes + split.masks.nbytes

    test, val = load_split(tiny_dataset, "test", 64), load_split(tiny_dataset, "val", 64)
    monkeypatch.setattr(dataset_module, "SPLIT_CACHE_BYTES", nbytes(test) + nbytes(val))  # room for these two
    assert load_split(tiny_dataset, "val", 64) is val and load_split(tiny_dataset, "test", 64) is test
    load_split(tiny_dataset, "test", 32)  # one more: the least recently used (val) makes room
    assert load_split(tiny_dataset, "test", 64) is test and load_split(tiny_dataset, "val", 64) is not val


# ---------------------------------------------------------------------------------------------
# the full check before any training, and the content fingerprint


def test_the_fingerprint_changes_when_a_mask_is_corrected_with_the_manifest_unchanged(tiny_dataset, tmp_path):
    cache = tmp_path / "hashes.json"
    before = check_dataset(tiny_dataset, cache=cache).fingerprint
    assert check_dataset(tiny_dataset, cache=cache).fingerprint == before  # same content, same key
    mask_path = tiny_dataset / _first(tiny_dataset)["mask"]
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:2, :2] = 255 - mask[:2, :2]
    _save_png(mask_path, mask)
    assert check_dataset(tiny_dataset, cache=cache).fingerprint != before
    assert check_dataset(tiny_dataset).fingerprint == check_dataset(tiny_dataset, cache=cache).fingerprint


def test_unchanged_files_are_not_decoded_again(tiny_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "hashes.json"
    check_dataset(tiny_dataset, cache=cache)
    decoded = []
    monkeypatch.setitem(dataset_module._READERS, "image", lambda path: decoded.append(path) or np.zeros((64, 64)))
    check_dataset(tiny_dataset, cache=cache)
    assert decoded == []
    image_path = tiny_dataset / _first(tiny_dataset)["image"]
    image_path.write_bytes(image_path.read_bytes())  # new mtime: decoded and hashed again
    check_dataset(tiny_dataset, cache=cache)
    assert decoded == [image_path]


def test_a_corrupt_test_image_is_found_before_any_training(tiny_dataset):
    path = tiny_dataset / _first(tiny_dataset, "test")["image"]
    path.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=f"unreadable image file {path}"):
        check_dataset(tiny_dataset)


def test_dataset_1_needs_every_split(tmp_path):
    folder = write_rectangles(tmp_path, "no_test", 10, fractions=(0.8, 0.2, 0.0))
    with pytest.raises(DatasetError, match=r"split\(s\) \['test'\] are empty"):
        check_dataset(folder)


def test_an_external_dataset_must_be_all_test(tmp_path):
    folder = write_rectangles(tmp_path, "d2", 10)
    with pytest.raises(DatasetError, match="must mark every row 'test'"):
        check_dataset(folder, external=True)
    assert check_dataset(write_rectangles(tmp_path, "ok", 4, test_only=True), external=True).counts["test"] == 4


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "images/../../other/x.png"])
def test_manifest_paths_must_stay_inside_the_dataset(tiny_dataset, path):
    frame = _manifest(tiny_dataset)
    frame.loc[0, "image"] = path
    _write_manifest(tiny_dataset, frame)
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        read_manifest(tiny_dataset)


def test_12_bit_values_in_a_16_bit_png_are_scaled_by_the_bits_used(tmp_path):
    values = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    np.testing.assert_allclose(read_image(tmp_path / "x.png"), values / 4095)
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "y.png")
    np.testing.assert_allclose(read_image(tmp_path / "y.png"), [[0, 1]])



@pytest.mark.parametrize(("values", "size"), [(np.arange(90 * 40).reshape(90, 40) % 256, (32, 16)),
                                              (np.arange(90 * 40).reshape(90, 40) * 13 % 4096, (32, 16)),
                                              (np.arange(90 * 40).reshape(90, 40) * 17 % 65536, (90, 40))])
def test_an_image_read_as_float32_gives_the_model_the_same_input_as_float64(tmp_path, values, size):
    """`predict` reads float32 (half the memory of float64); each value is the float64 one rounded once, so
    `model_input`, which resizes in float32, makes the identical array of either (resized or not, 8 or 16 bits)."""
    from spineseg.data.dataset import model_input

    Image.fromarray(values.astype(np.uint8 if values.max() < 256 else np.uint16)).save(tmp_path / "x.png")
    single, double = read_image(tmp_path / "x.png", dtype=np.float32), read_image(tmp_path / "x.png")
    assert single.dtype == np.float32 and double.dtype == np.float64
    np.testing.assert_array_equal(single, double.astype(np.float32))
    np.testing.assert_array_equal(model_input(single, size), model_input(double, size))

def test_tall_sizes_and_label_maps_load(tmp_path):
    samples = [Sample(id=f"s{i}", image=np.full((96, 32), 100, np.uint8), mask=np.eye(96, 32, dtype=bool),
                      labels=np.eye(96, 32, dtype=np.uint8) * 9) for i in range(10)]
    folder = write_dataset(tmp_path, "tall", samples)
    loaded = load_split(folder, "train", labels=True)
    assert loaded.size == (96, 32) and loaded.labels is not None and set(np.unique(loaded.labels)) == {0, 9}
    assert load_split(folder, "train", (64, 32)).images.shape[1:] == (64, 32)
    assert check_dataset(folder).size == (96, 32)
