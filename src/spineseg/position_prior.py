"""The position prior: where Th8–Th11 lie on the training radiographs, the same answer for every image.

A method that names the four vertebrae must beat what needs no image at all. Two constants, learned on
the training label maps and scored like any method:

- the *band*: every column of the rows from the median top of Th8 to the median bottom of Th11;
- the *mean position*: each of Th8–Th11 drawn as a box of its mean height and width around its mean
  centre, those centres being the ones it names.

Positions are kept as fractions of the image's height and width, so a prior fitted on one grid is drawn on any.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spineseg.identification import vertebra_centres
from spineseg.vertebrae import N_LEVELS, REGION_CODES


@dataclass(frozen=True)
class PositionPrior:
    band: tuple[float, float]  # (top, bottom) rows of the band, fractions of the height
    centres: np.ndarray  # [N_LEVELS, 2] each level's mean (row, column) centre, fractions of (height, width)
    extents: np.ndarray  # [N_LEVELS, 2] each level's mean (height, width), fractions of the image's

    @classmethod
    def fit(cls, labels: np.ndarray) -> PositionPrior:
        """From training label maps [N, H, W] (one grid); levels an image lacks are left out of their means."""
        labels = np.asarray(labels)
        if labels.ndim != 3 or not len(labels):
            raise ValueError(f"the position prior needs label maps [N, H, W], got shape {labels.shape}")
        height, width = labels.shape[1:]
        tops, bottoms = [], []
        for label_map in labels:
            first, last = np.isin(label_map, REGION_CODES[:1]), np.isin(label_map, REGION_CODES[-1:])
            if first.any() and last.any():
                tops.append(np.nonzero(first.any(axis=1))[0].min() / height)
                bottoms.append((np.nonzero(last.any(axis=1))[0].max() + 1) / height)
        if not tops:
            raise ValueError("no training label map shows both Th8 and Th11: there is no position to learn")
        centres = np.array([vertebra_centres(label_map) for label_map in labels]) / [height, width]
        extents = np.array([_extents(label_map) for label_map in labels]) / [height, width]
        return cls((float(np.median(tops)), float(np.median(bottoms))), _mean(centres), _mean(extents))

    def band_mask(self, shape: tuple[int, int]) -> np.ndarray:
        height, width = shape
        mask = np.zeros(shape, dtype=bool)
        mask[int(round(self.band[0] * height)):int(round(self.band[1] * height))] = True
        return mask

    def mean_mask(self, shape: tuple[int, int]) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        for code in REGION_CODES:
            centre, extent = self.centres[code - 1] * shape, self.extents[code - 1] * shape
            (top, left), (bottom, right) = np.round(centre - extent / 2).astype(int), np.round(centre + extent / 2).astype(int)
            mask[max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = True
        return mask

    def region_centres(self, shape: tuple[int, int]) -> np.ndarray:
        """[4, 2] the mean centres of Th8–Th11 in pixels of `shape`."""
        return self.centres[[code - 1 for code in REGION_CODES]] * shape


def _extents(labels: np.ndarray) -> np.ndarray:
    """[N_LEVELS, 2] (height, width) of each level's bounding box in pixels, NaN where absent."""
    extents = np.full((N_LEVELS, 2), np.nan)
    for code in range(1, N_LEVELS + 1):
        rows, cols = np.nonzero(labels == code)
        if len(rows):
            extents[code - 1] = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    return extents


def _mean(values: np.ndarray) -> np.ndarray:
    """The mean over images, each level over the images that show it (NaN for a level none shows)."""
    shown = np.isfinite(values)
    return np.where(shown.any(axis=0), np.nansum(values, axis=0) / np.maximum(shown.sum(axis=0), 1), np.nan)
