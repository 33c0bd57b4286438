"""The study's stages as library calls: what each notebook runs, and the artifacts it leaves.

Layout under ``runs/<profile>/``: ``data/`` (datasets), ``train/`` (one folder per training run),
``stage1`` … ``stage4`` (per-stage tables and per-image metrics), ``tables/`` and ``notebooks/``.
Each stage reads only what earlier stages wrote, so a notebook can be re-executed on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from spineseg import atomic
from spineseg.config import load_profile
from spineseg.data import load_split, read_manifest, splits_present
from spineseg.runs import RunSpec, StudyData, load_metrics, load_probs, run_all
from spineseg.train import configure_threads

AUGMENTATION_GROUPS = {False: "Without augmentation", True: "With augmentation"}


class StageOrderError(RuntimeError):
    """A stage needs an artifact that an earlier stage writes."""


@dataclass(frozen=True)
class Study:
    """A profile's configuration and where its artifacts live."""

    cfg: dict
    project: Path

    @property
    def name(self) -> str:
        return self.cfg["name"]

    @property
    def run_dir(self) -> Path:
        return self.project / "runs" / self.name

    @property
    def store(self) -> Path:
        return self.run_dir / "train"

    @property
    def tables_dir(self) -> Path:
        return self.run_dir / "tables"

    @property
    def figures_dir(self) -> Path:
        return self.project / "figures" / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage


def find_project(start: Path | None = None) -> Path:
    """The folder holding ``params/`` and ``pyproject.toml``, searched upwards from ``start``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    raise FileNotFoundError(f"no spineseg project (a folder with params/ and pyproject.toml) at or above {here}")


def open_study(profile: str = "quick", overrides: Mapping[str, Any] | None = None,
               project_dir: str | Path | None = None) -> Study:
    project = Path(project_dir).resolve() if project_dir else find_project()
    study = Study(load_profile(project / "params" / f"{profile}.yaml", overrides), project)
    configure_threads(study.cfg["threads"])
    return study


# ---------------------------------------------------------------- data


def prepare_data(study: Study) -> StudyData:
    """Make (synthetic, AASCE) or locate (folder) the two datasets; generation happens once."""
    cfg = study.cfg["data"]
    out = study.run_dir / "data"
    if cfg["source"] == "folder":
        d1 = (study.project / cfg["d1"]).resolve()
        d2 = (study.project / cfg["d2"]).resolve() if cfg["d2"] else None
        for folder in (d1, d2):
            if folder is not None:
                read_manifest(folder)
        return StudyData(d1, d2)
    stamp = out / "source.json"
    wanted = {k: cfg[k] for k in ("source", "seed", "size", "d1_count", "d2_count", "aasce_src")}
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        if cfg["source"] == "synthetic":
            from spineseg.data.synthetic import synthesize

            synthesize(out, seed=cfg["seed"], size=cfg["size"], counts={"d1": cfg["d1_count"], "d2": cfg["d2_count"]})
        else:
            from spineseg.data.aasce import convert

            src = (study.project / cfg["aasce_src"]).resolve()
            convert(src, out, size=cfg["size"], seed=cfg["seed"], names={"training": "d1", "test": "d2"})
        atomic.write_json(stamp, wanted)
    d2 = out / "d2"
    return StudyData(out / "d1", d2 if (d2 / "manifest.csv").is_file() else None)


def data_summary(data: StudyData) -> pd.DataFrame:
    rows = []
    for name, folder in (("d1", data.d1), ("d2", data.d2)):
        if folder is None:
            continue
        manifest = read_manifest(folder)
        for split, count in manifest["split"].value_counts().items():
            rows.append({"dataset": name, "split": split, "images": int(count),
                         "patients": int(manifest.loc[manifest["split"] == split, "patient"].nunique())})
    return pd.DataFrame(rows).sort_values(["dataset", "split"], ignore_index=True)


# ---------------------------------------------------------------- training stages


def _spec(data: StudyData, stage: str, encoder: str, seed: int, section: Mapping,
          augment: bool, pretrained: str, architecture: str = "unet") -> RunSpec:
    return RunSpec(stage=stage, encoder=encoder, image_size=section["image_size"], seed=seed,
                   batch_size=section["batch_size"], lr=section["lr"], max_epochs=section["max_epochs"],
                   patience=section["patience"], augment=augment, architecture=architecture,
                   pretrained=pretrained, data=data.fingerprint())


def stage1_specs(study: Study, data: StudyData) -> list[RunSpec]:
    s = study.cfg["stage1"]
    return [_spec(data, "stage1", s["encoder"], seed, s, augment, s["pretrained"])
            for augment in (False, True) for seed in range(s["repeats"])]


def stage2_specs(study: Study, data: StudyData) -> list[RunSpec]:
    s = study.cfg["stage2"]
    return [_spec(data, "stage2", encoder, seed, s, s["augment"], s["pretrained"], s["architecture"])
            for encoder in s["encoders"] for seed in range(s["repeats"])]


def stage3_specs(study: Study, data: StudyData) -> list[RunSpec]:
    s2, s3 = study.cfg["stage2"], study.cfg["stage3"]
    return [_spec(data, "stage3", encoder, seed, s3, s2["augment"], s2["pretrained"], s2["architecture"])
            for encoder in selected_encoders(study) for seed in range(s3["repeats"])]


def _train_and_collect(study: Study, data: StudyData, stage: str, specs: list[RunSpec], group) -> pd.DataFrame:
    summaries = pd.DataFrame(run_all(specs, data, study.store, study.cfg["device"]))
    atomic.write_csv(study.stage_dir(stage) / "runs.csv", summaries)
    for split in ("test", "val"):
        frame = load_metrics(study.store, specs, group, split=split)
        atomic.write_csv(study.stage_dir(stage) / f"metrics_{split}.csv", frame)
    return load_stage_metrics(study, stage)


def run_stage1(study: Study, data: StudyData) -> pd.DataFrame:
    """U-Net (stage-1 encoder) with and without augmentation; per-image test metrics."""
    return _train_and_collect(study, data, "stage1", stage1_specs(study, data),
                              lambda spec: AUGMENTATION_GROUPS[spec.augment])


def run_stage2(study: Study, data: StudyData) -> pd.DataFrame:
    """Every candidate encoder, repeated; writes the validation ranking and the selection."""
    frame = _train_and_collect(study, data, "stage2", stage2_specs(study, data), lambda spec: spec.encoder)
    ranking = select_encoders(pd.read_csv(study.stage_dir("stage2") / "runs.csv"), study.cfg["stage2"])
    atomic.write_csv(study.stage_dir("stage2") / "ranking.csv", ranking)
    chosen = ranking.loc[ranking["selected"], "encoder"].tolist()
    if not chosen:
        best = ranking["mean_val_dsc"].max()
        raise StageOrderError(f"no encoder reached stage2.min_val_dsc = {study.cfg['stage2']['min_val_dsc']} "
                              f"(best mean validation DSC {best:.4f}); lower it or train longer")
    atomic.write_json(study.stage_dir("stage2") / "selection.json", {"encoders": chosen})
    return frame


def select_encoders(runs: pd.DataFrame, section: Mapping) -> pd.DataFrame:
    """Rank encoders by mean validation DSC over repeats; keep the top k at or above the threshold.

    Uses validation data only: test metrics never influence which models enter the ensemble.
    """
    ranking = (runs.groupby("encoder", sort=False)["best_val_dsc"].agg(mean_val_dsc="mean", std_val_dsc="std", runs="count")
               .reset_index().sort_values("mean_val_dsc", ascending=False, kind="stable", ignore_index=True))
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    eligible = ranking["mean_val_dsc"] >= section["min_val_dsc"]
    ranking["selected"] = eligible & (eligible.cumsum() <= section["top_k"])
    return ranking


def selected_encoders(study: Study) -> list[str]:
    path = study.stage_dir("stage2") / "selection.json"
    if not path.is_file():
        raise StageOrderError(f"{path} is missing: run stage 2 (02_backbone_selection) first")
    return json.loads(path.read_text())["encoders"]


def run_stage3(study: Study, data: StudyData) -> pd.DataFrame:
    """The selected encoders retrained at the final resolution."""
    return _train_and_collect(study, data, "stage3", stage3_specs(study, data), lambda spec: spec.encoder)


def load_stage_metrics(study: Study, stage: str, split: str = "test") -> pd.DataFrame:
    path = study.stage_dir(stage) / f"metrics_{split}.csv"
    if not path.is_file():
        raise StageOrderError(f"{path} is missing: run {stage} first")
    return pd.read_csv(path, dtype={"id": str, "group": str})


def load_stage_runs(study: Study, stage: str) -> pd.DataFrame:
    path = study.stage_dir(stage) / "runs.csv"
    if not path.is_file():
        raise StageOrderError(f"{path} is missing: run {stage} first")
    return pd.read_csv(path)


# ---------------------------------------------------------------- ensembles


@dataclass(frozen=True)
class EnsembleInputs:
    """The stage-3 models' cached probabilities for one dataset split, stacked [M, N, H, W]."""

    names: list[str]
    ids: list[str]
    probs: np.ndarray
    masks: np.ndarray
    val_dsc: np.ndarray  # each model's best validation DSC (weights for weighted voting)


def ensemble_inputs(study: Study, data: StudyData, dataset: str, split: str) -> EnsembleInputs:
    """Stack cached probabilities of the stage-3 models (first repeat of each encoder)."""
    specs = [spec for spec in stage3_specs(study, data) if spec.seed == 0]
    runs = load_stage_runs(study, "stage3").set_index("folder")
    folder = data.d1 if dataset == "d1" else data.d2
    loaded = load_split(folder, split, specs[0].image_size)
    probs = []
    for spec in specs:
        ids, p = load_probs(study.store, spec, dataset, split)
        if list(ids) != list(loaded.ids):
            raise StageOrderError(f"cached probabilities of {spec.folder_name()} do not match {folder} ({split}); rerun stage 3")
        probs.append(p)
    val_dsc = np.array([runs.loc[spec.folder_name(), "best_val_dsc"] for spec in specs], dtype=float)
    return EnsembleInputs([s.encoder for s in specs], list(loaded.ids), np.stack(probs), loaded.masks, val_dsc)


def available_eval_sets(data: StudyData) -> list[tuple[str, str]]:
    """(dataset, split) pairs reported in the ensemble tables: D1 test and, when present, D2 test."""
    return [(name, split) for name, folder, split in data.eval_splits()
            if split == "test" and split in splits_present(folder)]
