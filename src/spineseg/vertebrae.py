"""The one code table of vertebral levels, used by every label map (AASCE, synthetic, your own data).

Label maps store one code per pixel: 0 background, 1–12 Th1–Th12, 13–17 L1–L5 (the 17 levels of the
AASCE landmarks), 18–24 C1–C7 and 25 S1 for vertebrae outside them, and 255 where the level is
unknown (kept out of any supervision). The article's region Th8–Th11 is codes 8–11. A level-aware
model predicts background + the 17 levels; other vertebrae are background to it.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

BACKGROUND = 0
IGNORE = 255
LEVELS = (*(f"Th{k}" for k in range(1, 13)), *(f"L{k}" for k in range(1, 6)))  # codes 1..17
OTHER_LEVELS = (*(f"C{k}" for k in range(1, 8)), "S1")  # codes 18..25
CODES = MappingProxyType({name: code for code, name in enumerate((*LEVELS, *OTHER_LEVELS), start=1)})
NAMES = MappingProxyType({code: name for name, code in CODES.items()})
REGION = ("Th8", "Th9", "Th10", "Th11")  # the article's target
REGION_CODES = tuple(CODES[name] for name in REGION)
N_LEVELS = len(LEVELS)  # a level-aware model has N_LEVELS + 1 classes
# The locator's chain: the 17 levels with the vertebra above (C7) and below (S1), whose places tell
# where the count starts and ends (`spineseg.locator`).
CHAIN = ("C7", *LEVELS, "S1")
CHAIN_CODES = tuple(CODES[name] for name in CHAIN)


def region_mask(labels: np.ndarray) -> np.ndarray:
    """The Th8–Th11 mask of a label map."""
    return np.isin(labels, REGION_CODES)


def training_classes(labels: np.ndarray) -> np.ndarray:
    """Label codes → a level-aware model's classes: 0 background, 1..17 the levels, IGNORE kept."""
    labels = np.asarray(labels)
    return np.where((labels > N_LEVELS) & (labels != IGNORE), BACKGROUND, labels).astype(np.uint8)
