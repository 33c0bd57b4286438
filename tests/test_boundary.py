from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from spineseg.boundary import boundary_metrics


def canvas(height: int = 20, width: int = 20) -> np.ndarray:
    return np.zeros((height, width), dtype=bool)


def metrics(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    row = boundary_metrics(a[None], b[None]).iloc[0]
    return row["hd95"], row["assd"]


def test_identical_masks_are_at_distance_zero():
    square = canvas()
    square[4:14, 4:14] = True
    assert metrics(square, square) == (0.0, 0.0)


def test_square_shifted_by_three_pixels():
    # 10x10 square against itself shifted 3 px right; its 36 surface pixels are at distances
    # top and bottom rows: 3, 2, 1 and seven 0s each; left column inside: eight 3s;
    # right column inside: 1, 2, 3, 3, 3, 3, 2, 1 (the shifted top/bottom rows are nearer).
    # Sum 54 over 36 pixels: ASSD 1.5; the 95th percentile falls among the fourteen 3s: HD95 3.
    # The other direction mirrors this one.
    square, shifted = canvas(), canvas()
    square[5:15, 3:13] = True
    shifted[5:15, 6:16] = True
    assert metrics(square, shifted) == pytest.approx((3.0, 1.5))


def test_single_pixels():
    a, b = canvas(), canvas()
    a[10, 4] = True
    b[13, 8] = True
    assert metrics(a, b) == pytest.approx((5.0, 5.0))


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    # a = {p}, b = {p, q} with q 10 px away: a->b = [0], b->a = [0, 10].
    # Directed 95th percentiles 0 and 9.5 -> HD95 9.5 (pooled [0, 0, 10] would give 9.0).
    # ASSD pools all three distances: 10 / 3.
    a, b = canvas(), canvas()
    a[10, 5] = True
    b[10, 5] = b[10, 15] = True
    assert metrics(a, b) == pytest.approx((9.5, 10 / 3))


def test_empty_masks():
    blob = canvas()
    blob[3:6, 3:6] = True
    assert metrics(canvas(), canvas()) == (0.0, 0.0)
    assert np.isnan(metrics(blob, canvas())).all()
    assert np.isnan(metrics(canvas(), blob)).all()


def test_one_row_per_image_and_integer_masks():
    pred = np.zeros((3, 8, 8), dtype=np.uint8)
    target = np.zeros((3, 8, 8), dtype=np.uint8)
    pred[0, 2:5, 2:5] = target[0, 2:5, 2:5] = 1
    pred[1, 2, 2] = 1
    target[1, 2, 5] = 1
    table = boundary_metrics(pred, target)
    assert list(table.columns) == ["hd95", "assd"]
    assert len(table) == 3
    np.testing.assert_allclose(table.to_numpy(), [[0, 0], [3, 3], [0, 0]])


masks = hnp.arrays(bool, (2, 7, 7))


@settings(max_examples=50, deadline=None)
@given(masks)
def test_symmetric_in_its_arguments(pair):
    a, b = pair
    np.testing.assert_allclose(metrics(a, b), metrics(b, a))


@settings(max_examples=50, deadline=None)
@given(masks)
def test_within_the_image_diagonal_and_nan_only_when_one_mask_is_empty(pair):
    a, b = pair
    values = np.array(metrics(a, b))
    if a.any() != b.any():
        assert np.isnan(values).all()
    else:
        assert ((values >= 0) & (values <= np.hypot(7, 7))).all()


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 4)), r"\[N, H, W\]"),
        (np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4)), "binary"),
        (np.zeros((1, 4, 4)), np.zeros((2, 4, 4)), "shape"),
    ],
)
def test_bad_input(pred, target, message):
    with pytest.raises(ValueError, match=message):
        boundary_metrics(pred, target)
