"""What the three training stages share: turning a profile section into run specs, and collecting
the finished runs' per-image metrics into the stage's tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import pandas as pd

from spineseg import atomic
from spineseg.encoders import has_imagenet_weights
from spineseg.errors import StageOrderError
from spineseg.study.core.artifacts import read_table
from spineseg.study.core.config import Training
from spineseg.study.core.executors import make_executor
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import RunSpec, load_metrics, run_all, summary_columns
from spineseg.train import TrainSettings

_SETTINGS = {f.name for f in fields(TrainSettings)}


def run_spec(study: Study, data: StudyData, stage: str, encoder: str, seed: int, section: Training, *, augment: bool,
             pretrained: str, architecture: str = "unet", weights_path: str = "", init: str | None = None,
             target: str = "binary", optimizer: str = "adam", attention: bool = False) -> RunSpec:
    """One run of `section`'s settings; the hyperparameters are read by name, declared only in the config.

    The encoder-less U-Net has no ImageNet weights: it trains from scratch beside pretrained encoders,
    as in the article. `weights_path` (relative to the project; stage 0 checked that it exists) replaces
    the ImageNet download.
    """
    values = {name: getattr(section, name) for name in _SETTINGS if hasattr(section, name)}
    train = TrainSettings(**{**values, "augment": augment, "seed": seed, "target": target,
                             "precision": study.cfg.precision, "optimizer": optimizer})
    return RunSpec(stage=stage, encoder=encoder, image_size=section.image_size, train=train, architecture=architecture,
                   pretrained=pretrained if has_imagenet_weights(encoder) else "none",
                   weights_path=str((study.project / weights_path).resolve()) if weights_path else None,
                   init=init, attention=attention, data=data.fingerprint)


def train_and_collect(study: Study, data: StudyData, stage: str, specs: list[RunSpec],
                      group: Callable[[RunSpec], str], hflip: bool | None = None) -> pd.DataFrame:
    """Run the grid (skipping finished runs) and write the stage's runs and per-image metrics."""
    hflip = getattr(study.cfg, stage).tta_hflip if hflip is None else hflip
    executor = make_executor(study.cfg.executor, f"{stage}: {len(specs)} runs")
    summaries = pd.DataFrame(run_all(specs, data, study.layout.store, study.cfg.device, executor, hflip=hflip),
                             columns=summary_columns())
    atomic.write_csv(study.layout.runs_table(stage), summaries)
    for split in ("test", "val"):
        frame = load_metrics(study.layout.store, specs, group, split=split)
        atomic.write_csv(study.layout.stage_metrics(stage, split), frame)
    return load_stage_metrics(study, stage)


def load_stage_metrics(study: Study, stage: str, split: str = "test") -> pd.DataFrame:
    path = study.layout.stage_metrics(stage, split)
    if not path.is_file():
        raise StageOrderError(f"{path} is missing: run {stage} first")
    return read_table(path)


def load_stage_runs(study: Study, stage: str) -> pd.DataFrame:
    path = study.layout.runs_table(stage)
    if not path.is_file():
        raise StageOrderError(f"{path} is missing: run {stage} first")
    return read_table(path)


def training_summary(study: Study, stage: str, by: str) -> pd.DataFrame:
    """How the stage's runs trained: best validation DSC, epochs and seconds, per `by` group."""
    runs = load_stage_runs(study, stage)
    return runs.groupby(by)[["best_val_dsc", "best_epoch", "epochs_run", "seconds"]].describe().T.round(3)
