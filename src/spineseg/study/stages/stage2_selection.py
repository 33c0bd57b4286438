"""Stage 2: every candidate encoder, repeated (Tables 2–3); the ensemble's members chosen on validation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spineseg import atomic
from spineseg.errors import StageOrderError
from spineseg.names import candidate_name
from spineseg.study.core.artifacts import SCRATCH_TWINS, read_table
from spineseg.study.core.config import Stage2
from spineseg.study.core.records import Selection
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import RunSpec
from spineseg.study.runs.training import run_spec, train_and_collect


def stage2_specs(study: Study, data: StudyData, encoders: list[str] | None = None, pretrained: str | None = None) -> list[RunSpec]:
    """The candidate grid; `encoders` and `pretrained` give the from-scratch twins of some of them."""
    s = study.cfg.stage2
    return [run_spec(study, data, "stage2", encoder, seed, s, augment=s.augment,
                     pretrained=pretrained or s.weights_of(encoder), architecture=s.architecture,
                     weights_path="" if pretrained else s.weights_path.get(encoder, ""), target=target)
            for encoder in (s.encoders if encoders is None else encoders) for target in s.targets for seed in range(s.repeats)]


def scratch_twin_specs(study: Study, data: StudyData) -> list[RunSpec]:
    """`stage2.scratch_twins` from scratch, every other setting as their ImageNet-initialised runs."""
    return stage2_specs(study, data, study.cfg.stage2.scratch_twins, pretrained="none")


def run_stage2(study: Study, data: StudyData) -> pd.DataFrame:
    """Train the grid, write the validation ranking and the selection, then train the from-scratch twins."""
    frame = train_and_collect(study, data, "stage2", stage2_specs(study, data), lambda spec: spec.candidate)
    section = study.cfg.stage2
    ranking = select_encoders(read_table(study.layout.runs_table("stage2")), section)
    atomic.write_csv(study.layout.ranking, ranking)
    chosen = ranking.loc[ranking["selected"], ["encoder", "target"]]
    if chosen.empty:
        best = ranking["mean_val_dsc"].max()
        raise StageOrderError(f"no candidate reached stage2.min_val_dsc = {section.min_val_dsc} "
                              f"(best mean validation DSC {best:.4f}); lower it or train longer")
    Selection(tuple(zip(chosen["encoder"], chosen["target"]))).save(study.layout.selection)
    if section.scratch_twins:
        train_and_collect(study, data, SCRATCH_TWINS, scratch_twin_specs(study, data), lambda spec: spec.candidate,
                          hflip=section.tta_hflip)
    return frame


def select_encoders(runs: pd.DataFrame, section: Stage2) -> pd.DataFrame:
    """Rank candidates (encoder and target) by mean validation DSC over repeats; keep the top k at or
    above the threshold.

    Uses validation data only: test metrics never influence which models enter the ensemble.
    """
    ranking = (runs.groupby(["encoder", "target"], sort=False)["best_val_dsc"]
               .agg(mean_val_dsc="mean", std_val_dsc="std", runs="count")
               .reset_index().sort_values("mean_val_dsc", ascending=False, kind="stable", ignore_index=True))
    ranking.insert(0, "candidate", [candidate_name(e, t) for e, t in zip(ranking["encoder"], ranking["target"])])
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    eligible = ranking["mean_val_dsc"] >= section.min_val_dsc
    ranking["selected"] = eligible & (eligible.cumsum() <= section.top_k)
    return ranking


def selected_candidates(study: Study) -> list[tuple[str, str]]:
    """(encoder, target) of every candidate stage 2 selected, best first."""
    return list(Selection.load(study.layout.selection).candidates)
