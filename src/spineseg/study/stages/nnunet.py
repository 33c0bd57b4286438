"""nnU-Net v2 as the study's peer (`nnunet.enabled`): trained in stage 3 on the study's own split at the profile's
budget, scored in stage 4 on the same test images, with the same metrics and identification, as the ensembles.

Its folder under the shared store is keyed by the budget, the device and the data fingerprint, like a training
run's: another budget or other data trains a new one, a rerun with the same finds it done (or resumes its last
epoch). nnU-Net predicts at the stored image size; its probability is brought to the members' evaluation grid
(area-averaged) and thresholded at ½, nnU-Net's own argmax for two classes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spineseg import nnunet_peer
from spineseg.data.nnunet import export_nnunet
from spineseg.device import pick_device
from spineseg.errors import StageOrderError
from spineseg.study.core.session import Study, StudyData
from spineseg.study.stages.ensemble_inputs import EnsembleInputs

DONE = "DONE"


def peer_folder(study: Study, data: StudyData) -> Path | None:
    """The peer's work folder in the store, or None when the profile does not ask for it."""
    cfg = study.cfg.nnunet
    if not cfg.enabled:
        return None
    key = {"settings": cfg.model_dump(), "device": pick_device(study.cfg.device).type, "threads": study.cfg.threads,
           "data": data.fingerprint}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return study.layout.store / f"nnunet-{cfg.epochs}x{cfg.iterations}-{digest}"


def budget(study: Study) -> nnunet_peer.Budget:
    cfg = study.cfg.nnunet
    return nnunet_peer.Budget(cfg.epochs, cfg.iterations, cfg.validation_iterations, cfg.augmentation_workers,
                              study.cfg.threads)


def run_nnunet(study: Study, data: StudyData) -> pd.DataFrame:
    """Export the split, train nnU-Net at the budget and predict the test sets (each step once; a rerun finds
    them done); one row: its plan, budget and minutes. Empty when the profile does not ask for it."""
    work = peer_folder(study, data)
    if work is None:
        return pd.DataFrame()
    if not (work / DONE).is_file():
        nnunet_peer.require()  # before the export: one line naming the extra
        cfg = study.cfg.nnunet
        raw = work / nnunet_peer.RAW
        if not any(raw.glob(f"Dataset{cfg.dataset_id:03d}_*")):
            export_nnunet(data.d1, raw, data.d2, dataset_id=cfg.dataset_id)
        nnunet_peer.train_and_predict(work, cfg.dataset_id, budget(study), pick_device(study.cfg.device).type)
        (work / DONE).write_text("")
    return pd.DataFrame([summary_row(nnunet_peer.read_summary(work))])


def summary_row(summary: dict) -> dict:
    """What the notebook and the results show of one trained peer."""
    minutes = summary["minutes"]
    return {"nnU-Net": summary["nnunetv2"], "configuration": summary["configuration"],
            "patch": "×".join(str(side) for side in summary["patch_size"]), "batch": summary["batch_size"],
            "epochs × batches": f"{summary['budget']['epochs']} × {summary['budget']['iterations']}",
            "images seen": summary["batches"] * summary["batch_size"], "training images": summary["training_cases"],
            "device": summary["device"], "threads": summary["threads"],
            "train (min)": minutes["train"], "plan (min)": minutes["plan_and_preprocess"],
            "predict (min)": minutes["predict"], "test images": summary["test_cases"]}


@dataclass(frozen=True)
class NnUNetPeer:
    """The trained peer in stage 4: its masks of a test split on the members' evaluation grid."""

    work: Path

    @classmethod
    def load(cls, study: Study, data: StudyData) -> NnUNetPeer | None:
        work = peer_folder(study, data)
        if work is None:
            return None
        if not (work / DONE).is_file():
            raise StageOrderError(f"nnunet.enabled, but nnU-Net has not finished at {work}: run "
                                  f"`spineseg run --profile {study.name} --stages 3` first")
        return cls(work)

    def probabilities(self, inputs: EnsembleInputs, dataset: str) -> np.ndarray:
        """[N, H, W] on the inputs' grid."""
        grid = inputs.masks.shape[1:]
        maps = [torch.from_numpy(nnunet_peer.foreground_probability(self.work, f"{dataset}_{case}"))[None, None]
                for case in inputs.ids]
        return np.stack([torch.nn.functional.interpolate(p, size=grid, mode="area")[0, 0].numpy() for p in maps])

    def masks(self, inputs: EnsembleInputs, dataset: str) -> np.ndarray:
        return self.probabilities(inputs, dataset) > 0.5

    def summary(self) -> dict:
        return nnunet_peer.read_summary(self.work)
