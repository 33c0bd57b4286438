"""Probability maps from trained models: one model over a split, or every member of an ensemble."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from spineseg.device import autocast


def as_batch(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """[N, H, W] images → a float tensor [N, 1, H, W] on `device` (an own copy: cached splits are read-only)."""
    return torch.from_numpy(np.array(images, dtype=np.float32))[:, None].to(device, non_blocking=True)


@torch.inference_mode()
def predict_proba(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 8) -> np.ndarray:
    """Sigmoid probabilities [N, H, W] for images [N, H, W] in [0, 1]."""
    model.eval()
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x = as_batch(images[start:start + batch_size], device)
        with autocast(device):
            logits = model(x)
        out[start:start + len(x)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return out


@torch.inference_mode()
def ensemble_forward(models: Sequence[nn.Module], image: torch.Tensor) -> np.ndarray:
    """Every model's probability map for one batch, stacked [M, B, H, W] on the CPU."""
    return np.stack([torch.sigmoid(m(image).float())[:, 0].cpu().numpy() for m in models])


def load_weights(model: nn.Module, path: str | os.PathLike, device: torch.device) -> nn.Module:
    """A model with the weights saved at `path` (a state dict), in evaluation mode on `device`."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()
