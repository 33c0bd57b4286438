"""The two-stage variant, whole: its crop model's training spec and training (stage 3), its competition
with the ensemble rules on validation and its masks on test (stage 4), and its cost (the timing table).

A rule chosen on dataset-1 validation (the *locator*) finds Th8–Th11 on the whole radiograph; the crop
model (`spineseg.crops.CropModel`, the same wrapper `spineseg predict` uses) outlines it in a box around
that mask. The variant joins the rules only when ``two_stage.enabled``; it is chosen only if it beats
them on validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from spineseg.crops import CropGeometry, CropModel
from spineseg.device import pick_device
from spineseg.ensemble import combine
from spineseg.predict import Segmenter, ensemble_forward
from spineseg.study.core.executors import make_executor
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import RunSpec, load_trained, require_trained, run_all
from spineseg.study.runs.training import run_spec
from spineseg.study.stages.ensemble_inputs import EnsembleInputs


def crop_spec(study: Study, data: StudyData) -> RunSpec | None:
    """The crop model's training run, or None when the profile does not ask for the variant."""
    cfg = study.cfg.two_stage
    if not cfg.enabled:
        return None
    geometry = CropGeometry(cfg.image_size, cfg.margin, cfg.jitter, cfg.scale_jitter, cfg.copies)
    spec = run_spec(study, data, "stage3", cfg.encoder, 0, cfg, augment=cfg.augment, pretrained=cfg.pretrained)
    return replace(spec, crop=geometry)


def run_crop_model(study: Study, data: StudyData) -> pd.DataFrame:
    """Train the crop model (once; a rerun skips it) and return its summary, empty when it is not asked for."""
    spec = crop_spec(study, data)
    if spec is None:
        return pd.DataFrame()
    executor = make_executor(study.cfg.executor, "stage 3: the crop model")
    summary = run_all([spec], data, study.layout.store, study.cfg.device, executor)[0]
    # its validation DSC is on crops around the true region: stage 4 scores it behind a locator
    return pd.DataFrame([summary])[["encoder", "image_size", "best_val_dsc", "best_epoch", "epochs_run", "seconds"]]


def trained_crop_model(study: Study, data: StudyData, device: torch.device) -> CropModel | None:
    """The crop model with its best weights; None when the profile does not ask for one."""
    spec = crop_spec(study, data)
    if spec is None:
        return None
    require_trained(spec, study.layout.store, "two_stage.enabled, but its crop model", study.name)
    return CropModel(load_trained(study.layout.store, spec, device), spec.crop)


@dataclass(frozen=True)
class TwoStage:
    """The variant in stage 4: `locator`, a rule chosen on validation, finds Th8–Th11; the crop model outlines it."""

    crop: CropModel
    locator: str
    threshold: float
    device: torch.device

    @classmethod
    def load(cls, study: Study, data: StudyData, locator: str) -> TwoStage | None:
        device = pick_device(study.cfg.device)
        crop = trained_crop_model(study, data, device)
        return None if crop is None else cls(crop, locator, study.cfg.stage4.threshold, device)

    def locate(self, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return combine(probs, self.locator, self.threshold, weights=weights if self.locator == "weighted" else None)

    def masks(self, inputs: EnsembleInputs) -> np.ndarray:
        return self.outline(self.locate(inputs.probs, inputs.val_dsc), inputs.images)

    def outline(self, located: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The crop model's masks [N, H, W] in boxes around `located` regions."""
        return self.crop.outline(images, located, self.device) > self.threshold

    def timing_step(self, members: list[Segmenter], weights: np.ndarray, image: torch.Tensor) -> Callable[[], np.ndarray]:
        """What one image costs: the members' forwards, the locating rule, then the crop model."""

        def step() -> np.ndarray:
            located = self.locate(ensemble_forward(members, image), weights)
            return self.crop.outline(image[:, 0].cpu().numpy(), located, self.device)

        return step
