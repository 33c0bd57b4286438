from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from spineseg.ensemble import (
    Stacker,
    combine,
    fit_stacker,
    leave_one_out,
    tune_threshold,
)
from spineseg.names import EXTRA_RULES, RULE_NAMES, RULES

ALL_METHODS = RULES + EXTRA_RULES

# Probabilities are multiples of 1/16 and thresholds lie halfway between them, so no pooled score
# (mean, weighted mean with integer weights, geometric mean of up to 4 models) sits within rounding
# error of the threshold: the properties then hold exactly, not just up to ties.
GRID = 16
thresholds = st.integers(0, GRID - 1).map(lambda j: (j + 0.5) / GRID)


@st.composite
def prob_stacks(draw, max_models: int = 4, images: bool = False) -> np.ndarray:
    n_models = draw(st.integers(1, max_models))
    spatial = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    shape = (n_models, draw(st.integers(1, 3)), *spatial) if images else (n_models, *spatial)
    return draw(hnp.arrays(np.int8, shape, elements=st.integers(0, GRID))) / GRID


def integer_weights(n_models: int):
    return st.lists(st.integers(1, 5), min_size=n_models, max_size=n_models).map(np.array)


def weights_for(method: str, n_models: int) -> np.ndarray | None:
    return np.ones(n_models) if method == "weighted" else None


def shape_average_by_definition(masks: np.ndarray) -> np.ndarray:
    """Eq. 15–17 on the whole image, without the shortcuts of `combine`."""
    height, width = masks.shape[1:]
    total = np.zeros((height, width))
    for mask in masks:
        if not mask.any():
            total -= height + width
        elif mask.all():
            total += height + width
        else:
            total += ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
    return total


def test_names_cover_every_method():
    assert RULES == ("max", "min", "soft", "union", "shape")
    assert EXTRA_RULES == ("geometric", "majority", "weighted", "staple")
    assert set(ALL_METHODS) <= set(RULE_NAMES)
    assert RULE_NAMES["shape"] == "Shape averaging"


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(prob_stacks(), thresholds)
def test_min_within_soft_within_max_and_every_mask_within_union(probs, threshold):
    low, mid, high = (combine(probs, method, threshold) for method in ("min", "soft", "max"))
    union = combine(probs, "union", threshold)
    assert not (low & ~mid).any()
    assert not (mid & ~high).any()
    assert not ((probs > threshold) & ~union).any()
    np.testing.assert_array_equal(union, high)


@settings(max_examples=60, deadline=None)
@given(prob_stacks(), thresholds)
def test_vote_based_rules_lie_between_intersection_and_union(probs, threshold):
    masks = probs > threshold
    for method in ("shape", "majority"):
        mask = combine(probs, method, threshold)
        assert not (masks.all(axis=0) & ~mask).any(), method
        assert not (mask & ~masks.any(axis=0)).any(), method


@settings(max_examples=60, deadline=None)
@given(st.data(), prob_stacks(), thresholds)
def test_order_of_models_does_not_matter(data, probs, threshold):
    order = data.draw(st.permutations(range(len(probs))))
    weights = data.draw(integer_weights(len(probs)))
    for method in ALL_METHODS:
        w = weights if method == "weighted" else None
        w_reordered = weights[order] if method == "weighted" else None
        np.testing.assert_array_equal(
            combine(probs, method, threshold, w), combine(probs[order], method, threshold, w_reordered), method
        )


@settings(max_examples=60, deadline=None)
@given(prob_stacks(max_models=1), thresholds)
def test_a_single_model_gives_its_own_mask(probs, threshold):
    for method in ALL_METHODS:
        np.testing.assert_array_equal(
            combine(probs, method, threshold, weights_for(method, 1)), probs[0] > threshold, method
        )


@settings(max_examples=30, deadline=None)
@given(prob_stacks(images=True), thresholds)
def test_a_batch_is_combined_image_by_image(probs, threshold):
    for method in ALL_METHODS:
        batch = combine(probs, method, threshold, weights_for(method, len(probs)))
        assert batch.shape == probs.shape[1:] and batch.dtype == bool
        for image in range(probs.shape[1]):
            np.testing.assert_array_equal(
                batch[image], combine(probs[:, image], method, threshold, weights_for(method, len(probs))), method
            )


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(bool, st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 9))))
def test_shape_averaging_matches_its_definition(masks):
    total = shape_average_by_definition(masks)
    decided = np.abs(total) > 1e-6
    result = combine(masks.astype(float), "shape")
    np.testing.assert_array_equal(result[decided], total[decided] > 0)


@settings(max_examples=60, deadline=None)
@given(st.data(), prob_stacks(), thresholds)
def test_equal_weights_are_soft_voting(data, probs, threshold):
    weight = data.draw(st.integers(1, 7))
    np.testing.assert_array_equal(
        combine(probs, "weighted", threshold, np.full(len(probs), weight)), combine(probs, "soft", threshold)
    )


# --- hand-computed examples -------------------------------------------------------------------

ROW = np.array([[[0.2, 0.6, 0.9]], [[0.7, 0.4, 0.3]]])  # two models, one 1x3 image


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("max", [True, True, True]),  # max 0.7 0.6 0.9
        ("min", [False, False, False]),  # min 0.2 0.4 0.3
        ("soft", [False, False, True]),  # mean 0.45 0.5 0.6: 0.5 is not above 0.5
        ("union", [True, True, True]),
        ("majority", [False, False, False]),  # one vote of two is a tie
    ],
)
def test_rules_on_a_row(method, expected):
    np.testing.assert_array_equal(combine(ROW, method), [expected])


def test_shape_averaging_of_two_overlapping_intervals_gives_the_midway_interval():
    # [2, 10) and [6, 14) on a 1x20 row: at x = 4 the signed distances are +3 and -2, at x = 3
    # +2 and -3; symmetrically at 11 and 12. The average interval is [4, 12).
    masks = np.zeros((2, 1, 20))
    masks[0, 0, 2:10] = 1
    masks[1, 0, 6:14] = 1
    np.testing.assert_array_equal(np.flatnonzero(combine(masks, "shape")), np.arange(4, 12))


def test_shape_averaging_of_two_offset_discs():
    # Discs of radius 8 centred 8 px apart on row 20. Along that row the result is the midway
    # interval, as for intervals; on the bisector both signed distances are equal, so there it is
    # the overlap of the discs. Not a disc, then, but a lens-like shape, mirror-symmetric.
    rows, cols = np.mgrid[:41, :41]
    discs = np.stack([(rows - 20) ** 2 + (cols - centre) ** 2 <= 8**2 for centre in (16, 24)])
    result = combine(discs.astype(float), "shape")
    np.testing.assert_array_equal(np.flatnonzero(result[20]), np.arange(12, 29))
    np.testing.assert_array_equal(result[:, 20], discs.all(axis=0)[:, 20])
    np.testing.assert_array_equal(result, np.fliplr(result))
    np.testing.assert_array_equal(result, np.flipud(result))


def test_shape_averaging_with_an_empty_or_full_model():
    square = np.zeros((10, 10))
    square[2:8, 2:8] = 1
    empty, full = np.zeros((10, 10)), np.ones((10, 10))
    # An empty model votes -(H + W) = -20 everywhere, more than any distance in the image.
    assert not combine(np.stack([square, empty]), "shape").any()
    assert not combine(np.stack([square, square, empty]), "shape").any()
    assert combine(np.stack([square, full]), "shape").all()
    # Alone, an empty or full model gives back its own mask.
    assert not combine(empty[None], "shape").any()
    assert combine(full[None], "shape").all()
    # Two empty against three identical squares: 3 * 3 - 2 * 20 < 0 even at the centre.
    assert not combine(np.stack([square] * 3 + [empty] * 2), "shape").any()


@pytest.mark.parametrize(("votes", "expected"), [(1, False), (2, False), (3, True), (4, True)])
def test_majority_of_four_needs_three_votes(votes, expected):
    probs = np.zeros((4, 1, 1))
    probs[:votes] = 0.9
    assert combine(probs, "majority")[0, 0] == expected


def test_geometric_mean_with_a_zero_is_zero_without_warnings():
    probs = np.array([[[0.0, 0.25, 0.36]], [[1.0, 1.0, 1.0]]])  # geometric means 0, 0.5, 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(combine(probs, "geometric"), [[False, False, True]])
        assert not combine(probs, "geometric", threshold=0.0)[0, 0]


def test_weighted_voting():
    probs = np.array([[[0.8, 0.6, 0.9]], [[0.0, 0.2, 0.1]]])
    # weights 3:1 -> 0.6, 0.5, 0.7
    np.testing.assert_array_equal(combine(probs, "weighted", weights=[3, 1]), [[True, False, True]])
    np.testing.assert_array_equal(combine(probs, "weighted", weights=[0, 2]), [[False, False, False]])


def test_staple():
    a = np.zeros((6, 6))
    a[1:4, 1:4] = 1
    b = np.zeros((6, 6))
    b[2:5, 2:5] = 1
    for identical in (a, np.zeros((6, 6)), np.ones((6, 6))):
        np.testing.assert_array_equal(combine(np.stack([identical] * 3), "staple"), identical > 0.5)
    # Two raters agreeing against one: STAPLE trusts the pair fully and returns their mask.
    np.testing.assert_array_equal(combine(np.stack([a, b, b]), "staple"), b > 0.5)
    # The threshold binarises the inputs only.
    np.testing.assert_array_equal(combine(np.stack([a, b, b]) * 0.6, "staple", threshold=0.55), b > 0.5)


# --- threshold tuning, leave-one-out, stacking ------------------------------------------------


def test_tune_threshold_finds_the_gap_between_classes():
    targets = np.zeros((2, 4, 4), dtype=bool)
    targets[:, :2] = True
    probs = np.where(targets, 0.7, 0.3)[None].copy()
    probs[0, :, 3, 3] = 0.62  # background pixels that only thresholds from 0.62 on reject
    best, table = tune_threshold(probs, targets)
    assert best == 0.65
    assert list(table.columns) == ["threshold", "mean_dsc"]
    assert len(table) == 19
    assert table["mean_dsc"].max() == 1.0


@pytest.mark.parametrize(("background", "expected"), [(0.2, 0.5), (0.6, 0.6)])
def test_tune_threshold_breaks_ties_towards_one_half(background, expected):
    targets = np.zeros((1, 4, 4), dtype=bool)
    targets[:, :2] = True
    probs = np.where(targets, 0.9, background)[None]
    best, _ = tune_threshold(probs, targets)
    assert best == expected


def test_leave_one_out_finds_the_harmful_model():
    targets = np.zeros((3, 8, 8), dtype=bool)
    targets[:, 2:6, 2:6] = True
    good = np.where(targets, 0.9, 0.1)
    inverted = 1 - good
    probs = np.stack([good, good, inverted])
    table = leave_one_out(probs, targets, ["a", "b", "bad"], method="union")
    assert list(table.columns) == ["removed", "mean_dsc", "delta_dsc"]
    assert list(table["removed"]) == ["(none)", "a", "b", "bad"]
    assert table["delta_dsc"].iloc[0] == 0
    assert table.set_index("removed").loc["bad", "mean_dsc"] == 1.0
    assert table.set_index("removed").loc["bad", "delta_dsc"] > 0.5
    assert (table["delta_dsc"].iloc[1:3] == 0).all()


def test_leave_one_out_drops_the_weight_of_the_removed_model():
    targets = np.zeros((1, 4, 4), dtype=bool)
    targets[:, :2] = True
    good = np.where(targets, 0.9, 0.1)
    probs = np.stack([good, 1 - good, good])
    table = leave_one_out(probs, targets, ["a", "bad", "c"], method="weighted", weights=[1, 5, 1])
    assert table.set_index("removed").loc["bad", "mean_dsc"] == 1.0
    assert table.set_index("removed").loc["(none)", "mean_dsc"] == 0.0


def blob_targets(rng: np.random.Generator, n_images: int = 4, size: int = 32) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    centres = rng.uniform(10, 22, size=(n_images, 2))
    return np.stack([(rows - r) ** 2 + (cols - c) ** 2 < 8**2 for r, c in centres])


def test_stacker_ignores_a_noise_model():
    rng = np.random.default_rng(0)
    targets = blob_targets(rng)
    good = np.clip(np.where(targets, 0.75, 0.25) + rng.normal(0, 0.1, targets.shape), 0, 1)
    noise = rng.uniform(0, 1, targets.shape)
    probs = np.stack([good, noise])
    stacker = fit_stacker(probs, targets)
    assert abs(stacker.coef_[1]) < 0.1 * abs(stacker.coef_[0])
    predicted = stacker.predict_proba(probs) > 0.5
    dice = 2 * (predicted & targets).sum() / (predicted.sum() + targets.sum())
    assert dice > 0.95
    assert stacker.predict_proba(probs[:, 0]).shape == targets.shape[1:]


def test_stacker_round_trips_through_json_and_is_reproducible():
    rng = np.random.default_rng(1)
    targets = blob_targets(rng)
    probs = np.stack([np.clip(targets + rng.normal(0, 0.3, targets.shape), 0, 1) for _ in range(3)])
    stacker = fit_stacker(probs, targets, max_pixels=1000, seed=3)
    again = fit_stacker(probs, targets, max_pixels=1000, seed=3)
    np.testing.assert_array_equal(stacker.coef_, again.coef_)
    restored = Stacker.from_dict(json.loads(json.dumps(stacker.to_dict())))
    np.testing.assert_allclose(restored.predict_proba(probs), stacker.predict_proba(probs))
    with pytest.raises(ValueError, match="fitted on 3 models, got 2"):
        stacker.predict_proba(probs[:2])


# --- bad input --------------------------------------------------------------------------------

GOOD = np.full((2, 3, 3), 0.5)


@pytest.mark.parametrize(
    ("probs", "kwargs", "message"),
    [
        (np.zeros((3, 3)), {}, r"\[M, H, W\] \(one image\) or \[M, N, H, W\]"),
        (np.zeros((1, 1, 1, 3, 3)), {}, r"\[M, H, W\] \(one image\) or \[M, N, H, W\]"),
        (np.zeros((0, 3, 3)), {}, r"M = 0"),
        (GOOD + 0.6, {}, r"\[0, 1\]"),
        (GOOD - 0.6, {}, r"\[0, 1\]"),
        (np.where(np.eye(3, dtype=bool), np.nan, GOOD), {}, "NaN"),
        (np.full((2, 3, 3), "a"), {}, "numeric"),
        (GOOD, {"threshold": -0.1}, "threshold"),
        (GOOD, {"threshold": 1.5}, "threshold"),
        (GOOD, {"threshold": np.nan}, "threshold"),
        (GOOD, {"method": "mean"}, "unknown ensemble method 'mean'; known: max, min, soft, union, shape, geometric"),
        (GOOD, {"method": "weighted"}, "needs weights"),
        (GOOD, {"method": "weighted", "weights": [1, 2, 3]}, "one weight per model"),
        (GOOD, {"method": "weighted", "weights": [1, -1]}, "non-negative"),
        (GOOD, {"method": "weighted", "weights": [0, 0]}, "not all zero"),
        (GOOD, {"method": "soft", "weights": [1, 1]}, "only to method 'weighted'"),
    ],
)
def test_combine_refuses_bad_input(probs, kwargs, message):
    kwargs = {"method": "soft", **kwargs}
    with pytest.raises(ValueError, match=message):
        combine(probs, **kwargs)


def test_tuning_leave_one_out_and_stacking_refuse_bad_input():
    probs = np.full((2, 1, 3, 3), 0.5)
    targets = np.zeros((1, 3, 3), dtype=bool)
    for call in (
        lambda: tune_threshold(probs[:, 0], targets[0]),
        lambda: fit_stacker(probs[:, 0], targets[0]),
    ):
        with pytest.raises(ValueError, match=r"\[M, N, H, W\] here"):
            call()
    with pytest.raises(ValueError, match="targets must be"):
        tune_threshold(probs, targets[:, :2])
    with pytest.raises(ValueError, match="binary"):
        fit_stacker(probs, targets + 0.5)
    with pytest.raises(ValueError, match="grid of thresholds is empty"):
        tune_threshold(probs, targets, grid=[])
    with pytest.raises(ValueError, match="threshold"):
        tune_threshold(probs, targets, grid=[0.5, 2.0])
    with pytest.raises(ValueError, match="3 names for 2 models"):
        leave_one_out(probs, targets, ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least 2 models"):
        leave_one_out(probs[:1], targets, ["a"])


def test_float16_maps_are_pooled_in_float32():
    # 3 maps whose exact mean is just above T = 0.5, but whose float16 mean rounds down onto it
    probs = np.array([0.5, 0.5, 0.5005], dtype=np.float16)[:, None, None]
    assert not probs.mean(axis=0)[0, 0] > 0.5 and probs.astype(np.float32).mean(axis=0)[0, 0] > 0.5
    assert combine(probs, "soft", 0.5)[0, 0]


@pytest.mark.parametrize("probs, threshold, message", [
    (np.zeros((2, 0, 4, 4)), 0.5, r"no images to combine \(N = 0\)"),
    (np.zeros((2, 3, 4)), None, "threshold must be a number in \\[0, 1\\], got None"),
    (np.zeros((2, 4)), 0.5, r"\[M, H, W\] \(one image\) or \[M, N, H, W\]"),
])
@pytest.mark.parametrize("method", ["soft", "shape", "staple"])
def test_bad_inputs_get_one_clear_message(probs, threshold, message, method):
    with pytest.raises(ValueError, match=message):
        combine(probs, method, threshold)


def test_disagreement_is_zero_when_members_agree_and_grows_with_their_spread():
    from spineseg.ensemble import disagreement

    agree = np.zeros((3, 8, 8))
    agree[:, 2:6, 2:6] = 0.9
    spread, score = disagreement(agree)
    assert spread.shape == (8, 8) and score == 0.0
    split = agree.copy()
    split[0, 2:6, 2:6] = 0.1  # one member sees nothing there
    _, score_split = disagreement(split)
    assert score_split == pytest.approx(np.std([0.1, 0.9, 0.9]))
    maps, scores = disagreement(np.stack([agree, split], axis=1))  # [M, N, H, W]
    assert maps.shape == (2, 8, 8) and scores.tolist() == pytest.approx([0.0, score_split])
    assert disagreement(np.zeros((2, 4, 4)))[1] == 0.0  # nobody sees anything: nothing to disagree on
