"""What every ensemble result starts from: the stage-3 members' cached probabilities of one split.

Each member ran once per image in stage 3 (`spineseg.study.runs.store`); stage 4, its figures, the
explorer and the case studies all read those maps through `ensemble_inputs`, checked against the
dataset's ids, so trying another rule or threshold costs no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spineseg.data import load_split, splits_present
from spineseg.errors import StageOrderError
from spineseg.study.core.artifacts import RunFiles
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import load_probs
from spineseg.study.stages.stage3_final import ensemble_members


@dataclass(frozen=True)
class EnsembleInputs:
    """The stage-3 models' cached probabilities for one dataset split, stacked [M, N, H, W] on its evaluation grid."""

    names: list[str]
    ids: list[str]
    patients: list[str]
    probs: np.ndarray
    masks: np.ndarray
    images: np.ndarray
    labels: np.ndarray | None  # the level label maps, where the dataset has them
    levels: list[np.ndarray | None]  # each member's ordered level maps (level-aware members)
    val_dsc: np.ndarray  # each model's best validation DSC (weights for weighted voting)
    threshold: float  # the ensembles' T (stage4.threshold): what every reader of these inputs thresholds them at


def ensemble_inputs(study: Study, data: StudyData, dataset: str, split: str) -> EnsembleInputs:
    """Stack the cached probabilities of the ensemble's members (as stage 3 recorded them), checked against the
    dataset's ids."""
    members = ensemble_members(study, data).members
    folder = data.folder(dataset)
    cached = [load_probs(RunFiles(study.layout.store / m.folder), m.name, dataset, split) for m in members]
    loaded = load_split(folder, split, cached[0].probs.shape[1:], labels=True)
    for member, prediction in zip(members, cached):
        if prediction.ids != list(loaded.ids) or prediction.probs.shape[1:] != loaded.size:
            raise StageOrderError(f"cached probabilities of {member.folder} do not match {folder} ({split}); rerun stage 3")
    return EnsembleInputs([m.name for m in members], list(loaded.ids), list(loaded.patients),
                          np.stack([p.probs for p in cached]), loaded.masks, loaded.images, loaded.labels,
                          [p.levels for p in cached], np.array([m.validation_dsc for m in members]),
                          study.cfg.stage4.threshold)


def available_eval_sets(data: StudyData) -> list[tuple[str, str]]:
    """(dataset, split) pairs reported in the ensemble tables: D1 test and, when present, D2 test."""
    return [(name, split) for name, folder, split in data.eval_splits()
            if split == "test" and split in splits_present(folder)]
