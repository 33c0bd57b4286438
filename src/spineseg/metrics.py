"""Per-image segmentation metrics from TP/FP/FN/TN, as in the paper.

Convention for empty masks: a ratio whose denominator is zero is 1.0 — there was nothing to get
wrong for that quantity. So an empty prediction of an empty target scores 1 on every metric, while
a non-empty prediction of an empty target scores IoU = DSC = precision = 0 (and recall = 1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from segmentation_models_pytorch import metrics as smp_metrics

METRICS = ("iou", "dsc", "recall", "specificity", "precision", "f1", "pa")
PAPER_LABELS = {"iou": "IoU", "dsc": "DSC", "recall": "Recall", "specificity": "Specificity",
                "precision": "Precision", "f1": "F1", "pa": "PA"}


def confusion(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
    """TP, FP, FN, TN per image for binary masks of shape [N, H, W] (or one [H, W])."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.ndim != 3:
        raise ValueError(f"masks must be [H, W] or [N, H, W], got shape {pred.shape}")
    p = torch.from_numpy(np.ascontiguousarray(pred > 0.5 if pred.dtype != bool else pred)).long()[:, None]
    t = torch.from_numpy(np.ascontiguousarray(target > 0.5 if target.dtype != bool else target)).long()[:, None]
    tp, fp, fn, tn = smp_metrics.get_stats(p, t, mode="binary")
    return tuple(x[:, 0].numpy().astype(np.int64) for x in (tp, fp, fn, tn))


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
    })


def dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image DSC alone — the early-stopping and selection criterion."""
    tp, fp, fn, _ = (x.astype(np.float64) for x in confusion(pred, target))
    return _ratio(2 * tp, 2 * tp + fp + fn)
