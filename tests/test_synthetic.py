"""The synthetic default data must be reproducible, correctly labelled and genuinely hard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from spineseg.data import synthetic
from spineseg.data.synthetic import LEVELS, generate, render, synthesize
from spineseg.vertebrae import CODES, REGION, region_mask

SIZE = 256  # the phantom's statistics at 256² match 512² closely and render 4x faster
HANDFUL = range(4)


def _best_global_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """Dice of the best single threshold for this very image, trying both polarities (an oracle)."""
    everywhere = np.bincount(image.ravel(), minlength=256)
    inside = np.bincount(image[mask], minlength=256)
    best = 0.0
    for order in (slice(None, None, -1), slice(None)):  # predict >= t, then predict <= t
        predicted = np.cumsum(everywhere[order])
        hits = np.cumsum(inside[order])
        best = max(best, float(np.max(2 * hits / (predicted + mask.sum()))))
    return best


def _contrast_to_noise(image: np.ndarray, region: np.ndarray, ring_width: int, exclude: np.ndarray) -> float:
    pixels = image.astype(np.float64)
    ring = ndimage.binary_dilation(region, iterations=ring_width) & ~exclude
    spread = np.sqrt((pixels[region].var() + pixels[ring].var()) / 2)
    return float((pixels[region].mean() - pixels[ring].mean()) / spread)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generate_is_deterministic_for_a_seed():
    first = list(generate("d1", 3, seed=5, size=96))
    second = list(generate("d1", 3, seed=5, size=96))
    for a, b in zip(first, second, strict=True):
        assert a.id == b.id
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_seed_index_and_domain_each_change_the_image():
    reference = render("d1", 0, seed=0, size=96)
    others = (render("d1", 0, seed=1, size=96), render("d1", 1, seed=0, size=96), render("d2", 0, seed=0, size=96))
    for other in others:
        assert not np.array_equal(reference.image, other.image)
        assert not np.array_equal(reference.labels, other.labels)


def test_synthesize_twice_gives_byte_identical_files(tmp_path):
    counts = {"d1": 6, "d2": 3}
    folders_a = synthesize(tmp_path / "a", seed=3, size=64, counts=counts)
    synthesize(tmp_path / "b", seed=3, size=64, counts=counts)
    assert folders_a == {"d1": tmp_path / "a" / "d1", "d2": tmp_path / "a" / "d2"}
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    assert len(files_a) == 3 * 9 + 2  # image, mask, labels per sample, plus two manifests


def test_synthesize_writes_split_d1_and_test_only_d2(tmp_path):
    folders = synthesize(tmp_path, seed=0, size=48, counts={"d1": 10, "d2": 4})
    d1 = pd.read_csv(folders["d1"] / "manifest.csv", dtype=str)
    d2 = pd.read_csv(folders["d2"] / "manifest.csv", dtype=str)
    assert d1["split"].value_counts().to_dict() == {"train": 7, "val": 1, "test": 2}
    assert set(d2["split"]) == {"test"} and len(d2) == 4
    assert d1["id"].tolist()[:2] == ["d1_0000", "d1_0001"]
    assert d1["patient"].is_unique and d1["patient"].iloc[0] == "d1-000"
    assert set(d1["source"]) == {"synthetic-d1"} and set(d2["source"]) == {"synthetic-d2"}


def test_default_counts_write_both_domains(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "PAPER_COUNTS", {"d1": 5, "d2": 2})  # the real 183/58 take ~15 s
    folders = synthesize(tmp_path, size=40)
    written = {name: len(pd.read_csv(folder / "manifest.csv")) for name, folder in folders.items()}
    assert written == {"d1": 5, "d2": 2}


@pytest.mark.parametrize("domain", ["d1", "d2"])
def test_labels_code_every_body_by_its_level_and_the_mask_is_th8_to_th11(domain):
    for sample in generate(domain, 4, seed=11, size=128):
        assert sample.image.dtype == np.uint8 and sample.image.shape == (128, 128)
        np.testing.assert_array_equal(sample.mask, np.isin(sample.labels, [8, 9, 10, 11]))
        present = set(np.unique(sample.labels).tolist()) - {0}
        assert {CODES[name] for name in REGION} <= present and present <= {CODES[name] for name in LEVELS}
        rows = [np.nonzero(sample.labels == CODES[name])[0].mean() for name in LEVELS if (sample.labels == CODES[name]).any()]
        assert np.all(np.diff(rows) > 0)  # the codes run top to bottom
        assert 0.01 < sample.mask.mean() < 0.10


def test_targets_are_identified_by_position_in_a_longer_column():
    th7, th12 = LEVELS.index("Th7") + 1, LEVELS.index("Th12") + 1
    for index in HANDFUL:
        phantom = render("d1", index, seed=2, size=SIZE)
        present = [k for k in range(1, len(LEVELS) + 1) if (phantom.column == k).any()]
        assert len(present) >= 14  # a whole column, not just the four targets
        bodies = phantom.column > 0
        for level in LEVELS:  # one code table: C6 = 23, C7 = 24, Th1..Th12 = 1..12, L1.. = 13..
            np.testing.assert_array_equal(phantom.labels == CODES[level], phantom.column == LEVELS.index(level) + 1)
        assert CODES["C7"] == 24 and CODES["Th8"] == 8 and CODES["L1"] == 13
        rows = {k: np.nonzero(phantom.column == k)[0].mean() for k in (th7, th12)}
        assert rows[th7] < np.nonzero(phantom.labels == CODES["Th8"])[0].mean()
        assert rows[th12] > np.nonzero(phantom.labels == CODES["Th11"])[0].mean()
        for neighbour in (th7, th12):  # the bodies just outside the mask look like vertebrae too
            assert _contrast_to_noise(phantom.image, phantom.column == neighbour, 3, bodies) > 0.3


def test_default_size_is_512():
    sample = next(generate("d2", 1))
    assert sample.image.shape == sample.mask.shape == (512, 512)
    assert sample.id == "d2_0000" and sample.patient == "d2-000" and sample.source == "synthetic-d2"


def test_d2_has_lower_target_contrast_than_d1():
    def mean_cnr(domain: str) -> float:
        scores = []
        for index in HANDFUL:
            phantom = render(domain, index, seed=0, size=SIZE)
            mask = region_mask(phantom.labels)
            scores.append(_contrast_to_noise(phantom.image, mask, 4, mask))
        return float(np.mean(scores))

    d1, d2 = mean_cnr("d1"), mean_cnr("d2")
    assert 0 < d2 < 0.85 * d1


@pytest.mark.parametrize("domain", ["d1", "d2"])
def test_best_global_threshold_fails_so_the_task_needs_learning(domain):
    scores = []
    for index in HANDFUL:
        phantom = render(domain, index, seed=0, size=SIZE)
        scores.append(_best_global_threshold_dice(phantom.image, region_mask(phantom.labels)))
    assert np.mean(scores) < 0.5


@pytest.mark.parametrize(("call", "parameter"), [
    (lambda: generate("d3", 2), "d1, d2"),
    (lambda: generate("d1", 0), "count"),
    (lambda: generate("d1", 2, size=31), "size"),
    (lambda: generate("d1", 2, seed=-1), "seed"),
    (lambda: render("d1", -1), "index"),
    (lambda: synthesize("/nonexistent", counts={"d1": 0}), "counts"),
    (lambda: synthesize("/nonexistent", counts={"xray": 2}), "d1, d2"),
    (lambda: synthesize("/nonexistent", counts={}), "counts"),
])
def test_bad_parameters_raise_before_any_work(call, parameter):
    with pytest.raises(ValueError, match=parameter):
        call()
