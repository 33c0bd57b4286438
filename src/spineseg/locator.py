"""The locator: a network that maps where each vertebra of the chain C7, T1…L5, S1 lies, and the chain
decoded from its maps (`spineseg.chain`) — the four vertebrae it names are Th8–Th11.

Its network is any encoder of `spineseg.encoders` with row and column planes, trained with the `Centres`
objective (`spineseg.objectives`) by `spineseg.train.fit`, early-stopped on the share of validation
images it names right (`identified_share`).
"""

from __future__ import annotations

import numpy as np
import torch

from spineseg.chain import Chain, ChainPrior, decode
from spineseg.device import autocast
from spineseg.identification import centre_errors, vertebra_centres
from spineseg.predict import Segmenter, as_batch
from spineseg.vertebrae import CHAIN_CODES


class Locator:
    """A trained locator: its network (`spineseg.predict.Segmenter` with the `Centres` objective), the chain
    prior of its training radiographs, and whether it averages each image with its mirror image."""

    def __init__(self, model: Segmenter, prior: ChainPrior, hflip: bool = True):
        self.model, self.prior, self.hflip = model, prior, hflip

    def heatmaps(self, images: np.ndarray, device: torch.device, batch_size: int = 8, precision: str = "auto") -> np.ndarray:
        """float32 [N, L, h, w] maps of images [N, h, w] at the model's input size (the mirror's mirrored back in:
        flipping sideways keeps every vertebra's level)."""
        self.model.eval()
        out = np.empty((len(images), len(CHAIN_CODES), *np.shape(images)[1:]), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = as_batch(images[start:start + batch_size], device)
                with autocast(device, precision):
                    maps = self.model(x).float()
                    if self.hflip:
                        maps = (maps + self.model(x.flip(-1)).float().flip(-1)) / 2
                out[start:start + len(x)] = maps.cpu().numpy()
        return out

    def chains(self, images: np.ndarray, device: torch.device, batch_size: int = 8, precision: str = "auto") -> list[Chain]:
        """Each image's chain, on the grid of `images` (the model's input size)."""
        return [decode(maps, self.prior) for maps in self.heatmaps(images, device, batch_size, precision)]


def identified_share(chains: list[Chain], labels: np.ndarray) -> float:
    """The share of images whose chain names Th8–Th11 right (`spineseg.identification`'s centre criterion),
    against label maps [N, H, W] on the chains' grid."""
    found = [bool((centre_errors(chain.region_centres(), vertebra_centres(label_map)) == 0).all())
             for chain, label_map in zip(chains, labels)]
    return float(np.mean(found)) if found else float("nan")
