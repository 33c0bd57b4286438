"""The level code table, the order rule and the identification measures, on constructed label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spineseg.data.aasce import convert
from spineseg.data.dataset import load_split, splits_present
from spineseg.identification import identify, level_accuracy, panoptic_quality, shift_class
from spineseg.ordering import assign_levels, order_levels
from spineseg.vertebrae import CODES, IGNORE, LEVELS, N_LEVELS, REGION, REGION_CODES, region_mask, training_classes


def test_one_code_table_for_every_label_map():
    assert [CODES[name] for name in ("Th1", "Th8", "Th11", "Th12", "L1", "L5")] == [1, 8, 11, 12, 13, 17]
    assert REGION == ("Th8", "Th9", "Th10", "Th11") and REGION_CODES == (8, 9, 10, 11)
    assert (CODES["C1"], CODES["C7"], CODES["S1"]) == (18, 24, 25) and len(LEVELS) == N_LEVELS == 17
    labels = np.array([[0, 8, 11, 12, 24, IGNORE]], dtype=np.uint8)
    np.testing.assert_array_equal(region_mask(labels), [[False, True, True, False, False, False]])
    # a level-aware model learns background + Th1..L5; cervical bodies are background to it, unknown stays unknown
    np.testing.assert_array_equal(training_classes(labels), [[0, 8, 11, 12, 0, IGNORE]])


def column(levels, height=8, gap=2, width=6, pad=3):
    """A label map with one box per level, stacked top to bottom with background gaps."""
    rows = pad + len(levels) * (height + gap) + pad
    labels = np.zeros((rows, width + 2 * pad), dtype=np.uint8)
    for k, level in enumerate(levels):
        top = pad + k * (height + gap)
        labels[top:top + height, pad:pad + width] = level
    return labels


def model_probs(labels: np.ndarray, said: dict[int, tuple[int, float]]) -> np.ndarray:
    """Softmax-like maps: each true vertebra is 'said' to be some level with some confidence."""
    probs = np.full((N_LEVELS + 1, *labels.shape), 0.01, dtype=np.float32)
    probs[0] = np.where(labels == 0, 0.9, 0.05)
    for true_level, (level, confidence) in said.items():
        probs[level][labels == true_level] = confidence
        probs[true_level][labels == true_level] = max(probs[true_level][labels == true_level].max(), (1 - confidence) / 2)
    return probs / probs.sum(axis=0, keepdims=True)


def test_the_order_rule_gives_two_vertebrae_that_share_a_level_consecutive_levels():
    labels = column([6, 7, 8, 9, 10, 11, 12])
    # the model calls Th8 'Th7' too (less sure than it is of the real Th7)
    said = {6: (6, 0.9), 7: (7, 0.9), 8: (7, 0.5), 9: (9, 0.9), 10: (10, 0.9), 11: (11, 0.9), 12: (12, 0.9)}
    probs = model_probs(labels, said)
    raw = probs.argmax(axis=0)
    assert not (raw == 8).any()  # the plain argmax has no Th8, and so misses a quarter of the region
    ordered = order_levels(probs)
    assert ordered.pieces == 7
    np.testing.assert_array_equal(ordered.levels, labels)
    assert identify(ordered.region > 0.5, labels)["identified"]
    assert not identify(probs[list(REGION_CODES)].sum(axis=0) > 0.5, labels)["identified"]


def test_the_order_rule_drops_a_piece_the_model_calls_background_and_keeps_a_consistent_column():
    labels = column([7, 8, 9, 10, 11, 12])
    said = {level: (level, 0.9) for level in range(7, 13)}
    probs = model_probs(labels, said)
    blob = np.zeros_like(labels, dtype=bool)
    blob[0:2, 0:2] = True  # a faint fleck in the corner, called Th5 but mostly background
    probs[:, blob] = 0.01
    probs[0, blob], probs[5, blob] = 0.6, 0.4
    probs /= probs.sum(axis=0, keepdims=True)
    ordered = order_levels(probs)
    np.testing.assert_array_equal(ordered.levels[~blob], labels[~blob])


def test_assign_levels_is_monotone_and_penalises_skips():
    scores = np.log(np.full((3, N_LEVELS + 1), 0.01))
    scores[:, 0] = np.log(0.001)  # none of the three looks like background
    scores[0, 5], scores[1, 7], scores[2, 8] = np.log(0.9), np.log(0.9), np.log(0.9)  # 5, 7, 8: one level skipped
    scores[1, 6], scores[2, 7] = np.log(0.5), np.log(0.5)  # second choices that close the gap
    assert assign_levels(scores, skip_penalty=0.0) == [5, 7, 8]
    assert assign_levels(scores, skip_penalty=10.0) == [5, 6, 7]  # a skip costs more than two second choices
    scores[1, 6], scores[2, 7], scores[2, 8] = np.log(0.01), np.log(0.9), np.log(0.5)  # both lower pieces say Th7 first
    assert assign_levels(scores, skip_penalty=0.0) == [5, 7, 8]  # never the same level twice
    assert assign_levels(np.zeros((0, N_LEVELS + 1))) == []


def test_identification_on_constructed_masks():
    labels = column(list(range(5, 15)))
    right = region_mask(labels)
    row = identify(right, labels)
    assert row["identified"] and row["shift"] == 0 and all(row[f"dsc_{name}"] == 1.0 for name in REGION)
    one_low = np.isin(labels, [9, 10, 11, 12])
    row = identify(one_low, labels)
    assert not row["identified"] and row["shift"] == 1.0 and shift_class(row["shift"]) == 1
    assert row["dsc_Th8"] == 0.0 and row["dsc_Th9"] == 1.0 and row["levels_covered"] == "Th9,Th10,Th11,Th12"
    thin = right.copy()
    thin[labels == 10] = False  # Th10 missed
    assert not identify(thin, labels)["identified"]
    grown = np.zeros_like(right)
    grown[right.any(axis=1)] = True  # whole rows: every predicted pixel still goes to its nearest vertebra
    assert identify(grown, labels)["identified"] and identify(grown, labels)["dsc_Th9"] < 1.0
    assert shift_class(-3.4) == -2 and np.isnan(shift_class(np.nan))
    # halves go away from zero on both sides (numpy rounds them to even: 0.5 → 0 but 1.5 → 2)
    assert [shift_class(s) for s in (-1.5, -0.5, 0.5, 1.5)] == [-2, -1, 1, 2]


def growing_column(levels):
    """Vertebrae that grow downwards (4 + level rows each), as real ones do."""
    labels = np.zeros((sum(4 + level + 2 for level in levels) + 4, 10), dtype=np.uint8)
    top = 2
    for level in levels:
        labels[top:top + 4 + level, 2:8] = level
        top += 4 + level + 2
    return labels


def whole_levels(labels, first, last):
    return np.isin(labels, range(first, last + 1))


def assert_shift_counts_vertebrae(labels):
    assert identify(region_mask(labels), labels)["shift"] == 0.0
    assert identify(whole_levels(labels, 7, 10), labels)["shift"] == -1.0
    assert identify(whole_levels(labels, 9, 12), labels)["shift"] == 1.0


def test_the_shift_weighs_vertebrae_not_pixels_so_larger_lower_vertebrae_bias_nothing():
    labels = growing_column(list(range(5, 15)))
    assert_shift_counts_vertebrae(labels)  # the pixel-weighted mean gave +0.09 for the perfect prediction here
    half_th12 = whole_levels(labels, 8, 11) | (whole_levels(labels, 12, 12) & (np.arange(len(labels)) % 2 == 0)[:, None])
    assert identify(half_th12, labels)["shift"] == pytest.approx((8 + 9 + 10 + 11 + 12 * 0.5) / 4.5 - 9.5, abs=0.02)
    assert np.isnan(identify(labels == 0, labels)["shift"])  # nothing on a labelled vertebra


REAL_SRC = Path(__file__).resolve().parents[1].parent / "shared" / "aasce" / "boostnet_labeldata"


def test_on_real_label_maps_a_perfect_prediction_shifts_0_and_one_vertebra_off_shifts_1(tmp_path):
    if not (REAL_SRC / "data" / "training").is_dir():
        pytest.skip(f"AASCE training split not found at {REAL_SRC}")
    folder = convert(REAL_SRC, tmp_path / "aasce", splits=("training",), limit=12)["training"]
    for split in splits_present(folder):
        for labels in load_split(folder, split, labels=True).labels:
            assert_shift_counts_vertebrae(labels)


def test_level_accuracy_and_panoptic_quality():
    labels = column([7, 8, 9, 10])
    assert level_accuracy(labels, labels) == 1.0 and panoptic_quality(labels, labels) == {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    shifted = np.where(labels > 0, labels + 1, 0).astype(np.uint8)  # every vertebra one level off
    assert level_accuracy(shifted, labels) == 0.0
    quality = panoptic_quality(shifted, labels)
    assert quality["pq"] == 0.0 and quality["rq"] == 0.0
    half = labels.copy()
    half[labels == 10] = 0  # Th10 missed: 3 of 4 matched, one false negative
    quality = panoptic_quality(half, labels)
    assert quality["sq"] == 1.0 and quality["rq"] == pytest.approx(3 / 3.5)
