"""What a model learns to output, and how that output becomes the probability of Th8–Th11.

- ``binary`` (the article's): one logit, BCE; the probability is its sigmoid.
- ``levels``: background + the 17 levels Th1…L5, cross-entropy plus soft Dice (pixels of unknown
  level are left out of both); the probability of Th8–Th11 is the sum of the softmax channels 8–11, so
  a level-aware model is an ordinary member of every ensemble rule.
- ``centres`` (the locator's, never an ensemble member): where each vertebra C7, T1…L5, S1 lies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from spineseg.chain import chain_targets
from spineseg.data import Split
from spineseg.errors import ConfigError
from spineseg.names import CENTRES, TARGETS
from spineseg.vertebrae import CHAIN_CODES, IGNORE, N_LEVELS, REGION_CODES, training_classes


class Binary:
    name = "binary"
    classes = 1
    needs_labels = False
    keeps_levels_in_view = False  # augmentation may push a labelled level out of the image

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
    keeps_levels_in_view = True  # never teach that the column starts one vertebra lower than it does

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


class Centres:
    """The locator's target: where each vertebra of the chain C7, T1…L5, S1 is (`spineseg.chain`, `spineseg.locator`).

    The network gives two maps per vertebra: the first, through a softmax over the image's pixels plus
    one more outcome, *outside the image*, is the distribution of its centre; the second's mean over the
    pixels is that outcome's logit. Trained by cross-entropy against a Gaussian of `sigma` pixels at the
    vertebra's centre in the (augmented) label map, or against *outside* where the vertebra lies beyond
    the image's edge (`spineseg.chain.chain_targets`); a vertebra the map cannot tell about trains nothing.
    """

    name = CENTRES
    classes = 2 * len(CHAIN_CODES)
    needs_labels = True
    keeps_levels_in_view = False  # a vertebra pushed out of the image teaches *outside*
    sigma = 1.5  # pixels of the training grid: about a tenth of a thoracic vertebra's height at 256 x 96

    def targets(self, split: Split) -> np.ndarray:
        if split.labels is None:
            raise ConfigError(f"target {CENTRES!r} needs level label maps, and {split.dataset}/{split.split} has none")
        return split.labels

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = self._log_probs(logits)  # [B, L, H·W + 1]
        height, width = logits.shape[-2:]
        wanted = torch.zeros_like(log_probs)
        trained = torch.zeros(log_probs.shape[:2], dtype=torch.bool, device=logits.device)
        for b, label_map in enumerate(targets.cpu().numpy()):
            centres, outside = chain_targets(label_map)
            inside = np.isfinite(centres).all(axis=1)
            if inside.any():
                wanted[b, inside, :-1] = gaussians(centres[inside], (height, width), self.sigma).flatten(1).to(wanted)
            wanted[b, outside, -1] = 1.0
            trained[b] = torch.from_numpy(inside | outside)
        return -(wanted * log_probs).sum(dim=2)[trained].mean()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, L, H, W]: each vertebra's place; what a map lacks from 1 is the chance it lies outside."""
        return self._log_probs(logits)[..., :-1].exp().view(len(logits), len(CHAIN_CODES), *logits.shape[-2:])

    def region(self, probabilities: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a locator names vertebrae by their centres; it gives no Th8–Th11 probability to ensemble")

    @staticmethod
    def _log_probs(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        maps, away = logits[:, :len(CHAIN_CODES)], logits[:, len(CHAIN_CODES):]
        return torch.cat([maps.flatten(2), away.mean(dim=(2, 3))[..., None]], dim=2).log_softmax(dim=2)


def gaussians(centres: np.ndarray, shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """Unit-mass Gaussians [K, H, W] at (row, column) pixel centres [K, 2]."""
    rows = torch.arange(shape[0], dtype=torch.float32) + 0.5
    cols = torch.arange(shape[1], dtype=torch.float32) + 0.5
    centres = torch.as_tensor(centres, dtype=torch.float32)
    bumps = torch.exp(-((rows[:, None] - centres[:, 0, None, None]) ** 2 + (cols - centres[:, 1, None, None]) ** 2)
                      / (2 * sigma**2))
    return bumps / bumps.sum(dim=(1, 2), keepdim=True).clamp(min=1e-12)


def objective(target: str) -> Binary | Levels | Centres:
    if target == CENTRES:
        return Centres()
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return Binary() if target == "binary" else Levels()


def coordinate_planes(height: int, width: int) -> np.ndarray:
    """[2, H, W] row and column positions in [-1, 1]: where in the radiograph a pixel is."""
    rows, cols = np.meshgrid(np.linspace(-1, 1, height, dtype=np.float32), np.linspace(-1, 1, width, dtype=np.float32),
                             indexing="ij")
    return np.stack([rows, cols])
