"""A network with what it learns (its objective) and what it sees (image, optionally coordinates), and
the probability maps it gives: one model over a split, or every member of an ensemble."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spineseg.device import autocast
from spineseg.errors import ModelError
from spineseg.objectives import Binary, Levels, coordinate_planes
from spineseg.ordering import order_levels


class Segmenter(nn.Module):
    """A segmentation network fed a grayscale image (plus row and column planes with ``coordinates``)."""

    def __init__(self, net: nn.Module, objective: Binary | Levels | None = None, coordinates: bool = False):
        super().__init__()
        self.net = net
        self.objective = objective or Binary()
        self.coordinates = coordinates

    def logits(self, images: torch.Tensor, planes: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs for images [B, 1, H, W]; `planes` [B, 2, H, W] places a crop in its radiograph."""
        if self.coordinates:
            if planes is None:
                planes = torch.from_numpy(coordinate_planes(*images.shape[-2:])).to(images.device).expand(len(images), -1, -1, -1)
            images = torch.cat([images, planes.to(images.dtype)], dim=1)
        return self.net(images)

    def forward(self, images: torch.Tensor, planes: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, C, H, W]."""
        return self.objective.probabilities(self.logits(images, planes))

    def region(self, images: torch.Tensor) -> torch.Tensor:
        """The probability of Th8–Th11 [B, H, W], before any order rule."""
        return self.objective.region(self(images))


def as_batch(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """[N, H, W] images → a float tensor [N, 1, H, W] on `device` (an own copy: cached splits are read-only)."""
    return torch.from_numpy(np.array(images, dtype=np.float32))[:, None].to(device, non_blocking=True)


@dataclass(frozen=True)
class Prediction:
    region: np.ndarray  # float32 [N, H, W]: the probability of Th8–Th11
    levels: np.ndarray | None = None  # uint8 [N, H, W]: each pixel's level after the order rule (level-aware models)


@torch.inference_mode()
def predict(model: Segmenter, images: np.ndarray, device: torch.device, batch_size: int = 8, hflip: bool = False,
            precision: str = "auto") -> Prediction:
    """Th8–Th11 probabilities of images [N, H, W] in [0, 1]; level-aware models also give ordered levels.

    ``hflip`` averages each image's probabilities with those of its mirror image (test-time
    augmentation; never a vertical flip, which would reverse the levels).
    """
    model.eval()
    region = np.empty(images.shape, dtype=np.float32)
    levels = np.empty(images.shape, dtype=np.uint8) if isinstance(model.objective, Levels) else None
    for start in range(0, len(images), batch_size):
        x = as_batch(images[start:start + batch_size], device)
        with autocast(device, precision):
            probs = model(x).float()
            if hflip:
                probs = (probs + model(x.flip(-1)).float().flip(-1)) / 2
        if levels is None:
            region[start:start + len(x)] = model.objective.region(probs).cpu().numpy()
            continue
        for k, image_probs in enumerate(probs.cpu().numpy(), start=start):
            ordered = order_levels(image_probs)
            region[k], levels[k] = ordered.region, ordered.levels
    return Prediction(region, levels)


def predict_proba(model: Segmenter, images: np.ndarray, device: torch.device, batch_size: int = 8,
                  precision: str = "auto") -> np.ndarray:
    """Th8–Th11 probabilities [N, H, W] alone."""
    return predict(model, images, device, batch_size, precision=precision).region


@torch.inference_mode()
def ensemble_forward(models: Sequence[Segmenter], image: torch.Tensor) -> np.ndarray:
    """Every model's Th8–Th11 probability for one batch, stacked [M, B, H, W] on the CPU."""
    return np.stack([m.region(image).float().cpu().numpy() for m in models])


def resample(maps: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """[N, H, W] maps at another size: bilinear for probabilities, nearest for labels."""
    if maps.shape[1:] == tuple(size):
        return maps
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    if nearest:
        out = torch.nn.functional.interpolate(tensor, size=tuple(size), mode="nearest-exact")
    else:
        out = torch.nn.functional.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    return out[:, 0].numpy().astype(maps.dtype)


def load_state(path: str | os.PathLike, shown: str | None = None) -> dict:
    """A state dict of finite tensors; a file that is anything else (empty, a list, a bare tensor, text, NaN weights)
    is one clear error naming it (as `shown`, where given), and nothing in it runs."""
    path = Path(path)
    shown = shown or str(path)
    if not path.is_file():
        raise ModelError(f"{shown} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False: the one thing not to do here
        if "was not an allowed global" in str(exc):
            raise ModelError(f"{shown} holds more than weights (objects that could run code); refused") from None
        raise ModelError(f"{shown}: not a readable weights file (no torch state dict)") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as exc:  # IndexError: a 0-byte file
        raise ModelError(f"{shown}: not a readable weights file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"{shown}: not a state dict (names → tensors) but {type(state).__name__}")
    broken = next((name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if broken is not None:
        raise ModelError(f"{shown}: {broken} holds NaN or infinite weights; the model would predict nothing sensible")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, device: torch.device, shown: str | None = None) -> nn.Module:
    """A model with the weights saved at `path` (a state dict), in evaluation mode on `device`."""
    shown = shown or str(path)
    state, expected = load_state(path, shown), model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or reshaped:
        first = (f"{missing[0]} is missing" if missing else f"{unexpected[0]} is not in the network" if unexpected
                 else f"{reshaped[0]} has shape {tuple(state[reshaped[0]].shape)}, the network {tuple(expected[reshaped[0]].shape)}")
        raise ModelError(f"{shown} does not fit this network: {first} ({len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(reshaped)} of another shape)")
    model.load_state_dict(state)
    return model.to(device).eval()
