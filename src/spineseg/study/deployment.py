"""The study's ensemble for use on new radiographs: found in its own run folders (`study_ensemble`, behind
``spineseg predict --profile`` and `predict_radiographs`), or exported as a bundle (``spineseg export``). Both read
the study's records; predicting from a bundle (`spineseg.study.inference.bundle`, `spineseg.study.inference.apply`) needs neither.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from spineseg import atomic
from spineseg.data.dataset import MANIFEST
from spineseg.errors import ConfigError, StageOrderError
from spineseg.names import EXTRA_RULES, LOCATED, RULES, TWO_STAGE, rule_name
from spineseg.saved_models import BEST, MODEL_FILE, PIXELS, ModelDescription
from spineseg.stats import PATIENT_KEYS, mean_ci_table
from spineseg.study.core.artifacts import BundleFiles, RunFiles, read_table
from spineseg.study.core.provenance import code_version
from spineseg.study.core.records import EnsembleMembers, Learned
from spineseg.study.core.session import Study, StudyData
from spineseg.study.inference.apply import InferenceOptions, PredictionReport, predict_with
from spineseg.study.inference.bundle import FORMAT, EnsembleFolders
from spineseg.study.runs.store import RunSpec
from spineseg.study.stages.located import locator_spec
from spineseg.study.stages.two_stage import crop_spec


def dataset_folder(study: Study, name: str) -> Path | None:
    """Where a dataset of the study is (or would be), without making or reading it."""
    cfg = study.cfg.data
    if cfg.source != "folder":
        return study.layout.data_dir / name
    relative = getattr(cfg, name)
    return (study.project / relative).resolve() if relative else None


def _finished(study: Study, folder: Path) -> Path:
    """A finished run's model folder (its model.json and best.pt)."""
    if not RunFiles(folder).done.is_file():
        raise StageOrderError(f"{folder.name} of `{study.name}` has not finished; "
                              f"run `spineseg run --profile {study.name} --stages 3` first")
    return folder


def _trained(study: Study, spec: RunSpec | None) -> Path | None:
    """A variant's model folder once its run has finished; None where the profile does not ask for it or it is untrained."""
    files = None if spec is None else spec.files(study.layout.store)
    return files.folder if files is not None and files.done.is_file() else None


def study_ensemble(study: Study) -> EnsembleFolders:
    """The members stage 3 recorded, the study's crop model and its locator, found from its records alone: no
    dataset is read or made (the variants' run specs need only the fingerprint of the data the members trained on)."""
    if not study.layout.members.is_file():
        raise StageOrderError(f"the study `{study.name}` has no trained ensemble yet ({study.layout.members} is "
                              f"missing); run `spineseg run --profile {study.name}` first")
    recorded = EnsembleMembers.load(study.layout.members)
    data = StudyData(dataset_folder(study, "d1"), None, recorded.data)
    members = [(_finished(study, study.layout.store / m.folder), m.validation_dsc) for m in recorded.members]
    learned = Learned.load(study.layout.learned) if study.layout.learned.is_file() else None
    return EnsembleFolders(members, _trained(study, crop_spec(study, data)), study.cfg.stage4.threshold,
                           study.cfg.precision, learned and learned.two_stage_locator, f"the study `{study.name}`",
                           _trained(study, locator_spec(study, data)), study.cfg.locator.tta_hflip,
                           best_rule=learned and learned.best_rule, members_hflip=study.cfg.stage3.tta_hflip)


def bundle_contents(study: Study) -> tuple[dict, dict[Path, Path], Learned]:
    """What a bundle of the study holds: its manifest, each model folder to copy with its place in the bundle
    (relative to the bundle's root), and what stage 4 learned. The model card is written from these, in the bundle
    and in the report."""
    learned = Learned.load(study.layout.learned)
    found = study_ensemble(study)
    crop = found.crop if learned.best_rule in (TWO_STAGE, LOCATED) else None
    locator = found.locator_model if learned.best_rule == LOCATED else None
    names = [ModelDescription.load(source).name for source, _ in found.members]
    if names != list(learned.models):
        raise StageOrderError(f"stage 4 of `{study.name}` combined {learned.models}, stage 3 now selects {names}: "
                              f"run `spineseg run --profile {study.name} --stages 4` first")
    layout = BundleFiles(Path("."))
    copies = {source: layout.member(index, name) for index, ((source, _), name) in enumerate(zip(found.members, names), start=1)}
    if crop is not None:
        copies[crop] = layout.crop_model
    if locator is not None:
        copies[locator] = layout.locator_model
    members = [{"folder": copies[source].as_posix(), "name": name, "validation_dsc": dsc}
               for (source, dsc), name in zip(found.members, names)]
    manifest = {"format": FORMAT, "profile": study.name, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "members": members, "crop_model": crop and layout.crop_model.as_posix(),
                "locator_model": locator and layout.locator_model.as_posix(),
                "locator_hflip": found.locator_hflip if locator else None,
                "threshold": found.threshold, "precision": found.precision, "two_stage_locator": found.locator if crop else None,
                "best_rule": learned.best_rule, "members_hflip": found.members_hflip,
                "preprocessing": {"pixels": PIXELS}, "code_version": code_version()}
    return manifest, copies, learned


def study_model_card(study: Study) -> str:
    """The card `spineseg export` would put in the study's bundle, for the report."""
    manifest, _, learned = bundle_contents(study)
    return model_card(study, learned, manifest)


def export_bundle(study: Study, out: str | Path, force: bool = False) -> Path:
    """Write the study's ensemble to the zip `out`: its members, the crop model and the locator when their variant
    won, and what to know."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"--out {out}: name a .zip file")
    if out.exists() and not (force and out.is_file()):
        raise ConfigError(f"--out {out} exists; choose another name{' or pass --force' if out.is_file() else ''}")
    manifest, copies, learned = bundle_contents(study)
    with tempfile.TemporaryDirectory() as folder:
        files = BundleFiles(Path(folder))
        for source, place in copies.items():
            _copy_model(source, files.root / place)
        atomic.write_json(files.manifest, manifest)
        learned.save(files.learned)
        if study.layout.provenance.is_file():
            shutil.copy(study.layout.provenance, files.provenance)
        atomic.write_text(files.card, model_card(study, learned, manifest))
        with atomic.atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            entries = sorted(p for p in files.root.rglob("*") if p.is_file())
            with tqdm(total=sum(p.stat().st_size for p in entries), desc=f"zipping {out.name}", unit="B",
                      unit_scale=True) as bar:  # deflating the weights takes minutes
                for path in entries:
                    archive.write(path, path.relative_to(files.root).as_posix())
                    bar.update(path.stat().st_size)
    return out


def _copy_model(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for name in (MODEL_FILE, BEST):
        shutil.copy(source / name, target / name)


def _scores(study: Study, learned: Learned, manifest: dict) -> str:
    """Each rule's test DSC, HD95 and share identified strictly with 95 % bootstrap CIs by patient, from stage 4's
    per-image records; the rules in the order of the validation score stage 4 chose by, each marked runnable or not."""
    path = study.layout.stage_metrics("stage4")
    if not path.is_file():
        return "_stage 4 has no test metrics_"
    frame = read_table(path)
    table = mean_ci_table(frame, by=["dataset", "group"], metrics=["dsc", "hd95"], n_boot=1000, cluster_on=PATIENT_KEYS)
    cells = {(row.dataset, row.group, row.metric): row for row in table.itertuples()}
    identification = study.layout.stage_dir("stage4") / "identification.csv"
    if identification.is_file():
        rules = read_table(identification).query("kind == 'rule'").astype({"identified_strict": float})
        shares = mean_ci_table(rules, by=["dataset", "group"], metrics=["identified_strict"], n_boot=1000,
                               cluster_on=PATIENT_KEYS)
        cells |= {(row.dataset, row.group, row.metric): row for row in shares.itertuples()}
    chosen_by = learned.validation_identified if learned.validation_identified else learned.validation_dsc
    validation = chosen_by.get("rules", {})
    measure = "identified strictly" if learned.validation_identified else "DSC"
    order = sorted({group for _, group, _ in cells}, key=lambda group: (-validation.get(group, -1.0), rule_name(group)))
    runnable = {TWO_STAGE: bool(manifest.get("crop_model")), LOCATED: bool(manifest.get("locator_model"))}
    rows = []
    for dataset in sorted({dataset for dataset, _, _ in cells}):
        for group in order:
            if (dataset, group, "dsc") not in cells:
                continue
            shown = {metric: _interval(cells.get((dataset, group, metric)), scale)
                     for metric, scale in (("dsc", 100), ("hd95", 1), ("identified_strict", 100))}
            rows.append({"dataset": dataset, "rule": rule_name(group), f"validation {measure}": _percent(validation.get(group)),
                         "test DSC %": shown["dsc"], "test HD95 px": shown["hd95"],
                         "identified strictly %": shown["identified_strict"],
                         "predict runs it": "yes" if runnable.get(group, group in (*RULES, *EXTRA_RULES)) else "no: reported only"})
    return pd.DataFrame(rows).to_markdown(index=False)


def _interval(row, scale: float) -> str:
    if row is None or pd.isna(row.mean):
        return "—"
    return f"{scale * row.mean:.1f} ({scale * row.low:.1f}–{scale * row.high:.1f})"


def _percent(value: float | None) -> str:
    return "—" if value is None or pd.isna(value) else f"{100 * value:.1f}"


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
    members = "\n".join(f"- {m['name']} (validation DSC {100 * m['validation_dsc']:.1f} %"
                        f"{'; **nothing on validation: this member adds only noise**' if m['validation_dsc'] == 0 else ''})"
                        for m in manifest["members"])
    variant = {TWO_STAGE: f"The two-stage variant won on validation: `--two-stage` lets the crop model outline the region "
                          f"that `{manifest['two_stage_locator']}` locates.",
               LOCATED: "The located variant won on validation: `--located` lets the crop model outline the four vertebrae "
                        "that the locator (in this bundle) names."}.get(
        learned.best_rule, "Neither the two-stage nor the located variant won on validation: neither is in this bundle.")
    commit = manifest["code_version"]["git_commit"]
    commit = commit[:12] if re.fullmatch("[0-9a-f]{40}", commit) else commit
    return f"""# Spine region Th8–Th11: an ensemble of U-Nets (profile `{study.name}`)

Written {manifest['exported']} by spineseg {manifest['code_version']['spineseg']} (commit {commit}).
{study.cfg.description}

## Members
{members}

Best rule on dataset-1 validation: **{rule_name(learned.best_rule)}**; best single model: {learned.best_model}.
Threshold T = {manifest['threshold']} (tuned on validation for soft voting: {learned.tuned_threshold:.2f}, reported, not applied).
{variant}
`spineseg predict` without `--rule` applies this choice at T = {manifest['threshold']}{_mirror(manifest)}; `--rule`,
`--threshold` and `--tta`/`--no-tta` override it, and `predictions.csv` records what made each mask.

## Data and splits
Data source: `{study.cfg.data.source}`. Dataset 1 is split by patient into train / validation / test; dataset 2,
when present, is an external test set only. Images in this study:
{_splits(study)}

## Scores (test, per image; 95 % bootstrap CI by patient; rules in the order of their validation score)
Identified strictly: the mask covers each of Th8–Th11 by half or more and lies mostly on them
(`spineseg.identification`); a mask of the right shape one vertebra off scores a DSC near 75 % and is not identified.
{_scores(study, learned, manifest)}

## Intended use
Research: outlining the vertebral bodies Th8–Th11 on frontal (AP/PA) projection radiographs of the spine or
chest, grayscale, for studies like the one that trained it. Not a medical device; not for diagnosis.

## Known failure modes
- The level can be wrong while the outline looks right: a mask one vertebra up or down (check the overlay).
- An empty mask: nothing reached T (reported per image by `spineseg predict`).
- Images unlike the training data (lateral views, other modalities, children, implants, heavy collimation,
  another detector's contrast) are outside what the scores above describe.

## Inputs
{PIXELS}. The members read it at {_size(study.cfg.stage3.image_size)} pixels (height × width); masks come back at
the file's own size.

## Licence and citation
The weights carry the terms of the data that trained them{_data_terms(study)}. Cite the article this study
reproduces: Koniukhov, Morgun, Nemchenko, "Improving the efficiency of spine region segmentation using an ensemble
of pre-trained neural networks", Biophysical Bulletin 55 (2026).

Run it: `spineseg predict --model THIS.zip --input my_xrays/ --out predictions/`.
"""


def _size(size) -> str:
    return " × ".join(str(side) for side in size) if isinstance(size, (list, tuple)) else f"{size} × {size}"


def _data_terms(study: Study) -> str:
    if study.cfg.data.source == "aasce":
        return (" (AASCE/BoostNet spinal radiographs, SpineWeb dataset 16, released for research; cite Wu et al., "
                "\"Automatic landmark estimation for adolescent idiopathic scoliosis assessment using BoostNet\", MICCAI 2017)")
    if study.cfg.data.source == "synthetic":
        return " (synthetic radiographs that spineseg draws: no terms beyond the code's)"
    return ""


def _mirror(manifest: dict) -> str:
    return (", each member's image averaged with its mirror image as the study evaluated them"
            if manifest.get("members_hflip") else "")


def predict_radiographs(study: Study, source: str | Path, out: str | Path, options: InferenceOptions | None = None,
                        rule: str | None = None, probabilities: bool = False, two_stage: bool = False,
                        located: bool = False, log=print) -> PredictionReport:
    """Segment Th8–Th11 on every radiograph at `source` (a file or a folder) with the study's ensemble.

    `options` default to the profile's device, precision and stage-4 threshold."""
    found = study_ensemble(study)
    options = options or InferenceOptions(study.cfg.device, found.precision)
    return predict_with(found, source, out, options, rule, probabilities, two_stage, located, log)
