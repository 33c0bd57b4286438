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

*Identified* alone can be gamed: it ignores everything outside the covered vertebrae, so a full-width band
of rows at the usual height of Th8–Th11, the same for every image, passes on two radiographs in three.
Two criteria that a constant cannot pass that way, both reported beside it:

- *identified strictly*: identified, and at least half of the predicted pixels lie on the true Th8–Th11
  (precision ≥ 0.5; a well-drawn mask keeps about 0.8, the disc spaces being background in the labels);
- *centres identified*: each of the four centres the method names for Th8, Th9, Th10 and Th11 lies
  nearer that vertebra's true centre than any other labelled vertebra's. A locator names centres; a mask
  names them too: its pixels cut top to bottom into four runs of equal count, each run's centroid.

Every mask also gets one *failure* class (`FAILURES`): what kind of wrong it is, so that a table can say
how the misses split between one level off, three or five vertebrae, under-covered, off the spine, empty.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from spineseg.vertebrae import IGNORE, N_LEVELS, NAMES, REGION, REGION_CODES

COVERED = 0.5
ON_REGION = 0.5  # identified strictly: at least this share of the predicted pixels lies on the true Th8–Th11
ON_SPINE = 0.5  # a mask with less than this share of its pixels on labelled vertebrae is off the spine
PQ_MATCH_IOU = 0.5
SHIFT_CLASSES = (-2, -1, 0, 1, 2)  # the histogram's bins; beyond ±2 counts as ±2
# What kind of wrong a mask is, in the order they are decided; "identified" (strictly) is the one right answer.
FAILURES = ("identified", "empty", "off the spine", "under-covered", "one level off", "two or more levels off",
            "three vertebrae", "five vertebrae", "six or more vertebrae", "not consecutive", "spills off Th8–Th11")


def _levels_present(labels: np.ndarray) -> list[int]:
    return [int(code) for code in np.unique(labels) if 1 <= code <= N_LEVELS]


def identify(pred: np.ndarray, labels: np.ndarray, centres: np.ndarray | None = None) -> dict:
    """Identification of one predicted Th8–Th11 mask [H, W] against its label map [H, W].

    `centres` [4, 2] (row, column) are the centres the method names for Th8–Th11; without them, the
    mask's own (`mask_centres`).
    """
    pred, labels = np.asarray(pred, dtype=bool), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"prediction {pred.shape} and label map {labels.shape} differ in shape")
    present = _levels_present(labels)
    coverage = {code: (pred & (labels == code)).sum() / (labels == code).sum() for code in present}
    covered = {code for code, share in coverage.items() if share >= COVERED}
    total = sum(coverage.values())
    mean_level = sum(code * share for code, share in coverage.items()) / total if total else np.nan
    shift = float(mean_level - np.mean(REGION_CODES))
    predicted = int(pred.sum())
    precision = float((pred & np.isin(labels, REGION_CODES)).sum() / predicted) if predicted else np.nan
    on_spine = float((pred & np.isin(labels, present)).sum() / predicted) if predicted else np.nan
    identified = covered == set(REGION_CODES)
    named = mask_centres(pred) if centres is None else np.asarray(centres, dtype=float)
    errors = centre_errors(named, vertebra_centres(labels))
    row = {"identified": identified, "identified_strict": identified and precision >= ON_REGION,
           "centres_identified": bool((errors == 0).all()), "precision_region": precision,
           "failure": failure_class(predicted, on_spine, covered, precision), "shift": shift,
           "centre_shift": _common_offset(errors), "levels_covered": ",".join(NAMES[c] for c in sorted(covered))}
    nearest = _nearest_level(labels, present)
    for code, name in zip(REGION_CODES, REGION):
        truth, given = labels == code, pred & (nearest == code)
        total = truth.sum() + given.sum()
        row[f"dsc_{name}"] = float(2 * (truth & given).sum() / total) if total else 1.0
    return row


def failure_class(predicted: int, on_spine: float, covered: set[int], precision: float) -> str:
    """Which of `FAILURES` a mask is, from its size, its share on vertebrae, the levels it covers and its precision."""
    if not predicted:
        return "empty"
    if on_spine < ON_SPINE:
        return "off the spine"
    if len(covered) < 3:
        return "under-covered"
    levels = sorted(covered)
    if levels[-1] - levels[0] + 1 != len(levels):
        return "not consecutive"
    if len(levels) != len(REGION_CODES):
        return {3: "three vertebrae", 5: "five vertebrae"}.get(len(levels), "six or more vertebrae")
    offset = abs(levels[0] - REGION_CODES[0])
    if offset:
        return "one level off" if offset == 1 else "two or more levels off"
    return "identified" if precision >= ON_REGION else "spills off Th8–Th11"


def vertebra_centres(labels: np.ndarray) -> np.ndarray:
    """[N_LEVELS, 2] (row, column) centre of each labelled level (Th1…L5) in pixel coordinates, NaN where absent.

    A pixel's centre is at its index + 0.5, so centres scale with the grid: × (H'/H, W'/W) is the centre at H' × W'.
    """
    labels = np.asarray(labels)
    flat = labels.ravel().astype(np.int64)
    known = (flat >= 1) & (flat <= N_LEVELS)
    rows, cols = np.divmod(np.nonzero(known)[0], labels.shape[1])
    codes = flat[known]
    counts = np.bincount(codes, minlength=N_LEVELS + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        centre_rows = np.bincount(codes, weights=rows + 0.5, minlength=N_LEVELS + 1)[1:] / counts
        centre_cols = np.bincount(codes, weights=cols + 0.5, minlength=N_LEVELS + 1)[1:] / counts
    return np.column_stack([centre_rows, centre_cols])


def mask_centres(mask: np.ndarray, parts: int = len(REGION_CODES)) -> np.ndarray:
    """[parts, 2] the centres a Th8–Th11 mask names: its pixels, top to bottom, cut into `parts` runs of
    equal count, each run's centroid (row, column); NaN for an empty mask."""
    rows, cols = np.nonzero(np.asarray(mask, dtype=bool))
    if not len(rows):
        return np.full((parts, 2), np.nan)
    runs = np.array_split(np.arange(len(rows)), parts)  # np.nonzero walks the rows top to bottom
    return np.array([[rows[run].mean() + 0.5, cols[run].mean() + 0.5] if len(run) else [np.nan, np.nan] for run in runs])


def centre_errors(named: np.ndarray, true_centres: np.ndarray, levels: tuple[int, ...] = REGION_CODES) -> np.ndarray:
    """For each named centre, the level of the nearest true centre minus the level it was named for
    (0: right; +1: it sits on the vertebra below). A NaN centre counts as wrong (a large error)."""
    named, true_centres = np.asarray(named, dtype=float), np.asarray(true_centres, dtype=float)
    known = np.isfinite(true_centres).all(axis=1)
    if not known.any():
        return np.full(len(levels), np.nan)
    distance = np.linalg.norm(named[:, None, :] - true_centres[None, known, :], axis=2)
    nearest = np.nonzero(known)[0][np.argmin(np.where(np.isfinite(distance), distance, np.inf), axis=1)] + 1
    errors = (nearest - np.asarray(levels)).astype(float)
    errors[~np.isfinite(named).all(axis=1)] = N_LEVELS  # named nothing: as wrong as it gets
    return errors


def centre_failure(errors: np.ndarray) -> str:
    """`FAILURES`' class of the centres a locator names: right, a whole count off by one or more, or scattered."""
    offset = _common_offset(np.asarray(errors, dtype=float))
    if np.isnan(offset):
        return "not consecutive"
    return "identified" if offset == 0 else "one level off" if abs(offset) == 1 else "two or more levels off"


def _common_offset(errors: np.ndarray) -> float:
    """The one offset every named centre shares (a whole-count miss), NaN when they disagree."""
    return float(errors[0]) if len(errors) and np.isfinite(errors).all() and (errors == errors[0]).all() else np.nan


def _nearest_level(labels: np.ndarray, present: list[int]) -> np.ndarray:
    """Each pixel's nearest labelled vertebra (its own level on vertebrae)."""
    vertebrae = np.isin(labels, present)
    if not vertebrae.any():
        return np.zeros_like(labels)
    _, (rows, cols) = ndimage.distance_transform_edt(~vertebrae, return_indices=True)
    return labels[rows, cols]


def identification_table(preds: np.ndarray, labels: np.ndarray, centres: list[np.ndarray] | None = None) -> pd.DataFrame:
    """`identify` for every image of [N, H, W] predictions and label maps (with the centres each names, if given)."""
    named = centres if centres is not None else [None] * len(preds)
    return pd.DataFrame([identify(p, lab, c) for p, lab, c in zip(preds, labels, named)])


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
