"""A study's ensemble as a bundle that travels: ``spineseg export`` writes it, ``predict --model`` reads it.

A bundle (a zip, or the folder it unpacks to) holds every selected stage-3 member as a model folder
(``model.json`` + ``best.pt``, `spineseg.saved_models`), the crop model when the two-stage or the located
variant won on validation, the locator when the located variant won, the study's learned rule and
threshold (``learned.json``), ``provenance.json``, a model card, and ``bundle.json``, which says how they
fit together. Predicting with it needs neither the project, nor the profile, nor the training data: the
same is true of a study's own run folders, which `study_ensemble` finds without reading (or making) any
dataset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from spineseg import atomic
from spineseg.data.dataset import MANIFEST
from spineseg.errors import ConfigError, StageOrderError
from spineseg.names import LOCATED, TWO_STAGE, rule_name
from spineseg.saved_models import MODEL_FILE, PIXELS, ModelDescription
from spineseg.stats import PATIENT_KEYS, mean_ci_table
from spineseg.study.artifacts import BundleFiles, read_table
from spineseg.study.ensemble_inputs import members_validation_dsc
from spineseg.study.located import locator_spec
from spineseg.study.provenance import code_version
from spineseg.study.records import Learned
from spineseg.study.session import Study
from spineseg.study.stage0_data import StudyData
from spineseg.study.stage3_final import ensemble_members
from spineseg.study.store import RunSpec
from spineseg.study.two_stage import crop_spec
from spineseg.train import BEST

FORMAT = "spineseg-bundle/1"
LOCATOR_FOLDER = "locator_model"  # the located variant's locator, beside `BundleFiles.crop_model`


@dataclass(frozen=True)
class EnsembleFolders:
    """Where an ensemble's models are and what the study decided about them: a study's runs or a bundle."""

    members: list[tuple[Path, float]]  # each member's model folder and validation DSC (weighted voting)
    crop: Path | None  # the two-stage variant's crop model
    threshold: float  # the study's T
    precision: str  # the study's arithmetic (`auto`: fp16 on a GPU, fp32 on a CPU)
    locator: str | None  # the rule stage 4 put in front of the crop model
    origin: str  # what the messages call it: "the study `smoke`", "the bundle x.zip"
    locator_model: Path | None = None  # the located variant's locator (`spineseg.locator`)
    # whether the locator averages each image with its mirror, as the profile's locator.tta_hflip says; where nothing
    # records it (a bundle's hand-made bundle.json), True: the locator's default, with which stage 3 made its chains
    locator_hflip: bool = True


def trained_data(study: Study) -> StudyData:
    """The data the finished stage-3 runs trained on, as their summaries recorded it: no dataset is read or made."""
    runs = study.layout.runs_table("stage3")
    if not runs.is_file():
        raise StageOrderError(f"the study `{study.name}` has no trained ensemble yet ({runs} is missing); "
                              f"run `spineseg run --profile {study.name}` first")
    fingerprints = set(pd.read_csv(runs, usecols=["data"], dtype=str, keep_default_na=False)["data"])  # hex, kept as text
    if len(fingerprints) != 1:
        raise StageOrderError(f"stage 3 of `{study.name}` trained on {len(fingerprints)} versions of the data; "
                              f"run `spineseg run --profile {study.name} --stages 3-4` again")
    return StudyData(dataset_folder(study, "d1"), None, fingerprints.pop())


def dataset_folder(study: Study, name: str) -> Path | None:
    """Where a dataset of the study is (or would be), without making or reading it."""
    cfg = study.cfg.data
    if cfg.source != "folder":
        return study.layout.data_dir / name
    relative = getattr(cfg, name)
    return (study.project / relative).resolve() if relative else None


def _finished(study: Study, spec: RunSpec) -> Path:
    """A finished run's model folder. Predicting only reads it: a run that finished before runs described
    their models gets its model.json from stage 3's rerun, which trains nothing."""
    files = spec.files(study.layout.store)
    if not files.done.is_file():
        raise StageOrderError(f"{spec.folder_name()} of `{study.name}` has not finished; "
                              f"run `spineseg run --profile {study.name} --stages 3` first")
    if not files.model.is_file():
        raise StageOrderError(f"{files.folder} finished before runs described their models (no {files.model.name}): "
                              f"run `spineseg run --profile {study.name} --stages 3` once; it trains nothing and writes it")
    return files.folder


def _trained(study: Study, spec: RunSpec | None) -> Path | None:
    """A variant's model folder once its run has finished; None where the profile does not ask for it or it is untrained."""
    return _finished(study, spec) if spec is not None and spec.files(study.layout.store).done.is_file() else None


def study_ensemble(study: Study) -> EnsembleFolders:
    """The stage-3 members the study selected, its crop model and its locator, found from its records alone."""
    data = trained_data(study)
    specs = ensemble_members(study, data)
    members = [(_finished(study, spec), float(dsc)) for spec, dsc in zip(specs, members_validation_dsc(study, specs))]
    learned = Learned.load(study.layout.learned) if study.layout.learned.is_file() else None
    return EnsembleFolders(members, _trained(study, crop_spec(study, data)), study.cfg.stage4.threshold,
                           study.cfg.precision, learned and learned.two_stage_locator, f"the study `{study.name}`",
                           _trained(study, locator_spec(study, data)), study.cfg.locator.tta_hflip)


def export_bundle(study: Study, out: str | Path, force: bool = False) -> Path:
    """Write the study's ensemble to the zip `out`: its members, the crop model and the locator when their variant
    won, and what to know."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"--out {out}: name a .zip file")
    if out.exists() and not (force and out.is_file()):
        raise ConfigError(f"--out {out} exists; choose another name{' or pass --force' if out.is_file() else ''}")
    learned = Learned.load(study.layout.learned)
    found = study_ensemble(study)
    crop = found.crop if learned.best_rule in (TWO_STAGE, LOCATED) else None
    locator = found.locator_model if learned.best_rule == LOCATED else None
    with tempfile.TemporaryDirectory() as folder:
        files = BundleFiles(Path(folder))
        names = [ModelDescription.load(source).name for source, _ in found.members]
        if names != list(learned.models):
            raise StageOrderError(f"stage 4 of `{study.name}` combined {learned.models}, stage 3 now selects {names}: "
                                  f"run `spineseg run --profile {study.name} --stages 4` first")
        members = [{"folder": _copy_model(source, files.member(index, name), files), "name": name, "validation_dsc": dsc}
                   for index, ((source, dsc), name) in enumerate(zip(found.members, names), start=1)]
        manifest = {"format": FORMAT, "profile": study.name, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "members": members, "crop_model": crop and _copy_model(crop, files.crop_model, files),
                    "locator_model": locator and _copy_model(locator, files.root / LOCATOR_FOLDER, files),
                    "locator_hflip": found.locator_hflip if locator else None,
                    "threshold": found.threshold, "precision": found.precision, "two_stage_locator": found.locator if crop else None,
                    "best_rule": learned.best_rule, "preprocessing": {"pixels": PIXELS}, "code_version": code_version()}
        atomic.write_json(files.manifest, manifest)
        learned.save(files.learned)
        if study.layout.provenance.is_file():
            shutil.copy(study.layout.provenance, files.provenance)
        atomic.write_text(files.card, model_card(study, learned, manifest))
        with atomic.atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(p for p in files.root.rglob("*") if p.is_file()):
                archive.write(path, path.relative_to(files.root).as_posix())
    return out


def _copy_model(source: Path, target: Path, files: BundleFiles) -> str:
    target.mkdir(parents=True)
    for name in (MODEL_FILE, BEST):
        shutil.copy(source / name, target / name)
    return target.relative_to(files.root).as_posix()


def _scores(study: Study, learned: Learned) -> str:
    """Test DSC of each rule and member with 95 % bootstrap CIs (by patient), from stage 4's per-image metrics."""
    path = study.layout.stage_metrics("stage4")
    if not path.is_file():
        return "_stage 4 has no test metrics_"
    frame = read_table(path)
    table = mean_ci_table(frame, by=["dataset", "group"], metrics=["dsc"], n_boot=1000, cluster_on=PATIENT_KEYS)
    table["rule"] = table["group"].map(rule_name)
    table["validation DSC"] = table["group"].map(learned.validation_dsc.get("rules", {}))
    table["test DSC (95 % CI)"] = [f"{100 * m:.1f} ({100 * lo:.1f}–{100 * hi:.1f})" for m, lo, hi in
                                   zip(table["mean"], table["low"], table["high"])]
    table["validation DSC"] = [f"{100 * v:.1f}" if pd.notna(v) else "—" for v in table["validation DSC"]]
    return table[["dataset", "rule", "n", "n_clusters", "validation DSC", "test DSC (95 % CI)"]].rename(
        columns={"n": "images", "n_clusters": "patients"}).to_markdown(index=False)


def _splits(study: Study) -> str:
    rows = []
    for name in ("d1", "d2"):
        folder = dataset_folder(study, name)
        manifest = None if folder is None else folder / MANIFEST
        if manifest is not None and manifest.is_file():
            counts = read_table(manifest)["split"].value_counts()
            rows.append(f"- {name}: " + ", ".join(f"{split} {counts[split]}" for split in ("train", "val", "test") if split in counts))
    return "\n".join(rows) or "- (the datasets are not in this project any more)"


def model_card(study: Study, learned: Learned, manifest: dict) -> str:
    """A short model card: what the ensemble is, what it was trained and tested on, how well, and where it fails."""
    members = "\n".join(f"- {m['name']} (validation DSC {100 * m['validation_dsc']:.1f} %)" for m in manifest["members"])
    variant = {TWO_STAGE: f"The two-stage variant won on validation: `--two-stage` lets the crop model outline the region "
                          f"that `{manifest['two_stage_locator']}` locates.",
               LOCATED: "The located variant won on validation: `--located` lets the crop model outline the four vertebrae "
                        "that the locator (in this bundle) names."}.get(
        learned.best_rule, "Neither the two-stage nor the located variant won on validation: neither is in this bundle.")
    commit = manifest["code_version"]["git_commit"]
    commit = commit[:12] if re.fullmatch("[0-9a-f]{40}", commit) else commit
    return f"""# Spine region Th8–Th11: an ensemble of U-Nets (profile `{study.name}`)

Exported {manifest['exported']} by spineseg {manifest['code_version']['spineseg']} (commit {commit}).
{study.cfg.description}

## Members
{members}

Best rule on dataset-1 validation: **{rule_name(learned.best_rule)}**; best single model: {learned.best_model}.
Threshold T = {manifest['threshold']} (tuned on validation for soft voting: {learned.tuned_threshold:.2f}).
{variant}

## Data and splits
Data source: `{study.cfg.data.source}`. Dataset 1 is split by patient into train / validation / test; dataset 2,
when present, is an external test set only. Images in this study:
{_splits(study)}

## Scores (DSC %, per image; 95 % bootstrap CI by patient)
{_scores(study, learned)}

## Intended use
Research: outlining the vertebral bodies Th8–Th11 on frontal (AP/PA) projection radiographs of the spine or
chest, grayscale, for studies like the one that trained it. Not a medical device; not for diagnosis.

## Known failure modes
- The level can be wrong while the outline looks right: a mask one vertebra up or down (check the overlay).
- An empty mask: nothing reached T (reported per image by `spineseg predict`).
- Images unlike the training data (lateral views, other modalities, children, implants, heavy collimation,
  another detector's contrast) are outside what the scores above describe.

## Inputs
{PIXELS}.

Run it: `spineseg predict --model THIS.zip --input my_xrays/ --out predictions/`.
"""


@contextmanager
def open_bundle(path: str | Path) -> Iterator[EnsembleFolders]:
    """A bundle's models (a zip is unpacked to a temporary folder for as long as the context lasts)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--model {path} does not exist")
    if path.is_dir():
        yield _read_manifest(path, path)
        return
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"--model {path}: not a bundle (a .zip from `spineseg export`, or the folder it unpacks to)")
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(path) as archive:
        try:
            archive.extractall(folder)  # zipfile drops absolute paths and `..`, so nothing lands outside `folder`
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # a damaged member: CRC, truncation
            raise ConfigError(f"--model {path}: the zip is damaged ({type(exc).__name__}: {exc}); export it again") from None
        yield _read_manifest(Path(folder), path)


def _read_manifest(root: Path, shown: Path) -> EnsembleFolders:
    files = BundleFiles(root)
    if not files.manifest.is_file():
        raise ConfigError(f"--model {shown}: no {files.manifest.name} in it; it is not a bundle from `spineseg export`")
    try:
        manifest = json.loads(files.manifest.read_text())
        found = (manifest["format"], manifest["members"], manifest["crop_model"], float(manifest["threshold"]),
                 str(manifest["precision"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--model {shown}: {files.manifest.name} is not readable ({type(exc).__name__}: {exc})") from None
    form, members, crop, threshold, precision = found
    if form != FORMAT:
        raise ConfigError(f"--model {shown}: format {form!r}, this spineseg reads {FORMAT!r}")
    try:
        members = [(_inside(root, m["folder"], shown), float(m["validation_dsc"])) for m in members]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--model {shown}: {files.manifest.name} lists a member without folder or DSC ({exc})") from None
    locator = manifest.get("locator_model")
    return EnsembleFolders(members, _inside(root, crop, shown) if crop else None, threshold, precision,
                           manifest.get("two_stage_locator"), f"the bundle {shown}", _inside(root, locator, shown) if locator else None,
                           manifest.get("locator_hflip") is not False)  # where nothing records it: True (`EnsembleFolders`)


def _inside(root: Path, relative: str, shown: Path) -> Path:
    if not isinstance(relative, str) or os.path.isabs(relative):
        raise ConfigError(f"--model {shown}: {relative!r} is not a folder inside the bundle")
    folder = (root / relative).resolve()
    if not folder.is_relative_to(root.resolve()):
        raise ConfigError(f"--model {shown}: {relative!r} lies outside the bundle")
    return folder
