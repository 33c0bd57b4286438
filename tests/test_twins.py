"""Radiographs filed twice: the spine crop, twin pairs, patient groups, the cross-dataset check and the
refusal of a manifest whose patient spans two splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from spineseg.data import DatasetError, Sample, read_manifest, write_dataset
from spineseg.data.dataset import MANIFEST, TWINS, check_dataset, twins_between
from spineseg.data.twins import (
    CANDIDATE_CORRELATION,
    FALSE_JOIN_RATE,
    MIN_COMMON_LEVELS,
    TWIN_THRESHOLD,
    Twin,
    find_twins,
    join_patients,
    shape_distance,
    shape_distances,
    spine_crop,
)

SIZE = (256, 128)


def radiograph(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A smooth random image with structure at several scales, like a radiograph's anatomy."""
    rng = np.random.default_rng(seed)
    field = sum(ndimage.zoom(rng.normal(size=(size[0] // s, size[1] // s)), s, order=1)[:size[0], :size[1]]
                for s in (4, 8, 16))
    return np.clip(120 + 35 * field, 0, 255).astype(np.uint8)


def region(top: int = 100, left: int = 50, height: int = 40, width: int = 24, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[top:top + height, left:left + width] = True
    return mask


def refiled(image: np.ndarray, rows: int, cols: int, seed: int) -> np.ndarray:
    """The same radiograph framed `rows`/`cols` pixels further down/right, with fresh noise."""
    moved = np.pad(image, ((rows, 0), (cols, 0)), mode="edge")[:image.shape[0], :image.shape[1]]
    noise = np.random.default_rng(seed).normal(0, 4, image.shape)
    return np.clip(moved + noise, 0, 255).astype(np.uint8)


def test_one_radiograph_framed_twice_correlates_above_the_threshold_and_others_far_below() -> None:
    base = radiograph(0)
    crop = spine_crop(base, region())
    again = spine_crop(refiled(base, 9, 5, seed=1), region(top=109, left=55))
    other = spine_crop(radiograph(1), region())
    assert float(crop @ again) >= TWIN_THRESHOLD > float(crop @ other) + 0.3
    assert np.isclose(float(crop @ crop), 1.0)


def test_a_scaled_copy_gives_the_same_crop_because_the_region_sets_the_scale() -> None:
    base = radiograph(0)
    half = np.asarray(Image.fromarray(base).resize((SIZE[1] // 2, SIZE[0] // 2), Image.Resampling.BILINEAR))
    small = spine_crop(half, region(50, 25, 20, 12, size=(SIZE[0] // 2, SIZE[1] // 2)))
    assert float(spine_crop(base, region()) @ small) >= TWIN_THRESHOLD


def test_nothing_to_compare_gives_no_crop_and_no_twin() -> None:
    assert spine_crop(radiograph(0), np.zeros(SIZE, dtype=bool)) is None
    assert spine_crop(np.full(SIZE, 7, dtype=np.uint8), region()) is None  # flat: no correlation defined
    crop = spine_crop(radiograph(0), region())
    assert find_twins(["a", "b"], [crop, None]).twins == []


def test_twins_within_and_between_sets_are_found_once_each() -> None:
    base = radiograph(0)
    crops = [spine_crop(base, region()), spine_crop(radiograph(1), region()), spine_crop(refiled(base, 4, 2, 2), region(104, 52))]
    within = find_twins(["a", "b", "c"], crops).twins
    assert [(t.first, t.second) for t in within] == [("a", "c")] and within[0].score >= TWIN_THRESHOLD
    between = find_twins(["a", "b"], crops[:2], other_ids=["x"], other_crops=crops[2:]).twins
    assert [(t.first, t.second) for t in between] == [("a", "x")]
    assert find_twins(["a", "b", "c"], crops, patients=["p", "q", "p"]).twins == []  # one patient already


def spine(curve: float, seed: int = 0, s_curve: float = 0.0) -> np.ndarray:
    """Vertebra centres Th1…L5 [17, 2] of a spine bent by `curve` (a C) and `s_curve` (an S), with a little
    annotation noise."""
    rows, along = np.linspace(20, 230, 17), np.linspace(0, 1, 17)
    cols = 64 + curve * np.sin(np.pi * along) + s_curve * np.sin(2 * np.pi * along)
    return np.column_stack([rows, cols + np.random.default_rng(seed).normal(0, 0.3, 17)])


def test_the_procrustes_distance_ignores_position_size_and_rotation_and_needs_enough_levels() -> None:
    from scipy.spatial import procrustes

    a, b = spine(0.0), spine(25.0, seed=1)
    assert np.isclose(shape_distance(a, b), np.sqrt(procrustes(a, b)[2]))
    turned = (a - a.mean(0)) @ np.array([[0.96, -0.28], [0.28, 0.96]]) * 2.5 + [40, -7]
    assert shape_distance(a, turned) < 1e-6 < shape_distance(a, b)
    left, right = spine(25.0), spine(-25.0)  # mirror images: scipy's procrustes calls them one shape, a spine does not
    assert np.sqrt(procrustes(left, right)[2]) < 0.01 < 0.1 < shape_distance(left, right)
    sparse = a.copy()
    sparse[MIN_COMMON_LEVELS - 1:] = np.nan
    assert np.isnan(shape_distance(sparse, b))
    assert np.allclose(shape_distances([a, sparse], [b]), [[shape_distance(a, b)], [np.nan]], equal_nan=True)


def test_a_look_alike_with_another_spine_is_refused_and_the_threshold_comes_from_unrelated_pairs() -> None:
    base = radiograph(0)
    images = [base, refiled(base, 0, 0, seed=5), refiled(base, 0, 0, seed=6)] + [radiograph(k) for k in range(1, 9)]
    crops = [spine_crop(image, region()) for image in images]
    # the second filing has the first's spine; the look-alike (the same pixels) a spine bent the other way;
    # the eight unrelated radiographs spines of their own
    centres = [spine(5.0), spine(5.0, seed=2), spine(-30.0)] + [spine(curve, seed=k) for k, curve in
                                                                enumerate((-60, -45, -15, 20, 35, 50, 65, 80), start=3)]
    ids = ["first", "second", "lookalike"] + [f"other{k}" for k in range(1, 9)]
    search = find_twins(ids, crops, centres, false_join_rate=0.05)
    assert [(t.first, t.second) for t in search.twins] == [("first", "second")]
    assert {(t.first, t.second) for t in search.refused} == {("first", "lookalike"), ("second", "lookalike")}
    assert all(t.score >= CANDIDATE_CORRELATION for t in (*search.twins, *search.refused))
    unrelated = [shape_distance(centres[i], centres[j]) for i in range(11) for j in range(i + 1, 11)
                 if float(crops[i] @ crops[j]) < CANDIDATE_CORRELATION]
    assert search.reference_pairs == len(unrelated) and search.threshold == np.quantile(unrelated, 0.05)
    assert search.twins[0].distance <= search.threshold < min(t.distance for t in search.refused)
    assert "0.05 quantile" in search.describe()
    few = find_twins(ids, crops, centres)  # 52 unrelated pairs cannot set a 0.001 quantile: the correlation decides
    assert np.isnan(few.threshold) and {(t.first, t.second) for t in few.twins} == {
        ("first", "second"), ("first", "lookalike"), ("second", "lookalike")}


def test_patients_join_through_chains_of_twins_and_others_keep_their_name() -> None:
    ids = ["78B", "153B", "153A", "239A", "238A", "5A"]
    patients = ["p78", "p153", "p153", "p239", "p238", "p5"]
    twins = [Twin("78B", "153B", 0.99), Twin("239A", "238A", 0.98)]
    assert join_patients(ids, patients, twins) == ["p153+p78", "p153+p78", "p153+p78", "p238+p239", "p238+p239", "p5"]


def samples(images: list[np.ndarray], names: list[str]) -> list[Sample]:
    return [Sample(id=name, image=image, mask=region(), patient=f"case-{name}") for image, name in zip(images, names)]


def test_write_dataset_keeps_twins_in_one_split_and_records_why(tmp_path: Path) -> None:
    base = radiograph(0)
    images = [base, refiled(base, 0, 0, seed=9)] + [radiograph(k) for k in range(1, 19)]
    names = ["first", "second"] + [f"other{k}" for k in range(1, 19)]
    for seed in range(5):
        folder = write_dataset(tmp_path / str(seed), "d1", samples(images, names), seed=seed, join_twins=True)
        manifest = read_manifest(folder).set_index("id")
        assert manifest.loc["first", "patient"] == manifest.loc["second", "patient"] == "case-first+case-second"
        assert manifest.loc["first", "split"] == manifest.loc["second", "split"]
        assert manifest.loc["second", "twins"].startswith("first r=")
        assert manifest["patient"].nunique() == 19
    plain = read_manifest(write_dataset(tmp_path / "plain", "d1", samples(images, names)))
    assert plain["patient"].nunique() == 20 and "twins" not in plain.columns  # only when asked for


def test_twins_between_two_datasets_are_listed(tmp_path: Path) -> None:
    base = radiograph(0)
    d1 = write_dataset(tmp_path, "d1", samples([base] + [radiograph(k) for k in range(1, 10)],
                                               ["a"] + [f"d1_{k}" for k in range(1, 10)]))
    d2 = write_dataset(tmp_path, "d2", samples([radiograph(20), refiled(base, 0, 0, seed=4)], ["d2_x", "d2_twin"]),
                       test_only=True)
    twins = twins_between(d1, d2).twins
    assert [(t.first, t.second) for t in twins] == [("a", "d2_twin")] and twins[0].score >= TWIN_THRESHOLD


def test_a_manifest_whose_patient_spans_two_splits_is_refused_with_the_ids(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, "d1", samples([radiograph(k) for k in range(10)], [f"img{k}" for k in range(10)]))
    frame = pd.read_csv(folder / MANIFEST, dtype=str, keep_default_na=False)
    check_dataset(folder)
    first_train = frame.index[frame["split"] == "train"][0]
    first_test = frame.index[frame["split"] == "test"][0]
    frame.loc[first_test, "patient"] = frame.loc[first_train, "patient"]
    frame.to_csv(folder / MANIFEST, index=False)
    train_id, test_id = frame.loc[first_train, "id"], frame.loc[first_test, "id"]
    with pytest.raises(DatasetError, match=r"1 patient\(s\) have images in more than one split") as refused:
        check_dataset(folder)
    assert f"{train_id} (train)" in str(refused.value) and f"{test_id} (test)" in str(refused.value)


def labels_of(centres: np.ndarray, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A level label map with a 5 × 5 block per vertebra at `centres` (codes 1…17, Th1…L5)."""
    labels = np.zeros(size, dtype=np.uint8)
    for code, (row, col) in enumerate(np.round(centres).astype(int), start=1):
        labels[row - 2:row + 3, col - 2:col + 3] = code
    return labels


def test_write_dataset_confirms_twins_by_their_spines_and_reports_every_candidate(tmp_path: Path) -> None:
    base = radiograph(0)
    others = range(1, 46)  # 48 images: 1 000 unrelated pairs and more, enough for the 0.001 quantile
    images = [base, refiled(base, 0, 0, seed=9), refiled(base, 0, 0, seed=10)] + [radiograph(k) for k in others]
    shapes = [(c, s) for c in (-30, -15, 0, 15, 30) for s in (-24, -16, -8, 0, 8, 16, 24, 32, 40)]  # C and S bends
    spines = [spine(5.0), spine(5.0, seed=1), spine(-35.0, s_curve=20)] + [
        spine(c, seed=k, s_curve=s) for k, (c, s) in zip(others, shapes)]
    names = ["first", "second", "lookalike"] + [f"other{k}" for k in others]
    chosen = [Sample(id=name, image=image, mask=region(), patient=f"case-{name}", labels=labels_of(centres))
              for image, name, centres in zip(images, names, spines)]
    folder = write_dataset(tmp_path, "d1", chosen, join_twins=True)
    manifest = read_manifest(folder).set_index("id")
    assert manifest.loc["first", "patient"] == manifest.loc["second", "patient"] == "case-first+case-second"
    assert manifest.loc["lookalike", "patient"] == "case-lookalike" and manifest.loc["lookalike", "twins"] == ""
    assert re.fullmatch(r"first r=0\.\d{3} d=0\.\d{4}", manifest.loc["second", "twins"])
    report = json.loads((folder / TWINS).read_text())
    assert report["false_join_rate"] == FALSE_JOIN_RATE and report["reference_pairs"] >= 1000
    assert report["rule"].startswith(f"candidates at r >= {CANDIDATE_CORRELATION}, confirmed where")
    joined = {(p["first"], p["second"]): p for p in report["pairs"]}
    assert joined[("first", "second")]["joined"] and joined[("first", "second")]["distance"] <= report["threshold"]
    for pair in (("first", "lookalike"), ("second", "lookalike")):
        assert not joined[pair]["joined"] and joined[pair]["r"] >= CANDIDATE_CORRELATION
        assert joined[pair]["distance"] > report["threshold"]
