"""Did a prediction find the right four vertebrae? Identification measures against a level label map.

- *identified*: the set of labelled levels covered at least half by the predicted Th8–Th11 mask is
  exactly {Th8, Th9, Th10, Th11};
- *shift*: the mean level of the labelled vertebrae the prediction covers, each weighted by the share
  of that vertebra it covers, minus the region's own mean (9.5): +1 is one vertebra too low, −1 one too
  high. Weighting by vertebra, not by pixel, makes it unbiased: lower vertebrae are larger, and the
  pixel-weighted mean scored a perfect prediction +0.11 on average on the AASCE labels; now a perfect
  prediction is exactly 0, a Th7–Th10 mask −1 and a Th9–Th12 mask +1 on any label map;
- *per-level DSC*: each predicted pixel is given to the labelled vertebra nearest to it, so a binary
  prediction is scored level by level too;
- for level-aware predictions, the per-vertebra *label accuracy* over all 17 levels and the panoptic
  quality PQ = SQ × RQ (a predicted level matches the true one at IoU > 0.5), VertXNet's measure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from spineseg.vertebrae import IGNORE, N_LEVELS, NAMES, REGION, REGION_CODES

COVERED = 0.5
PQ_MATCH_IOU = 0.5
SHIFT_CLASSES = (-2, -1, 0, 1, 2)  # the histogram's bins; beyond ±2 counts as ±2


def _levels_present(labels: np.ndarray) -> list[int]:
    return [int(code) for code in np.unique(labels) if 1 <= code <= N_LEVELS]


def identify(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Identification of one predicted Th8–Th11 mask [H, W] against its label map [H, W]."""
    pred, labels = np.asarray(pred, dtype=bool), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"prediction {pred.shape} and label map {labels.shape} differ in shape")
    present = _levels_present(labels)
    coverage = {code: (pred & (labels == code)).sum() / (labels == code).sum() for code in present}
    covered = {code for code, share in coverage.items() if share >= COVERED}
    total = sum(coverage.values())
    mean_level = sum(code * share for code, share in coverage.items()) / total if total else np.nan
    shift = float(mean_level - np.mean(REGION_CODES))
    row = {"identified": covered == set(REGION_CODES), "shift": shift,
           "levels_covered": ",".join(NAMES[c] for c in sorted(covered))}
    nearest = _nearest_level(labels, present)
    for code, name in zip(REGION_CODES, REGION):
        truth, given = labels == code, pred & (nearest == code)
        total = truth.sum() + given.sum()
        row[f"dsc_{name}"] = float(2 * (truth & given).sum() / total) if total else 1.0
    return row


def _nearest_level(labels: np.ndarray, present: list[int]) -> np.ndarray:
    """Each pixel's nearest labelled vertebra (its own level on vertebrae)."""
    vertebrae = np.isin(labels, present)
    if not vertebrae.any():
        return np.zeros_like(labels)
    _, (rows, cols) = ndimage.distance_transform_edt(~vertebrae, return_indices=True)
    return labels[rows, cols]


def identification_table(preds: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """`identify` for every image of [N, H, W] predictions and label maps."""
    return pd.DataFrame([identify(p, lab) for p, lab in zip(preds, labels)])


def shift_class(shift: float) -> float:
    """The histogram bin of a shift: the nearest whole vertebra, clipped to ±2."""
    nearest = np.sign(shift) * np.floor(abs(shift) + 0.5)  # halves away from zero, on both sides alike
    return float(np.clip(nearest, SHIFT_CLASSES[0], SHIFT_CLASSES[-1])) if np.isfinite(shift) else np.nan


def level_accuracy(pred_levels: np.ndarray, labels: np.ndarray) -> float:
    """The share of labelled vertebrae (all 17 levels) whose pixels mostly carry their own predicted level."""
    hits, total = 0, 0
    for code in _levels_present(labels):
        predicted = pred_levels[labels == code]
        hits += int(np.bincount(predicted, minlength=IGNORE + 1).argmax() == code)
        total += 1
    return hits / total if total else np.nan


def panoptic_quality(pred_levels: np.ndarray, labels: np.ndarray) -> dict:
    """PQ = SQ × RQ over the 17 levels: each predicted level is one segment, matched to the same true level."""
    known = labels != IGNORE
    true_levels, pred_present = set(_levels_present(labels)), set(_levels_present(np.where(known, pred_levels, 0)))
    ious = []
    for code in true_levels & pred_present:
        truth, given = labels == code, (pred_levels == code) & known
        iou = (truth & given).sum() / (truth | given).sum()
        if iou > PQ_MATCH_IOU:
            ious.append(iou)
    tp = len(ious)
    fp, fn = len(pred_present) - tp, len(true_levels) - tp
    denominator = tp + 0.5 * fp + 0.5 * fn
    sq = float(np.mean(ious)) if ious else 0.0
    rq = tp / denominator if denominator else 1.0
    return {"pq": sq * rq, "sq": sq, "rq": rq}
