"""Radiographs filed twice: one image under two names must count as one patient, or it lands on both sides of a split.

AASCE files some radiographs twice under different case numbers (``153 B`` is ``78 B``). Names cannot
tell, pixels can: each image is reduced to a small crop of the spine around its Th8–Th11 mask, centred
and scaled by the region so that two framings or resolutions of one radiograph give the same crop.

Where the images have level label maps, two tests decide, the second with a declared error rate:
1. a candidate: the crops' Pearson correlation reaches `CANDIDATE_CORRELATION`;
2. confirmed by the geometry: the Procrustes distance of the two spines' vertebra centres (Th1…L5, position,
   size and rotation removed) is at most the `FALSE_JOIN_RATE` quantile of the distances between images of
   different patients that are not candidates: an unrelated pair passes it with that probability.
Without label maps the correlation alone decides, at `TWIN_THRESHOLD`. Twins' patients are joined into one
group (union–find), and that group is what a split keeps together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.cluster.hierarchy import DisjointSet

from spineseg.identification import vertebra_centres

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
TWIN_THRESHOLD = 0.97  # the correlation alone, for images without level label maps
# Measured on the same 481 radiographs (issue #32): the image-only test joined three pairs of different patients
# (196 C = 237 B at 0.974, 200 A = 237 A, 234 A = 237 C), whose spines lie at Procrustes distances 0.044–0.055,
# while every pair above 0.97 that is one radiograph by eye lies at 0.008–0.023. A candidate is looser than
# TWIN_THRESHOLD, so that the geometry, not a correlation cut between twins and strangers, decides.
CANDIDATE_CORRELATION = 0.95
FALSE_JOIN_RATE = 0.001  # the share of unrelated pairs the geometric test lets through: the declared false-join rate
MIN_COMMON_LEVELS = 8  # vertebra centres both images must have for a distance


@dataclass(frozen=True)
class Twin:
    """Two images that are one radiograph, or a candidate pair, and the evidence: their crops' correlation and
    (where label maps exist) the Procrustes distance of their vertebra centres."""

    first: str
    second: str
    score: float
    distance: float = math.nan

    def evidence(self, partner: str) -> str:
        return f"{partner} r={self.score:.3f}" + ("" if math.isnan(self.distance) else f" d={self.distance:.4f}")


@dataclass(frozen=True)
class TwinSearch:
    """What a search found and how it decided: the twins, the candidates the geometry refused, and the distance
    threshold with the unrelated pairs that set it (NaN and 0 where the correlation alone decided)."""

    twins: list[Twin]
    refused: list[Twin] = field(default_factory=list)
    threshold: float = math.nan
    reference_pairs: int = 0
    false_join_rate: float = FALSE_JOIN_RATE

    def describe(self) -> str:
        """One line: how twins were decided here."""
        if math.isnan(self.threshold):
            return f"twins by image correlation alone (r >= {TWIN_THRESHOLD}: no level label maps to confirm them)"
        return (f"candidates at r >= {CANDIDATE_CORRELATION}, confirmed where the vertebra centres' Procrustes distance "
                f"is <= {self.threshold:.4f}, the {self.false_join_rate:g} quantile of {self.reference_pairs} unrelated "
                f"pairs (declared false-join rate {self.false_join_rate:g} per candidate)")


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


def level_centres(labels: np.ndarray | None) -> np.ndarray | None:
    """The vertebra centres (Th1…L5, [17, 2] rows and columns, NaN where a level is absent) of a level label
    map; None without one."""
    return None if labels is None else vertebra_centres(labels)


def _standardised(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(axis=-2, keepdims=True)
    return centred / np.linalg.norm(centred, axis=(-2, -1), keepdims=True)


def shape_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Procrustes distance of two sets of vertebra centres over the levels both have: the root of the
    disparity left after position, size and rotation are removed (`scipy.spatial.procrustes`'s, which would
    also allow a mirror image); NaN with fewer than `MIN_COMMON_LEVELS` levels in common (or a spine of
    coincident points)."""
    both = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if both.sum() < MIN_COMMON_LEVELS:
        return math.nan
    return float(_distances(a[both][None], b[both][None])[0, 0])


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] Procrustes distances between [N, L, 2] and [M, L, 2] complete point sets, all at once. Rotations
    only: a mirror image is not allowed to match, since a spine bent left and one bent right are two spines."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sa, sb = _standardised(a), _standardised(b)
        cross = np.einsum("nld,mle->nmde", sa, sb).reshape(-1, 2, 2)
        singular = np.linalg.svd(cross, compute_uv=False)
        fit = singular[:, 0] + np.sign(np.linalg.det(cross)) * singular[:, 1]  # the best proper rotation's
    return np.sqrt(np.clip(1.0 - fit.reshape(len(a), len(b)) ** 2, 0.0, None))


def shape_distances(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """[N, M] `shape_distance` of every centre set of `a` with every one of `b`; complete spines in one batch."""
    a, b = np.stack(a), np.stack(b)
    full_a, full_b = np.isfinite(a).all(axis=(1, 2)), np.isfinite(b).all(axis=(1, 2))
    out = np.full((len(a), len(b)), np.nan)
    if full_a.any() and full_b.any():
        out[np.ix_(full_a, full_b)] = _distances(a[full_a], b[full_b])
    for i, j in zip(*np.nonzero(~(full_a[:, None] & full_b[None, :]))):
        out[i, j] = shape_distance(a[i], b[j])
    return out


def find_twins(ids: Sequence[str], crops: Sequence[np.ndarray | None], centres: Sequence[np.ndarray | None] | None = None,
               patients: Sequence[str] | None = None, other_ids: Sequence[str] | None = None,
               other_crops: Sequence[np.ndarray | None] | None = None,
               other_centres: Sequence[np.ndarray | None] | None = None,
               false_join_rate: float = FALSE_JOIN_RATE) -> TwinSearch:
    """Images that are one radiograph, best first (see the module's two tests).

    Within one set of images, or (given ``other_ids`` and ``other_crops``) between two sets. Within one set,
    pairs of one patient (`patients`) are not searched: they are together already. Images without a crop are
    never anyone's twin; without centres on both sides (or with too few unrelated pairs to set the threshold
    at `false_join_rate`), the correlation alone decides, at `TWIN_THRESHOLD`.
    """
    within = other_ids is None
    if within:
        other_ids, other_crops, other_centres = ids, crops, centres
    keep_a = [k for k, crop in enumerate(crops) if crop is not None]
    keep_b = [k for k, crop in enumerate(other_crops) if crop is not None]
    if not keep_a or not keep_b:
        return TwinSearch([])
    scores = correlations(np.stack([crops[k] for k in keep_a]), np.stack([other_crops[k] for k in keep_b]))
    eligible = np.ones(scores.shape, dtype=bool)
    if within:
        eligible = np.triu(eligible, k=1)  # each pair once, never an image with itself
        if patients is not None:
            eligible &= np.asarray(patients, dtype=object)[keep_a][:, None] != np.asarray(patients, dtype=object)[keep_b][None, :]

    def pair(r: int, c: int, distance: float = math.nan) -> Twin:
        return Twin(ids[keep_a[r]], other_ids[keep_b[c]], float(scores[r, c]), distance)

    measured = centres is not None and other_centres is not None
    if measured:
        usable_a = [centres[k] if centres[k] is not None else np.full((1, 2), np.nan) for k in keep_a]
        usable_b = [other_centres[k] if other_centres[k] is not None else np.full((1, 2), np.nan) for k in keep_b]
        measured = len({c.shape for c in (*usable_a, *usable_b)}) == 1
    if measured:
        distances = shape_distances(usable_a, usable_b)
        reference = distances[eligible & (scores < CANDIDATE_CORRELATION) & np.isfinite(distances)]
        measured = len(reference) * false_join_rate >= 1  # the quantile needs at least one pair below it
    if not measured:
        rows, cols = np.nonzero(eligible & (scores >= TWIN_THRESHOLD))
        return TwinSearch(_best_first(pair(r, c) for r, c in zip(rows, cols)))
    threshold = float(np.quantile(reference, false_join_rate))
    twins, refused = [], []
    for r, c in zip(*np.nonzero(eligible & (scores >= CANDIDATE_CORRELATION))):
        candidate = pair(r, c, float(distances[r, c]))
        confirmed = candidate.distance <= threshold if np.isfinite(candidate.distance) else candidate.score >= TWIN_THRESHOLD
        (twins if confirmed else refused).append(candidate)
    return TwinSearch(_best_first(twins), _best_first(refused), threshold, len(reference), false_join_rate)


def _best_first(twins) -> list[Twin]:
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
