"""Radiographs filed twice: one image under two names must count as one patient, or it lands on both sides of a split.

AASCE files some radiographs twice under different case numbers (``153 B`` is ``78 B``). Names cannot
tell, pixels can: each image is reduced to a small crop of the spine around its Th8–Th11 mask, centred
and scaled by the region so that two framings or resolutions of one radiograph give the same crop, and
two images are twins when their crops' Pearson correlation reaches `TWIN_THRESHOLD`. Twins' patients
are joined into one group (union–find), and that group is what a split keeps together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.cluster.hierarchy import DisjointSet

CROP_SIZE = (64, 32)  # (height, width) of the compared crop
CROP_REGIONS = 3.0  # the crop's height in region heights: from about Th1 to L3 on AASCE
# Measured on the 481 AASCE training radiographs at 512 × 192 (issue #24): of the 114 896 pairs of images
# from different case numbers, 99 % score below 0.915, 99.9 % below 0.946 and 99.99 % below 0.966; eight
# reach 0.97, five of them the same radiograph by eye (141 B = 77 C 0.999, 5 A = coronal8 0.993, 141 A = 77 A
# 0.987, coronal9 = 35 D 0.984, 16 C = coronal15 0.971) and three different patients (0.970–0.974).
# Every twin the review listed joins its partner's case at 0.97 (153 = 78 at 0.999, 157 = 79 at 0.984,
# 238 = 239 at 0.989, coronal4 = 1, coronal12 = 48, coronal3 = coronal10 at 0.993 or more). A missed twin
# leaks an image across the split; a false join only keeps two patients together, so the threshold sits at
# the top of the unrelated tail rather than in the middle of the twins.
TWIN_THRESHOLD = 0.97


@dataclass(frozen=True)
class Twin:
    """Two images that are one radiograph, and the evidence: their crops' correlation."""

    first: str
    second: str
    score: float


def spine_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The spine around a Th8–Th11 mask, resized to `CROP_SIZE` and standardised (zero mean, unit norm).

    None when the mask is empty or the crop is flat: there is nothing to compare.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    height = CROP_REGIONS * (rows.max() + 1 - rows.min())
    width = height * CROP_SIZE[1] / CROP_SIZE[0]
    centre_row, centre_col = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    top, left = int(round(centre_row - height / 2)), int(round(centre_col - width / 2))
    height, width = max(int(round(height)), 1), max(int(round(width)), 1)
    padded = np.zeros((height, width), dtype=np.float32)  # the crop may reach past the image
    inside = np.asarray(image, dtype=np.float32)[max(top, 0):top + height, max(left, 0):left + width]
    padded[max(-top, 0):max(-top, 0) + inside.shape[0], max(-left, 0):max(-left, 0) + inside.shape[1]] = inside
    crop = np.asarray(Image.fromarray(padded, mode="F").resize(CROP_SIZE[::-1], Image.Resampling.BILINEAR))
    centred = crop.ravel() - crop.mean()
    norm = np.linalg.norm(centred)
    return centred / norm if norm > 0 else None


def correlations(crops_a: np.ndarray, crops_b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every crop of [N, D] with every crop of [M, D] (both from `spine_crop`)."""
    return np.asarray(crops_a) @ np.asarray(crops_b).T


def find_twins(ids: Sequence[str], crops: Sequence[np.ndarray | None], other_ids: Sequence[str] | None = None,
               other_crops: Sequence[np.ndarray | None] | None = None,
               threshold: float = TWIN_THRESHOLD) -> list[Twin]:
    """Pairs of images whose crops correlate at `threshold` or more, best first.

    Within one set of images, or (given ``other_ids`` and ``other_crops``) between two sets. Images
    without a crop are never anyone's twin.
    """
    within = other_ids is None
    other_ids, other_crops = (ids, crops) if within else (other_ids, other_crops)
    keep_a = [k for k, crop in enumerate(crops) if crop is not None]
    keep_b = [k for k, crop in enumerate(other_crops) if crop is not None]
    if not keep_a or not keep_b:
        return []
    scores = correlations(np.stack([crops[k] for k in keep_a]), np.stack([other_crops[k] for k in keep_b]))
    if within:
        scores = np.triu(scores, k=1)  # each pair once, never an image with itself
    rows, cols = np.nonzero(scores >= threshold)
    twins = [Twin(ids[keep_a[r]], other_ids[keep_b[c]], float(scores[r, c])) for r, c in zip(rows, cols)]
    return sorted(twins, key=lambda twin: (-twin.score, twin.first, twin.second))


def join_patients(ids: Sequence[str], patients: Sequence[str], twins: Sequence[Twin]) -> list[str]:
    """Each image's patient group: patients joined wherever one of their images is another's twin.

    A group of several patients is named by its members, sorted and joined with ``+``; a patient with
    no twin keeps its own name.
    """
    patient_of = dict(zip(ids, patients))
    groups = DisjointSet(patients)
    for twin in twins:
        groups.merge(patient_of[twin.first], patient_of[twin.second])
    return ["+".join(sorted(groups.subset(patient))) for patient in patients]
