"""Every file the study writes, named in one place.

    runs/<profile>/
        provenance.json       what produced each stage's results, by notebook: code, packages, machine,
                              overrides, time
        data/                 stage 0: the datasets (made or converted), source.json, checked_<dataset>.json,
                              twins_d1_d2.json
        train/<run>/          one folder per training run (`RunFiles`): model.json and best.pt describe and hold
                              its model
        stage1/ … stage3/     runs.csv, metrics_test.csv, metrics_val.csv
        stage2/               + ranking.csv, selection.json
        stage3/               + members.json (`EnsembleMembers`): which runs form the ensemble
        stage2_scratch/       runs.csv, metrics_*.csv of the from-scratch twins (`stage2.scratch_twins`)
        stage4/               metrics_test.csv, threshold_tuning.csv, learned.json, leave_one_out.csv,
                              rule_checks.csv, identification.csv, timing.csv
        stage6/               chosen.json (`Stage6Choices`): the best pair, the attention pair, what smp cannot
                              build, the pruning results
        stage6_<comparison>/  runs.csv, metrics_test.csv (decoders, optimizers, attention, pruning); pruning also
                              has one folder per fraction: summary.json (`PruningResult`), metrics.csv, pruned.pt
        tables/               tableN.csv/.md/.tex, wilcoxon.csv, wilcoxon_readable.*, identification_*
        results.json, .md     the headline numbers the README quotes (`spineseg.study.report.results`)
        notebooks/            the rendered notebooks, their HTML copies and <name>.timing.json
        report/               the rendered notebooks as HTML without code (`spineseg report`)
    runs/<profile>+<hash>/    a variant: a run whose overrides change results (`variant_name`), with variant.json,
                              its own stage folders (those before the first stage it changes copied from
                              runs/<profile>/), tables, notebooks and provenance; trained runs stay in
                              runs/<profile>/train, data in runs/<profile>/data unless it overrides data.*
    runs/bench/               report.md, report.json
    figures/<profile>/        <name>.png (at analysis.dpi) and <name>.pdf; a variant's in figures/<profile>+<hash>/
    <any>.zip                 `spineseg export`: the ensemble as a bundle that predicts anywhere (`BundleFiles`)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from spineseg.errors import ConfigError

SCRATCH_TWINS = "stage2_scratch"  # the from-scratch copies of ImageNet-initialised stage-2 encoders
# stage 6's four comparisons, each with a stage folder of its own
DECODERS, OPTIMISERS, ATTENTION, PRUNING = "stage6_decoders", "stage6_optimizers", "stage6_attention", "stage6_pruning"
TEXT_COLUMNS = {"id": str, "patient": str, "group": str, "encoder": str, "removed": str, "dataset": str}


PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a file name in params/, never a path




@dataclass(frozen=True)
class Stage:
    """One stage of the study: its notebook, the folders of its own results under the run folder, and the
    profile sections whose change first affects it (the stages before are copied into a variant)."""

    number: int
    notebook: str  # notebooks/<notebook>.ipynb, rendered to `Layout.notebook(notebook)`
    folders: tuple[str, ...]
    sections: tuple[str, ...]


# The one list of the stages, in the order they run.
STAGES = (
    Stage(0, "00_data", (), ("data",)),
    Stage(1, "01_augmentation", ("stage1",), ("precision", "stage1")),
    Stage(2, "02_backbone_selection", ("stage2", SCRATCH_TWINS), ("stage2",)),
    Stage(3, "03_final_training", ("stage3",), ("stage3", "two_stage", "locator", "nnunet")),
    Stage(4, "04_ensembles", ("stage4",), ("stage4",)),
    Stage(5, "05_analysis", (), ("analysis",)),
    Stage(6, "06_architectures", ("stage6", DECODERS, OPTIMISERS, ATTENTION, PRUNING), ("architectures",)),
)
NOTEBOOKS = tuple(stage.notebook for stage in STAGES)


def known_profiles(project: Path) -> str:
    """The profiles a project offers, for error messages: the names of its params/*.yaml."""
    return ", ".join(sorted(path.stem for path in (Path(project) / "params").glob("*.yaml"))) or "none"


def check_profile_name(project: Path, profile: str) -> str:
    """A profile names its run folder, so a path (``/abs``, ``../x``) would write outside the project: refuse it."""
    if not PROFILE_NAME.fullmatch(profile):
        raise ConfigError(f"profile {profile[:80]!r} is not a profile name: a profile is the name of a file in "
                          f"{Path(project) / 'params'} without .yaml, never a path: {known_profiles(project)}")
    return profile


def read_table(path: Path) -> pd.DataFrame:
    """Read one of the study's CSV files. Names (`TEXT_COLUMNS`) are text exactly as written: an image id
    'NA', 'nan' or 'null' and 'None' (the plain U-Net) are names, never missing. Elsewhere only an empty
    cell is missing."""
    numbers = [column for column in pd.read_csv(path, nrows=0).columns if column not in TEXT_COLUMNS]
    return pd.read_csv(path, keep_default_na=False, na_values={column: [""] for column in numbers}, dtype=TEXT_COLUMNS)


@dataclass(frozen=True)
class RunFiles:
    """The files of one training run."""

    folder: Path

    @property
    def lease(self) -> Path:
        """Beside the folder: held (an OS lock) by the one process training this run."""
        return self.folder.with_name(self.folder.name + ".lock")

    @property
    def config(self) -> Path:
        return self.folder / "config.json"

    @property
    def summary(self) -> Path:
        return self.folder / "summary.json"

    @property
    def evaluation(self) -> Path:
        """How the cached predictions were made (test-time flipping or not): another choice re-evaluates."""
        return self.folder / "evaluation.json"

    @property
    def done(self) -> Path:
        """Written last: its presence means every other artifact is complete."""
        return self.folder / "DONE"

    # `train.fit` names its own files; imported late so that this module (and the CLI) stays torch-free.
    @property
    def best(self) -> Path:
        from spineseg.saved_models import BEST

        return self.folder / BEST

    @property
    def model(self) -> Path:
        """What the model is, sees and reached (`spineseg.saved_models`): with best.pt, all that loading it needs."""
        from spineseg.saved_models import MODEL_FILE

        return self.folder / MODEL_FILE

    @property
    def checkpoint(self) -> Path:
        from spineseg.saved_models import CHECKPOINT

        return self.folder / CHECKPOINT

    @property
    def history(self) -> Path:
        from spineseg.saved_models import HISTORY

        return self.folder / HISTORY

    def probs(self, dataset: str, split: str) -> Path:
        return self.folder / f"probs_{dataset}_{split}.npz"

    def chains(self, dataset: str, split: str) -> Path:
        """A locator's chains of one split: where it put each vertebra C7…S1, on the split's evaluation grid."""
        return self.folder / f"chains_{dataset}_{split}.npz"

    @property
    def chain_prior(self) -> Path:
        """A locator's chain prior (`spineseg.chain.ChainPrior`), fitted on its training label maps."""
        return self.folder / "chain_prior.json"

    def metrics(self, dataset: str, split: str) -> Path:
        return self.folder / f"metrics_{dataset}_{split}.csv"

    def metrics_files(self, split: str) -> list[tuple[str, Path]]:
        """(dataset, path) of every per-image metrics file of `split`, sorted by dataset."""
        return [(path.stem.split("_")[1], path) for path in sorted(self.folder.glob(f"metrics_*_{split}.csv"))]


# Overrides of how a study runs, not of what it finds: with only these, a run writes into the profile's own folder.
HOW_NOT_WHAT = ("executor", "threads", "device", "description")
# The first stage whose results an override of a section changes; the stages before it are copied from the profile's run.
FIRST_STAGE_CHANGED = {section: stage.number for stage in STAGES for section in stage.sections}
STAGE_FOLDERS = {folder: stage.number for stage in STAGES for folder in stage.folders}  # a stage's own results


def result_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The overrides that change what a study finds (`HOW_NOT_WHAT` aside)."""
    return {key: value for key, value in (overrides or {}).items() if key.split(".")[0] not in HOW_NOT_WHAT}


def variant_name(profile: str, overrides: Mapping[str, Any] | None, content: bytes = b"") -> str:
    """The run folder's name: the profile, or ``<profile>+<hash>`` for overrides that change results, so a rerun
    with other settings never rewrites the tables, figures and stage files of the profile's own run. The hash
    covers the profile file's `content` too: after the profile is edited, the same overrides make a new variant
    instead of keeping stage copies taken from the profile as it was."""
    changed = result_overrides(overrides)
    if not changed:
        return profile
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode() + b"\0" + content).hexdigest()[:8]
    return f"{profile}+{digest}"


def profile_content(project: Path, profile: str) -> bytes:
    """The bytes of params/<profile>.yaml (empty where it is missing: `load_profile` says so)."""
    path = Path(project) / "params" / f"{profile}.yaml"
    return path.read_bytes() if path.is_file() else b""


def first_stage_changed(overrides: Mapping[str, Any] | None) -> int:
    """The earliest stage the overrides change (one past the last: none)."""
    return min((FIRST_STAGE_CHANGED.get(key.split(".")[0], 0) for key in result_overrides(overrides)), default=len(STAGES))


@dataclass(frozen=True)
class Layout:
    """Where one profile's artifacts live under a project folder: ``runs/<profile>/``, or a variant's
    ``runs/<profile>+<hash>/`` (`variant_name`). Trained runs are shared: their folders are keyed by everything
    that defines them. A variant keeps its own data only when it overrides the data settings."""

    project: Path
    profile: str
    run: str = ""  # the run folder's name; empty: the profile's own
    own_data: bool = False

    def __post_init__(self) -> None:
        check_profile_name(self.project, self.profile)

    @classmethod
    def of(cls, project: Path, profile: str, overrides: Mapping[str, Any] | None = None, in_place: bool = False) -> Layout:
        """The layout a run with `overrides` writes to; `in_place` writes into the profile's own folder anyway."""
        run = profile if in_place else variant_name(profile, overrides, profile_content(project, profile))
        flips = [key for key in result_overrides(overrides) if key.endswith(".tta_hflip")]
        if run != profile and flips:
            # flip TTA is how the shared trained runs are evaluated, kept in their folders: a variant would rewrite them
            raise ConfigError(f"--set {flips[0]}: test-time flipping re-evaluates the trained runs shared with "
                              f"runs/{profile}/train; change it in the profile, or run with --in-place")
        return cls(project, profile, run, own_data=run != profile and first_stage_changed(overrides) == 0)

    @property
    def base(self) -> Layout:
        """The profile's own run, whose finished stages a variant starts from."""
        return Layout(self.project, self.profile)

    @property
    def run_dir(self) -> Path:
        return self.project / "runs" / (self.run or self.profile)

    @property
    def variant(self) -> Path:
        """In a variant's folder: the overrides that made it and the run it started from."""
        return self.run_dir / "variant.json"

    @property
    def provenance(self) -> Path:
        """Code, packages, machine, profile and overrides that last executed each stage notebook, by notebook."""
        return self.run_dir / "provenance.json"

    @property
    def data_dir(self) -> Path:
        return (self.run_dir if self.own_data else self.base.run_dir) / "data"

    @property
    def data_source(self) -> Path:
        """What the datasets in `data_dir` were made from; a change remakes them."""
        return self.data_dir / "source.json"

    def data_check(self, dataset: str) -> Path:
        """The content hashes of a dataset's files that passed the check, by size and modification time."""
        return self.data_dir / f"checked_{dataset}.json"

    @property
    def cross_twins(self) -> Path:
        """Images of dataset 2 that are one radiograph with an image of dataset 1, with the data fingerprint checked."""
        return self.data_dir / "twins_d1_d2.json"

    @property
    def store(self) -> Path:
        return self.base.run_dir / "train"

    @property
    def tables_dir(self) -> Path:
        return self.run_dir / "tables"

    @property
    def notebooks_dir(self) -> Path:
        return self.run_dir / "notebooks"

    @property
    def figures_dir(self) -> Path:
        return self.project / "figures" / (self.run or self.profile)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def runs_table(self, stage: str) -> Path:
        return self.stage_dir(stage) / "runs.csv"

    @property
    def members(self) -> Path:
        """Which runs form the ensemble (`records.EnsembleMembers`), written by stage 3."""
        return self.stage_dir("stage3") / "members.json"

    def stage_metrics(self, stage: str, split: str = "test") -> Path:
        return self.stage_dir(stage) / f"metrics_{split}.csv"

    @property
    def ranking(self) -> Path:
        return self.stage_dir("stage2") / "ranking.csv"

    @property
    def selection(self) -> Path:
        return self.stage_dir("stage2") / "selection.json"

    @property
    def threshold_tuning(self) -> Path:
        return self.stage_dir("stage4") / "threshold_tuning.csv"

    @property
    def learned(self) -> Path:
        """What stage 4 fitted on dataset-1 validation: the tuned threshold and the stacker."""
        return self.stage_dir("stage4") / "learned.json"

    @property
    def stage6_choices(self) -> Path:
        """What stage 6 chose and measured (`spineseg.study.core.records.Stage6Choices`)."""
        return self.stage_dir("stage6") / "chosen.json"

    def pruned_run(self, name: str) -> Path:
        """One pruning fraction's folder: its summary.json, metrics.csv and pruned.pt."""
        return self.stage_dir(PRUNING) / name

    @property
    def leave_one_out(self) -> Path:
        return self.stage_dir("stage4") / "leave_one_out.csv"

    @property
    def identification(self) -> Path:
        """Per image, for every stage-3 model and stage-4 rule: identified, level shift, per-level DSC."""
        return self.stage_dir("stage4") / "identification.csv"

    @property
    def rule_checks(self) -> Path:
        """Per dataset: images where shape averaging met an empty member mask, and whether max = union."""
        return self.stage_dir("stage4") / "rule_checks.csv"

    @property
    def timing(self) -> Path:
        return self.stage_dir("stage4") / "timing.csv"

    def table(self, name: str, suffix: str) -> Path:
        return self.tables_dir / f"{name}.{suffix}"

    def results(self, suffix: str) -> Path:
        """The headline numbers (`spineseg.study.report.results`): results.json, and results.md as the README renders it."""
        return self.run_dir / f"results.{suffix}"

    def notebook(self, name: str) -> Path:
        return self.notebooks_dir / f"{name}.ipynb"

    def report(self, name: str) -> Path:
        """The results of one notebook as HTML without code, for readers (`spineseg report`)."""
        return self.run_dir / "report" / f"{name}.html"

    def notebook_timing(self, name: str) -> Path:
        return self.notebooks_dir / f"{name}.timing.json"

    def figure(self, name: str, suffix: str) -> Path:
        return self.figures_dir / f"{name}.{suffix}"


@dataclass(frozen=True)
class BundleFiles:
    """The files of an exported ensemble (`spineseg.study.inference.bundle`), under the zip's root or its unpacked folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        """How the parts fit: the members and their validation DSC, the crop model, T, the locating rule."""
        return self.root / "bundle.json"

    @property
    def learned(self) -> Path:
        return self.root / "learned.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def card(self) -> Path:
        return self.root / "MODEL_CARD.md"

    def member(self, index: int, name: str) -> Path:
        """A member's model folder (model.json, best.pt), numbered in the study's order."""
        return self.root / "members" / f"{index}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}"

    @property
    def crop_model(self) -> Path:
        return self.root / "crop_model"

    @property
    def locator_model(self) -> Path:
        """The located variant's locator (`spineseg.locator`)."""
        return self.root / "locator_model"


def bench_dir(project: Path) -> Path:
    return Path(project) / "runs" / "bench"
