"""Stage 3: the selected encoders retrained at the final size (Tables 4–7).

The article does not say where stage 3 starts; ``stage3.init_from`` chooses: ``imagenet`` (the literal
reading, "retrained": the encoders' ImageNet weights, as in stage 2) or ``stage2`` (the stage-2 run of
the same encoder and seed, or its first seed, continued at the final size).

With ``two_stage.enabled`` the stage-3 notebook also trains the crop model of the two-stage variant
(`spineseg.study.stages.two_stage`).
"""

from __future__ import annotations

import pandas as pd

from spineseg.study.core.records import EnsembleMember, EnsembleMembers
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import RunSpec
from spineseg.study.runs.training import load_stage_runs, run_spec, train_and_collect
from spineseg.study.stages.stage2_selection import selected_candidates, stage2_specs


def stage3_specs(study: Study, data: StudyData) -> list[RunSpec]:
    s2, s3 = study.cfg.stage2, study.cfg.stage3
    specs = []
    for encoder, target in selected_candidates(study):
        for seed in range(s3.repeats):
            common = {"augment": s2.augment, "architecture": s2.architecture, "target": target}
            if s3.init_from == "stage2":
                start = _stage2_run(study, data, encoder, target, seed)
                specs.append(run_spec(study, data, "stage3", encoder, seed, s3, pretrained="none", init=start, **common))
            else:
                specs.append(run_spec(study, data, "stage3", encoder, seed, s3, pretrained=s2.weights_of(encoder),
                                      weights_path=s2.weights_path.get(encoder, ""), **common))
    return specs


def _stage2_run(study: Study, data: StudyData, encoder: str, target: str, seed: int) -> str:
    """The folder of the stage-2 run a stage-3 run continues: same candidate and seed, else its first seed."""
    runs = {spec.seed: spec for spec in stage2_specs(study, data) if (spec.encoder, spec.target) == (encoder, target)}
    return runs.get(seed, runs[min(runs)]).folder_name()


def run_stage3(study: Study, data: StudyData) -> pd.DataFrame:
    """Train the selected encoders at the final size, then record which runs form the ensemble."""
    specs = stage3_specs(study, data)
    metrics = train_and_collect(study, data, "stage3", specs, lambda spec: spec.candidate)
    write_members(study, data, specs)
    return metrics


def write_members(study: Study, data: StudyData, specs: list[RunSpec]) -> EnsembleMembers:
    """The ensemble: the first repeat of each selected encoder, with its best validation DSC (the weights of
    weighted voting), recorded once for every later reader."""
    runs = load_stage_runs(study, "stage3").set_index("folder")
    members = EnsembleMembers(tuple(EnsembleMember(spec.candidate, spec.folder_name(),
                                                   float(runs.loc[spec.folder_name(), "best_val_dsc"]))
                                    for spec in specs if spec.seed == 0), data.fingerprint)
    members.save(study.layout.members)
    return members


def ensemble_members(study: Study, data: StudyData) -> EnsembleMembers:
    """The members stage 3 recorded, checked against the study's data."""
    return EnsembleMembers.load(study.layout.members).checked(study.layout.members, data.fingerprint)
