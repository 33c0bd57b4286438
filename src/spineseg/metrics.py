"""Per-image segmentation metrics from TP/FP/FN/TN, as in the paper.

Convention for empty masks: a ratio whose denominator is zero is 1.0 — there was nothing to get
wrong for that quantity. So an empty prediction of an empty target scores 1 on every metric, while
a non-empty prediction of an empty target scores IoU = DSC = precision = 0 (and recall = 1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spineseg.names import METRICS

__all__ = ["ARTICLE_THRESHOLD", "METRICS", "average_precision", "confusion", "dice", "f1_as_scikit_learn_1_3", "per_image"]

# The article's T: one model's mask is where its probability passes it, everywhere (Tables 1–7, early stopping,
# the best single model); the ensembles' T is a setting of their own (`stage4.threshold`, this by default), so
# that changing it never rescores a single model.
ARTICLE_THRESHOLD = 0.5


def _binary(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.dtype == bool:
        return masks
    if masks.dtype.kind == "f" and np.isnan(masks).any():
        raise ValueError(f"{name} contains NaN")
    return masks > 0.5


def confusion(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
    """TP, FP, FN, TN per image (int64) for binary masks of shape [N, H, W] (or one [H, W])."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.ndim != 3:
        raise ValueError(f"masks must be [H, W] or [N, H, W], got shape {pred.shape}")
    pred, target = _binary(pred, "prediction"), _binary(target, "target")
    axes = (1, 2)
    tp = np.count_nonzero(pred & target, axis=axes)
    fp = np.count_nonzero(pred & ~target, axis=axes)
    fn = np.count_nonzero(~pred & target, axis=axes)
    tn = pred[0].size - tp - fp - fn
    return tuple(x.astype(np.int64) for x in (tp, fp, fn, tn))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    safe = np.where(den == 0, 1, den)
    return np.where(den == 0, 1.0, num / safe)


def per_image(pred: np.ndarray, target: np.ndarray) -> pd.DataFrame:
    """One row per image with the seven metrics as fractions in [0, 1]."""
    tp, fp, fn, tn = (x.astype(np.float64) for x in confusion(pred, target))
    recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return pd.DataFrame({
        "iou": _ratio(tp, tp + fp + fn),
        "dsc": _ratio(2 * tp, 2 * tp + fp + fn),
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        # from its own formula 2PR/(P+R): equal to DSC per image, which the tests check
        "f1": np.where(precision + recall == 0, 0.0, 2 * precision * recall / np.maximum(precision + recall, 1e-300)),
        "pa": _ratio(tp + tn, tp + tn + fp + fn),
    })[list(METRICS)]


def dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image DSC alone — the early-stopping, selection and tuning criterion; 1.0 where both are empty."""
    tp, fp, fn, _ = (x.astype(np.float64) for x in confusion(pred, target))
    return _ratio(2 * tp, 2 * tp + fp + fn)


def f1_as_scikit_learn_1_3(metrics: pd.DataFrame) -> pd.Series:
    """Per-image F1 as ``f1_score(..., zero_division=1)`` of scikit-learn 1.3.0 scored it.

    That release returned 1 whenever precision and recall were both 0, i.e. on images with TP = 0
    and both FP > 0 and FN > 0 (a prediction entirely in the wrong place), where F1 is 0
    (scikit-learn issues #26864 and #26965). A plausible source of the article's F1 ≠ DSC for failing
    backbones (Tables 2–3); computed from the per-image table, whose conventions identify those images.
    """
    misplaced = (metrics["dsc"] == 0) & (metrics["precision"] == 0) & (metrics["recall"] == 0)
    return metrics["f1"].where(~misplaced, 1.0)


def average_precision(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image average precision of a probability map's pixels against the mask: the area under the
    precision–recall curve as scikit-learn computes it (sum over distinct thresholds of the recall gained
    times the precision there); NaN for an image with no true pixel."""
    probs, target = np.asarray(probs, dtype=np.float64), _binary(np.asarray(target), "target")
    if probs.shape != target.shape:
        raise ValueError(f"probabilities {probs.shape} and target {target.shape} differ in shape")
    if probs.ndim == 2:
        probs, target = probs[None], target[None]
    out = np.full(len(probs), np.nan)
    for k, (scores, truth) in enumerate(zip(probs.reshape(len(probs), -1), target.reshape(len(target), -1))):
        positives = truth.sum()
        if positives == 0:
            continue
        order = np.argsort(-scores, kind="stable")
        scores, truth = scores[order], truth[order]
        last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
        hits = np.cumsum(truth)[last_of_tie]
        precision, recall = hits / (last_of_tie + 1), hits / positives
        out[k] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return out
