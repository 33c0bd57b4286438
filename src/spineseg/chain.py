"""Which vertebra is which: the chain C7, T1…L5, S1, its targets, its prior, and its decoding from heatmaps.

A network (any encoder of `spineseg.encoders`, with row and column planes) gives each vertebra of the
chain a distribution over the image's pixels plus one more outcome, *not in the image*
(`spineseg.objectives.Centres` trains it against a Gaussian at the centre, or that outcome where the
vertebra lies beyond the image's edge). C7 and S1 are there to be told apart: the count goes wrong at
its ends, C7 taken for T1 at the top, L4 for L5 where the image stops above the sacrum, and a map of C7
is what teaches the network where T1 is not. The AASCE labels stop at T1 and L5, so C7 and S1 are put one
step beyond them (`chain_centres`).

Read level by level, the maps mislead in a typical way: a map fires on the vertebra above or below its
own, and the count shifts. Decoded together they need not: the chain takes for each vertebra one of its
map's strongest peaks, or *above the image* (only before the first vertebra it places) or *below the
image* (only after the last), so that the vertebrae run strictly downwards, one step apart, with the
spacing and sideways step that the training radiographs show (`ChainPrior`: a log-normal vertical step,
so two vertebrae never share a place, and a normal sideways step). The best chain is exact dynamic
programming over the peaks (Viterbi), as in Payer et al.'s post-processing of vertebra localisation
(2020): every vertebra's evidence, the ends' included, decides where the count starts.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from spineseg.identification import vertebra_centres
from spineseg.vertebrae import CHAIN_CODES, LEVELS, REGION_CODES

PEAKS_PER_LEVEL = 8  # candidate places kept per vertebra's map
PEAK_WINDOW = 2  # pixels either side of a peak whose probability counts as its evidence
MIN_STEP_SD = 0.05  # floor of the log vertical step's standard deviation
EXTRAPOLATED_STEP = (0.9, 1.0)  # C7 lies 0.9 of the T1→T2 step above T1, S1 one L4→L5 step below L5
WIDTH_PER_STEP = 1.4  # a vertebral body is about 1.4 centre-to-centre steps wide (AASCE training labels, median)
_FLOOR = 1e-9
_OUTSIDE = ("above", "below")


def chain_centres(labels: np.ndarray) -> np.ndarray:
    """[len(CHAIN), 2] (row, column) centre of C7, T1…L5, S1 in a label map, NaN where unknown.

    A C7 or S1 the map does not show is put one step beyond T1 or L5 (`EXTRAPOLATED_STEP`), where both of
    the two vertebrae next to it are shown; it may then lie beyond the image's edge.
    """
    centres = vertebra_centres(labels)
    labels = np.asarray(labels)
    ends = []
    for code, (near, far), fraction in ((CHAIN_CODES[0], (0, 1), EXTRAPOLATED_STEP[0]),
                                        (CHAIN_CODES[-1], (len(LEVELS) - 1, len(LEVELS) - 2), EXTRAPOLATED_STEP[1])):
        shown = np.nonzero(labels == code)
        if len(shown[0]):
            ends.append([shown[0].mean() + 0.5, shown[1].mean() + 0.5])
        else:
            ends.append(centres[near] + fraction * (centres[near] - centres[far]))
    return np.vstack([ends[0], centres, ends[1]])


def chain_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the locator learns from one (augmented) label map: each chain vertebra's centre [L, 2] and
    whether it is *outside* [L] (before the first or after the last vertebra inside the image).

    A vertebra is inside when its centre lies in the image. Outside is said only of a map without
    unknown levels (255): where a level was untrusted, what is missing may be that level.
    """
    labels = np.asarray(labels)
    centres = chain_centres(labels)
    height, width = labels.shape
    known = np.isfinite(centres).all(axis=1)
    inside = known & (centres[:, 0] >= 0) & (centres[:, 0] < height) & (centres[:, 1] >= 0) & (centres[:, 1] < width)
    outside = np.zeros(len(centres), dtype=bool)
    if inside.any() and not (labels == 255).any():
        first, last = np.nonzero(inside)[0][[0, -1]]
        positions = np.arange(len(centres))
        outside = (positions < first) | (positions > last)
    return np.where(inside[:, None], centres, np.nan), outside


@dataclass(frozen=True)
class ChainPrior:
    """How neighbouring vertebrae of the chain sit on the training radiographs, in fractions of the image's
    height and width: between chain position k and k + 1 the vertical step's logarithm has mean
    ``log_step[k]`` and deviation ``log_step_sd[k]``, the sideways step mean ``side_step[k]`` and deviation
    ``side_step_sd[k]``."""

    log_step: tuple[float, ...]
    log_step_sd: tuple[float, ...]
    side_step: tuple[float, ...]
    side_step_sd: tuple[float, ...]

    @classmethod
    def fit(cls, centres: np.ndarray, shape: tuple[int, int]) -> ChainPrior:
        """From training chain centres [N, len(CHAIN), 2] (row, column) in pixels of `shape`, NaN where unknown.

        A step no training image shows (data whose column stops at L3, say) takes its nearest shown step's.
        """
        fractions = np.asarray(centres, dtype=float) / np.asarray(shape, dtype=float)
        steps = np.diff(fractions, axis=1)  # [N, L-1, 2]
        known = np.isfinite(steps).all(axis=2) & (steps[..., 0] > 0)
        seen = np.nonzero(known.any(axis=0))[0]
        if not len(seen):
            raise ValueError("no training label map shows two neighbouring vertebrae of the chain: it cannot be learned")
        log_rows = np.where(known, np.log(np.where(known, steps[..., 0], 1.0)), np.nan)
        sideways = np.where(known, steps[..., 1], np.nan)
        nearest = seen[np.argmin(np.abs(np.arange(steps.shape[1])[:, None] - seen[None]), axis=1)]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the steps no image shows: replaced just below
            stats = [np.nanmean(log_rows, axis=0), np.nanstd(log_rows, axis=0), np.nanmean(sideways, axis=0),
                     np.nanstd(sideways, axis=0)]
        stats = [values[nearest] for values in stats]
        return cls(tuple(map(float, stats[0])), tuple(float(max(v, MIN_STEP_SD)) for v in stats[1]),
                   tuple(map(float, stats[2])), tuple(float(max(v, MIN_STEP_SD / 10)) for v in stats[3]))

    def to_dict(self) -> dict:
        return {key: list(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, saved: dict) -> ChainPrior:
        prior = cls(**{key: tuple(float(v) for v in saved[key]) for key in cls.__dataclass_fields__})
        if {len(value) for value in asdict(prior).values()} != {len(CHAIN_CODES) - 1}:
            raise ValueError(f"a chain prior needs {len(CHAIN_CODES) - 1} steps in each field")
        return prior

    def step_score(self, k: int, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
        """Log density [A, B] of each place `lower` (fractions [B, 2]) following each `upper` ([A, 2]) as the
        next vertebra after chain position k; −inf where it does not lie lower.

        A density over the image's unit square, like the uniform one (log 1 = 0) of the first vertebra
        placed after others lay above the image: so whether the chain starts inside or above is decided by
        the evidence, not by a term left out."""
        rows = lower[None, :, 0] - upper[:, None, 0]
        sideways = lower[None, :, 1] - upper[:, None, 1]
        below = rows > 0
        log_rows = np.log(np.where(below, rows, 1.0))
        score = _log_normal(log_rows, self.log_step[k], self.log_step_sd[k]) - log_rows  # log-normal density of the step
        score += _log_normal(sideways, self.side_step[k], self.side_step_sd[k])
        return np.where(below, score, -np.inf)


def _log_normal(x: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))



def peaks(heatmap: np.ndarray, count: int = PEAKS_PER_LEVEL, window: int = PEAK_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """The `count` strongest local maxima of a vertebra's map [H, W]: their (row, column) pixel centres [P, 2]
    and the log of the probability within `window` pixels of each [P]."""
    size = 2 * window + 1
    mass = ndimage.uniform_filter(np.asarray(heatmap, dtype=np.float64), size=size, mode="constant") * size**2
    local = (mass == ndimage.maximum_filter(mass, size=size)) & (mass > 0)
    rows, cols = np.nonzero(local)
    if not len(rows):
        rows, cols = np.unravel_index([int(np.argmax(heatmap))], np.shape(heatmap))
    strongest = np.argsort(-mass[rows, cols], kind="stable")[:count]
    rows, cols = rows[strongest], cols[strongest]
    return np.column_stack([rows + 0.5, cols + 0.5]), np.log(mass[rows, cols] + _FLOOR)


@dataclass(frozen=True)
class Chain:
    """One image's decoded chain: where each vertebra of `CHAIN` is (NaN when the chain puts it outside)."""

    centres: np.ndarray  # [L, 2] (row, column) in pixels of the heatmaps' grid; NaN outside the image
    outside: tuple[str, ...]  # per vertebra: "" inside, "above" or "below" the image
    evidence: np.ndarray  # [L] log probability of each vertebra's choice
    score: float  # the chain's total log-likelihood

    def centre_of(self, code: int) -> np.ndarray:
        return self.centres[CHAIN_CODES.index(code)]

    def region_centres(self) -> np.ndarray:
        """[4, 2] where the chain puts Th8–Th11."""
        return np.array([self.centre_of(code) for code in REGION_CODES])

    def scaled(self, factor: tuple[float, float]) -> Chain:
        return Chain(self.centres * np.asarray(factor, dtype=float), self.outside, self.evidence, self.score)


def decode(heatmaps: np.ndarray, prior: ChainPrior) -> Chain:
    """The best chain through one image's maps [L, H, W] (one per vertebra of `CHAIN`, each summing to at most 1;
    what is missing from 1 is the probability that the vertebra lies outside the image)."""
    heatmaps = np.asarray(heatmaps, dtype=np.float64)
    if heatmaps.ndim != 3 or len(heatmaps) != len(CHAIN_CODES):
        raise ValueError(f"the chain needs {len(CHAIN_CODES)} maps [L, H, W], got shape {heatmaps.shape}")
    shape = np.array(heatmaps.shape[1:], dtype=float)
    places, evidence = zip(*(peaks(heatmap) for heatmap in heatmaps))
    away = np.log(np.clip(1.0 - heatmaps.sum(axis=(1, 2)), 0.0, 1.0) + _FLOOR)
    # states of vertebra k: its peaks, then "above", then "below"
    unary = [np.concatenate([e, [a, a]]) for e, a in zip(evidence, away)]
    score, back = unary[0].copy(), []
    for k in range(1, len(heatmaps)):
        upper, lower = len(places[k - 1]), len(places[k])
        step = np.full((upper + 2, lower + 2), -np.inf)
        step[:upper, :lower] = prior.step_score(k - 1, places[k - 1] / shape, places[k] / shape)
        step[upper, :lower + 1] = 0.0  # above → a peak, or still above
        step[:upper, lower + 1] = 0.0  # a peak → below
        step[upper + 1, lower + 1] = 0.0  # below stays below
        total = score[:, None] + step
        back.append(np.argmax(total, axis=0))
        score = total.max(axis=0) + unary[k]
    chosen = [int(np.argmax(score))]
    best = float(score[chosen[0]])
    for pointers in reversed(back):
        chosen.append(int(pointers[chosen[-1]]))
    chosen.reverse()
    centres = np.full((len(heatmaps), 2), np.nan)
    outside = []
    for k, state in enumerate(chosen):
        if state < len(places[k]):
            centres[k] = places[k][state]
            outside.append("")
        else:
            outside.append(_OUTSIDE[state - len(places[k])])
    return Chain(centres, tuple(outside), np.array([u[s] for u, s in zip(unary, chosen)]), best)


def located_levels(chain: Chain, shape: tuple[int, int], beside: bool = True) -> np.ndarray:
    """uint8 [H, W] on the chain's grid: the level code the chain gives each pixel near the spine, 0 elsewhere.

    Each pixel takes the level of its nearest placed vertebra (so the borders between neighbours are the
    perpendicular bisectors, tilted with the spine) when it lies within half a vertebra's width of it,
    sideways (`beside`; else every pixel takes its nearest vertebra's level).
    """
    placed = np.isfinite(chain.centres).all(axis=1)
    levels = np.zeros(shape, dtype=np.uint8)
    if not placed.any():
        return levels
    centres, codes = chain.centres[placed], np.asarray(CHAIN_CODES, dtype=np.uint8)[placed]
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    step = np.concatenate([steps[:1], (steps[1:] + steps[:-1]) / 2, steps[-1:]]) if len(steps) else np.full(1, shape[0] / 20)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32) + 0.5
    distance = (rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
    nearest = np.argmin(distance, axis=0)
    near = np.abs(cols - centres[nearest, 1]) <= WIDTH_PER_STEP * step[nearest] / 2 if beside else True
    return np.where(near, codes[nearest], 0).astype(np.uint8)

