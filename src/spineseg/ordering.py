"""The top-to-bottom order rule for level-aware predictions: vertebrae are consecutive levels.

A level-aware model labels each pixel with a level, but nothing in a per-pixel softmax makes the
labels of one radiograph agree: two vertebrae can get the same level, or a level can be skipped.
This rule takes the predicted vertebrae (the foreground split into connected pieces of one predicted
level each), orders them top to bottom, and relabels them all at once: the assignment of levels that
maximises the summed per-pixel log-probabilities subject to the levels increasing downwards, one
level per vertebra, with a penalty for each level skipped between two kept vertebrae, and the option
of calling a piece background. This is VertXNet's "count from a reference vertebra", generalised:
every vertebra is a reference, weighted by how sure the model is of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spineseg.vertebrae import N_LEVELS, REGION_CODES

MIN_PIECE_FRACTION = 0.1  # pieces smaller than this share of the median piece are noise, left as they are
SKIP_PENALTY = 1.0  # per level skipped between two consecutive kept vertebrae, in mean log-probability units
_LOG_FLOOR = 1e-6


@dataclass(frozen=True)
class Ordered:
    """The relabelled prediction of one image."""

    levels: np.ndarray  # uint8 [H, W]: 0 background, 1..17 the level of each kept vertebra
    region: np.ndarray  # float32 [H, W]: the probability of Th8–Th11 after relabelling
    pieces: int  # how many predicted vertebrae the rule ordered


def pieces_of(probs: np.ndarray) -> list[np.ndarray]:
    """The predicted vertebrae: connected pieces of foreground with one argmax level each, top to bottom."""
    argmax = probs.argmax(axis=0)
    pieces = []
    for level in np.unique(argmax[argmax > 0]):
        labelled, count = ndimage.label(argmax == level)
        pieces += [labelled == k for k in range(1, count + 1)]
    if not pieces:
        return []
    sizes = np.array([piece.sum() for piece in pieces])
    keep = sizes >= MIN_PIECE_FRACTION * np.median(sizes)
    pieces = [piece for piece, kept in zip(pieces, keep) if kept]
    return sorted(pieces, key=lambda piece: np.nonzero(piece)[0].mean())


def assign_levels(scores: np.ndarray, skip_penalty: float = SKIP_PENALTY) -> list[int]:
    """Levels (0 = background) for pieces ordered top to bottom, from their [K, 18] mean log-probabilities.

    Kept pieces get strictly increasing levels; between two kept pieces each skipped level costs
    `skip_penalty`. Dynamic programming over (piece, last level used), exact.
    """
    n_pieces, n_classes = scores.shape if len(scores) else (0, N_LEVELS + 1)
    best = np.full((n_pieces + 1, n_classes), -np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((n_pieces + 1, n_classes, 2), dtype=int)  # (previous last level, level given)
    levels = np.arange(n_classes)
    for k in range(n_pieces):
        for last in np.nonzero(np.isfinite(best[k]))[0]:
            dropped = best[k, last] + scores[k, 0]
            if dropped > best[k + 1, last]:
                best[k + 1, last], choice[k + 1, last] = dropped, (last, 0)
            later = levels[last + 1:]
            skipped = np.where(last == 0, 0, later - last - 1)
            kept = best[k, last] + scores[k, later] - skip_penalty * skipped
            better = kept > best[k + 1, later]
            best[k + 1, later[better]] = kept[better]
            choice[k + 1, later[better]] = np.column_stack([np.full(better.sum(), last), later[better]])
    last, assigned = int(np.argmax(best[n_pieces])), []
    for k in range(n_pieces, 0, -1):
        last, level = choice[k, last]
        assigned.append(int(level))
    return assigned[::-1]


def order_levels(probs: np.ndarray, skip_penalty: float = SKIP_PENALTY) -> Ordered:
    """Relabel one image's level probabilities [18, H, W] (softmax over background + 17 levels)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] != N_LEVELS + 1:
        raise ValueError(f"level probabilities must be [{N_LEVELS + 1}, H, W], got shape {probs.shape}")
    pieces = pieces_of(probs)
    log_probs = np.log(np.maximum(probs, _LOG_FLOOR))
    scores = np.array([log_probs[:, piece].mean(axis=1) for piece in pieces]) if pieces else np.zeros((0, N_LEVELS + 1))
    levels = np.zeros(probs.shape[1:], dtype=np.uint8)
    region = probs[list(REGION_CODES)].sum(axis=0)
    foreground = 1.0 - probs[0]
    for piece, level in zip(pieces, assign_levels(scores, skip_penalty)):
        levels[piece] = level
        region[piece] = foreground[piece] if level in REGION_CODES else 0.0
    return Ordered(levels, region.astype(np.float32), len(pieces))
