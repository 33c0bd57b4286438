"""Stage 1: U-Net with the stage-1 encoder, trained repeatedly with and without augmentation (Table 1)."""

from __future__ import annotations

import pandas as pd

from spineseg.names import AUGMENTATION_GROUPS
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import RunSpec
from spineseg.study.runs.training import run_spec, train_and_collect


def stage1_specs(study: Study, data: StudyData) -> list[RunSpec]:
    s = study.cfg.stage1
    return [run_spec(study, data, "stage1", s.encoder, seed, s, augment=augment, pretrained=s.pretrained,
                     weights_path=s.weights_path)
            for augment in (False, True) for seed in range(s.repeats)]


def run_stage1(study: Study, data: StudyData) -> pd.DataFrame:
    """Per-image test metrics of both arms, grouped as "Without/With augmentation"."""
    return train_and_collect(study, data, "stage1", stage1_specs(study, data),
                             lambda spec: AUGMENTATION_GROUPS[spec.augment])
