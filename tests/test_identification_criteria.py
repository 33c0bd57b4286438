"""Identification a constant cannot pass: the strict and the centre criteria, the failure classes, and the
position priors that every identification table carries as its floor."""

from __future__ import annotations

import numpy as np
import pytest

from spineseg.identification import (
    FAILURES,
    centre_errors,
    centre_failure,
    identify,
    mask_centres,
    vertebra_centres,
)
from spineseg.position_prior import PositionPrior
from spineseg.vertebrae import CODES, N_LEVELS, REGION_CODES, region_mask


def spine(top: int = 4, height: int = 6, gap: int = 2, width: int = 10, left: int = 11, rows: int = 200, cols: int = 32):
    """Th1…L5 as boxes stacked from row `top`, one column of vertebrae `width` wide."""
    labels = np.zeros((rows, cols), dtype=np.uint8)
    for code in range(1, N_LEVELS + 1):
        start = top + (code - 1) * (height + gap)
        labels[start:start + height, left:left + width] = code
    return labels


def test_vertebra_centres_are_each_levels_centroid_in_pixel_centre_coordinates():
    labels = spine()
    centres = vertebra_centres(labels)
    assert centres.shape == (N_LEVELS, 2)
    # Th1 covers rows 4..9 and columns 11..20: its centre is at (7, 16) in coordinates where pixel k spans [k, k+1)
    np.testing.assert_allclose(centres[0], [7.0, 16.0])
    np.testing.assert_allclose(centres[7], [4 + 7 * 8 + 3, 16.0])
    partial = labels.copy()
    partial[partial == CODES["L5"]] = 0
    assert np.isnan(vertebra_centres(partial)[-1]).all() and np.isfinite(vertebra_centres(partial)[:-1]).all()


def test_the_strict_criterion_fails_a_full_width_band_that_coverage_alone_passes():
    labels = spine()
    band = np.zeros_like(labels, dtype=bool)
    rows = np.nonzero(region_mask(labels).any(axis=1))[0]
    band[rows.min():rows.max() + 1] = True  # every column of Th8–Th11's rows: covers the four, and far more
    row = identify(band, labels)
    assert row["identified"] and not row["identified_strict"]
    assert row["precision_region"] < 0.5 and row["failure"] == "off the spine"
    exact = identify(region_mask(labels), labels)
    assert exact["identified"] and exact["identified_strict"] and exact["centres_identified"]
    assert exact["failure"] == "identified" and exact["precision_region"] == 1.0


@pytest.mark.parametrize(("levels", "failure", "offset"), [
    ((9, 10, 11, 12), "one level off", 1.0),
    ((7, 8, 9, 10), "one level off", -1.0),
    ((10, 11, 12, 13), "two or more levels off", 2.0),
    ((8, 9, 10), "three vertebrae", np.nan),
    ((8, 9, 10, 11, 12), "five vertebrae", np.nan),
    ((7, 8, 9, 10, 11, 12), "six or more vertebrae", np.nan),
    ((8, 9, 11, 12), "not consecutive", np.nan),
    ((9,), "under-covered", np.nan),
])
def test_each_kind_of_wrong_mask_has_its_failure_class(levels, failure, offset):
    labels = spine()
    row = identify(np.isin(labels, levels), labels)
    assert row["failure"] == failure and failure in FAILURES
    assert not row["identified_strict"]
    if np.isnan(offset):
        assert not row["centres_identified"]
    else:  # a whole-count miss: every named centre sits the same number of vertebrae off
        assert row["centre_shift"] == offset and not row["centres_identified"]


def test_an_empty_mask_is_empty_and_names_no_centre():
    labels = spine()
    row = identify(np.zeros_like(labels, dtype=bool), labels)
    assert row["failure"] == "empty" and not row["identified"] and not row["centres_identified"]
    assert np.isnan(mask_centres(np.zeros((4, 4), dtype=bool))).all()


def test_a_mask_names_its_four_centres_by_equal_runs_of_its_pixels_top_to_bottom():
    labels = spine()
    named = mask_centres(region_mask(labels))
    np.testing.assert_allclose(named, vertebra_centres(labels)[[c - 1 for c in REGION_CODES]])


def test_centre_errors_count_levels_to_the_nearest_true_centre():
    labels = spine()
    truth = vertebra_centres(labels)
    region = [c - 1 for c in REGION_CODES]
    np.testing.assert_array_equal(centre_errors(truth[region], truth), [0, 0, 0, 0])
    np.testing.assert_array_equal(centre_errors(truth[[c + 1 for c in region]], truth), [1, 1, 1, 1])
    np.testing.assert_array_equal(centre_errors(truth[[c - 2 for c in region]], truth), [-2, -2, -2, -2])
    scattered = truth[[7, 8, 10, 10]]
    np.testing.assert_array_equal(centre_errors(scattered, truth), [0, 0, 1, 0])
    assert centre_failure(centre_errors(scattered, truth)) == "not consecutive"
    assert centre_failure(np.array([-1.0, -1, -1, -1])) == "one level off" and centre_failure(np.zeros(4)) == "identified"
    missing = truth[region].copy()
    missing[2] = np.nan
    assert centre_errors(missing, truth)[2] != 0  # a centre the method could not name is wrong


def test_the_position_prior_learns_where_th8_th11_usually_are_and_is_the_same_for_every_image():
    train = np.stack([spine(top=t) for t in (2, 4, 6)])
    prior = PositionPrior.fit(train)
    labels = spine(top=4)
    band = prior.band_mask(labels.shape)
    assert band.all(axis=1).sum() == band.any(axis=1).sum()  # whole rows
    assert identify(band, labels)["identified"] and not identify(band, labels)["identified_strict"]
    mean = prior.mean_mask(labels.shape)
    row = identify(mean, labels, prior.region_centres(labels.shape))
    assert row["identified_strict"] and row["centres_identified"]  # the spine where it usually is: the constant passes
    moved = spine(top=20)  # two vertebrae lower: the same constant is now wrong
    assert not identify(mean, moved, prior.region_centres(moved.shape))["centres_identified"]
    # fitted on one grid, drawn on another: fractions of the image
    doubled = prior.region_centres((2 * labels.shape[0], 2 * labels.shape[1]))
    np.testing.assert_allclose(doubled, 2 * prior.region_centres(labels.shape))


def test_the_position_prior_refuses_maps_without_the_region():
    with pytest.raises(ValueError, match="no training label map shows both Th8 and Th11"):
        PositionPrior.fit(np.zeros((2, 20, 10), dtype=np.uint8))
