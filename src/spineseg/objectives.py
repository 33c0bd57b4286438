"""What a model learns to output, and how that output becomes the probability of Th8–Th11.

- ``binary`` (the article's): one logit, BCE; the probability is its sigmoid.
- ``levels``: background + the 17 levels Th1…L5, cross-entropy plus soft Dice (pixels of unknown
  level are left out of both); the probability of Th8–Th11 is the sum of the softmax channels 8–11, so
  a level-aware model is an ordinary member of every ensemble rule.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from spineseg.data import Split
from spineseg.errors import ConfigError
from spineseg.names import TARGETS
from spineseg.vertebrae import IGNORE, N_LEVELS, REGION_CODES, training_classes


class Binary:
    name = "binary"
    classes = 1
    needs_labels = False

    def __init__(self):
        self._bce = nn.BCEWithLogitsLoss()

    def targets(self, split: Split) -> np.ndarray:
        return split.masks

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._bce(logits, targets.float()[:, None])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def region(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities[:, 0]


class Levels:
    name = "levels"
    classes = N_LEVELS + 1
    needs_labels = True

    def targets(self, split: Split) -> np.ndarray:
        if split.labels is None:
            raise ConfigError(f"target 'levels' needs level label maps, and {split.dataset}/{split.split} has none")
        return training_classes(split.labels)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.long()
        known = targets != IGNORE
        cross_entropy = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
        probs = logits.float().softmax(dim=1) * known[:, None]
        one_hot = F.one_hot(torch.where(known, targets, 0), self.classes).permute(0, 3, 1, 2).float() * known[:, None]
        overlap = (probs * one_hot).sum(dim=(0, 2, 3))[1:]
        total = (probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3)))[1:]
        dice = (2 * overlap + 1) / (total + 1)
        return cross_entropy + (1 - dice).mean()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=1)

    def region(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities[:, list(REGION_CODES)].sum(dim=1)


def objective(target: str) -> Binary | Levels:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return Binary() if target == "binary" else Levels()


def coordinate_planes(height: int, width: int) -> np.ndarray:
    """[2, H, W] row and column positions in [-1, 1]: where in the radiograph a pixel is."""
    rows, cols = np.meshgrid(np.linspace(-1, 1, height, dtype=np.float32), np.linspace(-1, 1, width, dtype=np.float32),
                             indexing="ij")
    return np.stack([rows, cols])
