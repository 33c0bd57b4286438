"""The located variant, whole: the locator's training spec and training (stage 3), its chains on every split,
and its masks in stage 4, where it competes with the rules on validation.

The locator (`spineseg.locator`) names Th8–Th11 by placing the whole chain C7…S1; the mask is then the crop
model's outline in a box around the four vertebrae it names (without a crop model: the level-aware members'
vertebrae there), kept to the rows the chain gives those four. It is the only result whose *which four* does
not come from the members' own level maps.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from spineseg.chain import Chain
from spineseg.crops import CropModel
from spineseg.device import pick_device
from spineseg.errors import StageOrderError
from spineseg.identification import identification_table
from spineseg.located_mask import crop_outline, region_masks, vertebrae_outline
from spineseg.locator import Locator
from spineseg.names import CENTRES
from spineseg.study.core.executors import make_executor
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import (
    OUTSIDE_CODES,
    RunSpec,
    damaged,
    load_chain_prior,
    load_trained,
    require_trained,
    run_all,
)
from spineseg.study.runs.training import run_spec
from spineseg.study.stages.ensemble_inputs import EnsembleInputs
from spineseg.study.stages.two_stage import trained_crop_model

_OUTSIDE_NAMES = {code: name for name, code in OUTSIDE_CODES.items()}


def locator_spec(study: Study, data: StudyData) -> RunSpec | None:
    """The locator's training run, or None when the profile does not ask for one."""
    cfg = study.cfg.locator
    if not cfg.enabled:
        return None
    return run_spec(study, data, "stage3", cfg.encoder, 0, cfg, augment=True, pretrained=cfg.pretrained, target=CENTRES)


def run_locator(study: Study, data: StudyData) -> pd.DataFrame:
    """Train the locator (once; a rerun skips it) and return its summary, empty when it is not asked for."""
    spec = locator_spec(study, data)
    if spec is None:
        return pd.DataFrame()
    executor = make_executor(study.cfg.executor, "stage 3: the locator")
    summary = run_all([spec], data, study.layout.store, study.cfg.device, executor, hflip=study.cfg.locator.tta_hflip)[0]
    row = pd.DataFrame([summary])[["encoder", "image_size", "best_val_dsc", "best_epoch", "epochs_run", "seconds"]]
    return row.rename(columns={"best_val_dsc": "validation identified (centres)"})


def cached_chains(study: Study, spec: RunSpec, dataset: str, split: str, ids: list[str]) -> list[Chain]:
    """The locator's chains of one split (stage 3 wrote them on the split's evaluation grid), checked against its ids."""
    path = spec.files(study.layout.store).chains(dataset, split)
    if not path.is_file():
        raise StageOrderError(f"no locator chains at {path}: run `spineseg run --profile {study.name} --stages 3` first")
    try:
        with np.load(path) as saved:
            found, centres, outside, evidence = [str(i) for i in saved["ids"]], saved["centres"], saved["outside"], saved["evidence"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise damaged(path, exc) from None
    if found != list(ids):
        raise StageOrderError(f"the locator's chains at {path} do not match the images of {dataset} {split}; rerun stage 3")
    return [Chain(c.astype(float), tuple(_OUTSIDE_NAMES[int(k)] for k in o), e.astype(float), 0.0)
            for c, o, e in zip(centres, outside, evidence)]


@dataclass(frozen=True)
class Located:
    """The variant in stage 4: the locator's chains name Th8–Th11, the crop model (or the members) outlines them."""

    study: Study
    spec: RunSpec
    crop: CropModel | None
    threshold: float
    device: torch.device

    @classmethod
    def load(cls, study: Study, data: StudyData) -> Located | None:
        spec = locator_spec(study, data)
        if spec is None:
            return None
        require_trained(spec, study.layout.store, "locator.enabled, but the locator", study.name)
        device = pick_device(study.cfg.device)
        return cls(study, spec, trained_crop_model(study, data, device), study.cfg.stage4.threshold, device)

    def chains(self, inputs: EnsembleInputs, dataset: str, split: str) -> list[Chain]:
        return cached_chains(self.study, self.spec, dataset, split, inputs.ids)

    def can_outline(self, inputs: EnsembleInputs) -> bool:
        """Whether anything can draw the four vertebrae the locator names: the crop model or a level-aware member.
        Without either the locator still names them (its centres are scored), but there is no located mask."""
        return self.crop is not None or any(levels is not None for levels in inputs.levels)

    def masks(self, inputs: EnsembleInputs, dataset: str, split: str) -> np.ndarray:
        return self.outline(self.chains(inputs, dataset, split), inputs)

    def outline(self, chains: list[Chain], inputs: EnsembleInputs) -> np.ndarray:
        """The four named vertebrae's mask [N, H, W] (`can_outline` must hold)."""
        if self.crop is not None:
            return crop_outline(self.crop, inputs.images, chains, self.device) > self.threshold
        named = region_masks(chains, inputs.masks.shape[1:], beside=False)
        return (vertebrae_outline(inputs.levels) > self.threshold) & named

    def centres_table(self, inputs: EnsembleInputs, dataset: str, split: str) -> pd.DataFrame:
        """Identification of the locator's own centres (no mask: the centre criterion alone)."""
        chains = self.chains(inputs, dataset, split)
        return identification_table(np.zeros(inputs.masks.shape, dtype=bool), inputs.labels,
                                    [chain.region_centres() for chain in chains])

    def locator(self) -> Locator:
        """The trained locator with its chain prior, as stage 3 evaluated it."""
        return Locator(load_trained(self.study.layout.store, self.spec, self.device),
                       load_chain_prior(self.spec.files(self.study.layout.store)), self.study.cfg.locator.tta_hflip)

    def timing_step(self, locator: Locator, image: torch.Tensor) -> Callable[[], np.ndarray]:
        """What one image costs: the locator's forward (and its mirror's) and chain, then the crop model."""
        size = self.spec.image_size

        def step() -> np.ndarray:
            full = image[:, 0].cpu().numpy()
            small = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            factor = np.asarray(full.shape[1:], dtype=float) / np.asarray(size, dtype=float)
            chains = [chain.scaled(factor) for chain in locator.chains(small, self.device)]
            region = region_masks(chains, full.shape[1:])
            return self.crop.outline(full, region, self.device) if self.crop is not None else region

        return step

