"""Per-image metrics: exact values on a hand-counted example, the empty-mask conventions,
F1 = DSC per image, batch bookkeeping and input checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spineseg.metrics import METRICS, confusion, dice, per_image

# 4 × 4 masks counted by hand:
#   target      prediction
#   1 1 0 0     1 0 0 0
#   1 1 0 0     1 1 1 0
#   0 0 0 0     0 0 1 0
#   0 0 0 1     0 0 0 0
# TP = 3 (0,0) (1,0) (1,1); FN = 2 (0,1) (3,3); FP = 2 (1,2) (2,2); TN = 16 - 7 = 9
TARGET = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.uint8)
PRED = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)


def test_confusion_counts_match_hand_count():
    tp, fp, fn, tn = confusion(PRED, TARGET)
    assert (tp.tolist(), fp.tolist(), fn.tolist(), tn.tolist()) == ([3], [2], [2], [9])


def test_all_seven_metrics_on_hand_counted_example():
    row = per_image(PRED, TARGET).iloc[0]
    tp, fp, fn, tn = 3, 2, 2, 9
    expected = {
        "iou": tp / (tp + fp + fn),  # 3/7
        "dsc": 2 * tp / (2 * tp + fp + fn),  # 6/10
        "recall": tp / (tp + fn),  # 3/5
        "specificity": tn / (tn + fp),  # 9/11
        "precision": tp / (tp + fp),  # 3/5
        "f1": 0.6,
        "pa": (tp + tn) / 16,  # 12/16
    }
    assert list(per_image(PRED, TARGET).columns) == list(METRICS)
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, abs=1e-12), name
    assert row["iou"] == pytest.approx(3 / 7) and row["specificity"] == pytest.approx(9 / 11)
    assert row["pa"] == pytest.approx(0.75)


def test_metrics_are_not_symmetric_in_prediction_and_target():
    # swapping arguments swaps FP and FN: recall and precision trade places
    pred = np.zeros((4, 4), np.uint8)
    pred[:2, :2] = 1
    target = np.zeros((4, 4), np.uint8)
    target[:2, :] = 1
    row = per_image(pred, target).iloc[0]
    assert row["precision"] == 1.0 and row["recall"] == 0.5
    swapped = per_image(target, pred).iloc[0]
    assert swapped["precision"] == 0.5 and swapped["recall"] == 1.0


def test_probabilities_and_bools_are_thresholded_at_half():
    probs = np.where(PRED == 1, 0.7, 0.3).astype(np.float32)
    np.testing.assert_allclose(per_image(probs, TARGET).to_numpy(), per_image(PRED.astype(bool), TARGET.astype(bool)).to_numpy())


def test_empty_target_and_empty_prediction_score_one_everywhere():
    empty = np.zeros((5, 6), dtype=np.uint8)
    row = per_image(empty, empty).iloc[0]
    assert all(row[m] == 1.0 for m in METRICS), row.to_dict()


def test_empty_target_with_false_positives():
    target = np.zeros((5, 6), dtype=np.uint8)
    pred = target.copy()
    pred[1, 2] = pred[3, 3] = 1
    row = per_image(pred, target).iloc[0]
    assert row["iou"] == 0.0 and row["dsc"] == 0.0 and row["precision"] == 0.0 and row["f1"] == 0.0
    assert row["recall"] == 1.0
    assert row["specificity"] == pytest.approx(28 / 30) and row["pa"] == pytest.approx(28 / 30)


def test_missed_target_with_empty_prediction():
    target = np.zeros((5, 6), dtype=np.uint8)
    target[0, :3] = 1
    pred = np.zeros_like(target)
    row = per_image(pred, target).iloc[0]
    assert row["iou"] == 0.0 and row["dsc"] == 0.0 and row["recall"] == 0.0 and row["f1"] == 0.0
    assert row["precision"] == 1.0 and row["specificity"] == 1.0
    assert row["pa"] == pytest.approx(27 / 30)


def test_perfect_prediction_scores_one():
    row = per_image(TARGET, TARGET).iloc[0]
    assert all(row[m] == pytest.approx(1.0) for m in METRICS)


masks = hnp.arrays(np.bool_, st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_f1_equals_dsc_per_image(data):
    target = data.draw(masks)
    pred = data.draw(hnp.arrays(np.bool_, target.shape))
    frame = per_image(pred, target)
    np.testing.assert_allclose(frame["f1"], frame["dsc"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dice(pred, target), frame["dsc"], rtol=0, atol=0)
    # DSC and IoU are tied: DSC = 2 IoU / (1 + IoU)
    np.testing.assert_allclose(frame["dsc"], 2 * frame["iou"] / (1 + frame["iou"]), atol=1e-12)
    assert ((frame.to_numpy() >= 0) & (frame.to_numpy() <= 1)).all()


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_confusion_partitions_every_pixel(data):
    target = data.draw(masks)
    pred = data.draw(hnp.arrays(np.bool_, target.shape))
    tp, fp, fn, tn = confusion(pred, target)
    np.testing.assert_array_equal(tp + fp + fn + tn, np.full(len(target), target[0].size))
    np.testing.assert_array_equal(tp, (pred & target).sum(axis=(1, 2)))
    np.testing.assert_array_equal(fp, (pred & ~target).sum(axis=(1, 2)))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        per_image(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))


def test_wrong_rank_raises():
    with pytest.raises(ValueError):
        per_image(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)))


def test_batch_gives_one_row_per_image_in_order():
    rng = np.random.default_rng(0)
    target = rng.random((6, 8, 8)) > 0.5
    pred = rng.random((6, 8, 8)) > 0.5
    pred[2] = target[2]  # a perfect one in the middle
    pred[4] = False
    frame = per_image(pred, target)
    assert len(frame) == 6
    for i in range(6):
        single = per_image(pred[i], target[i]).iloc[0]
        np.testing.assert_allclose(frame.iloc[i].to_numpy(), single.to_numpy())
    assert frame.iloc[2]["dsc"] == 1.0 and frame.iloc[4]["dsc"] == 0.0
    assert (frame["dsc"].drop([2, 4]) < 1).all()


def test_dice_matches_per_image_dsc_on_batch():
    rng = np.random.default_rng(1)
    target = rng.random((5, 16, 16)) > 0.6
    pred = target ^ (rng.random((5, 16, 16)) > 0.85)
    pred[0] = target[0] = False
    d = dice(pred, target)
    assert d.shape == (5,)
    np.testing.assert_array_equal(d, per_image(pred, target)["dsc"].to_numpy())
    assert d[0] == 1.0


def test_confusion_counts_agree_with_smp_get_stats():
    """The counts are numpy sums; segmentation-models-pytorch's get_stats is the reference."""
    import torch
    from segmentation_models_pytorch import metrics as smp_metrics

    rng = np.random.default_rng(7)
    pred, target = rng.random((6, 17, 23)) > 0.6, rng.random((6, 17, 23)) > 0.8
    ours = confusion(pred, target)
    theirs = smp_metrics.get_stats(torch.from_numpy(pred).long()[:, None], torch.from_numpy(target).long()[:, None], mode="binary")
    for mine, reference in zip(ours, theirs):
        np.testing.assert_array_equal(mine, reference[:, 0].numpy())


def test_nan_in_a_mask_is_an_error_not_a_silent_zero():
    target = np.zeros((1, 4, 4))
    pred = target.copy()
    pred[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="prediction contains NaN"):
        per_image(pred, target)


def test_f1_as_scikit_learn_1_3_scored_it_on_constructed_cases():
    from spineseg.metrics import f1_as_scikit_learn_1_3

    target = np.zeros((5, 4, 4), bool)
    pred = np.zeros((5, 4, 4), bool)
    target[0, :2], pred[0, 2:] = True, True  # TP = 0, FP > 0, FN > 0: misplaced -> 1.0 in scikit-learn 1.3.0
    target[1, :2] = True  # nothing predicted: TP = FP = 0, FN > 0 -> 0.0 (1.3.0 agreed)
    pred[2, :2] = True  # nothing to find: FN = 0, FP > 0 -> 0.0
    target[3, :2], pred[3, :1] = True, True  # a partial hit: its usual F1 = DSC = 2/3
    # image 4: both empty -> 1.0 by this project's convention (and zero_division=1)
    frame = per_image(pred, target)
    np.testing.assert_allclose(f1_as_scikit_learn_1_3(frame), [1.0, 0.0, 0.0, 2 / 3, 1.0])
    np.testing.assert_allclose(frame["f1"], [0.0, 0.0, 0.0, 2 / 3, 1.0])


def test_average_precision_matches_its_definition_on_constructed_maps():
    from spineseg.metrics import average_precision

    truth = np.array([[1, 0, 1, 0]], dtype=bool)
    perfect = np.array([[0.9, 0.1, 0.8, 0.2]])
    assert average_precision(perfect, truth)[0] == pytest.approx(1.0)
    # ranks: 0.9 (hit), 0.8 (miss), 0.7 (hit), 0.1 (miss) -> precision at the hits 1 and 2/3
    mixed = np.array([[0.9, 0.8, 0.7, 0.1]])
    assert average_precision(mixed, np.array([[1, 1, 0, 0]], bool)[:, [0, 2, 1, 3]])[0] == pytest.approx((1 + 2 / 3) / 2)
    # ties are one threshold: all four at 0.5 -> precision 2/4 at recall 1
    assert average_precision(np.full((1, 4), 0.5), truth)[0] == pytest.approx(0.5)
    assert np.isnan(average_precision(perfect, np.zeros_like(truth))[0])
