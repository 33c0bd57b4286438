"""Stage 3: the selected encoders retrained at the final size (Tables 4–7)."""

from __future__ import annotations

import pandas as pd

from spineseg.study.session import Study
from spineseg.study.stage0_data import StudyData
from spineseg.study.stage2_selection import selected_encoders
from spineseg.study.store import RunSpec
from spineseg.study.training import run_spec, train_and_collect


def stage3_specs(study: Study, data: StudyData) -> list[RunSpec]:
    s2, s3 = study.cfg.stage2, study.cfg.stage3
    return [run_spec(data, "stage3", encoder, seed, s3, augment=s2.augment, pretrained=s2.pretrained,
                     architecture=s2.architecture)
            for encoder in selected_encoders(study) for seed in range(s3.repeats)]


def run_stage3(study: Study, data: StudyData) -> pd.DataFrame:
    return train_and_collect(study, data, "stage3", stage3_specs(study, data), lambda spec: spec.encoder)


def ensemble_members(study: Study, data: StudyData) -> list[RunSpec]:
    """The runs whose probabilities stage 4 combines: the first repeat of each selected encoder."""
    return [spec for spec in stage3_specs(study, data) if spec.seed == 0]
