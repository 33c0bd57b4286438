"""The located variant's mask: the crop model's outline of the four vertebrae a chain of vertebra centres names
(`spineseg.chain`), made the same way in stage 4 and in `spineseg predict --located`."""

from __future__ import annotations

import numpy as np
import torch

from spineseg.chain import Chain, located_levels
from spineseg.crops import CropModel
from spineseg.vertebrae import REGION_CODES


def region_masks(chains: list[Chain], shape: tuple[int, int], beside: bool = True) -> np.ndarray:
    """[N, H, W] where each chain puts Th8–Th11: within half a vertebra's width of the spine, or (`beside` False)
    every pixel whose nearest placed vertebra is one of the four."""
    return np.stack([np.isin(located_levels(chain, shape, beside), REGION_CODES) for chain in chains])


def crop_outline(crop: CropModel, images: np.ndarray, chains: list[Chain], device: torch.device) -> np.ndarray:
    """The crop model's probabilities [N, H, W] in boxes around the four vertebrae each chain names (images [N, H, W]
    on the chains' grid), kept to the pixels nearer to one of those four than to any other vertebra, zero elsewhere:
    the located variant's map wherever it is made (stage 4, `spineseg predict --located`)."""
    shape = images.shape[1:]
    return np.where(region_masks(chains, shape, beside=False), crop.outline(images, region_masks(chains, shape), device), 0.0)


def vertebrae_outline(levels: list[np.ndarray | None]) -> np.ndarray:
    """The level-aware members' share voting each pixel a vertebra, of any level [N, H, W]."""
    return np.mean([member > 0 for member in levels if member is not None], axis=0).astype(np.float32)
