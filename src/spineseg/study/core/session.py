"""A study session: a validated profile, where its artifacts live, and the data it checked (`StudyData`)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spineseg import atomic
from spineseg.errors import ConfigError, StageOrderError
from spineseg.study.core.artifacts import (
    STAGE_FOLDERS,
    Layout,
    check_profile_name,
    first_stage_changed,
    known_profiles,
    result_overrides,
)
from spineseg.study.core.config import Profile, load_profile
from spineseg.study.core.executors import check_executor


@dataclass(frozen=True)
class Study:
    """A profile's configuration and the layout of its artifacts."""

    cfg: Profile
    layout: Layout

    @property
    def name(self) -> str:
        return self.layout.profile

    @property
    def project(self) -> Path:
        return self.layout.project


@dataclass(frozen=True)
class StudyData:
    """Dataset 1 (train/val/test) and the optional external dataset 2 (test only), as checked."""

    d1: Path
    d2: Path | None = None
    fingerprint: str = ""  # changes whenever any image, mask, label map or manifest changes

    def folder(self, dataset: str) -> Path:
        folder = {"d1": self.d1, "d2": self.d2}[dataset]
        if folder is None:
            raise StageOrderError(f"this study has no dataset {dataset}")
        return folder

    def eval_splits(self) -> list[tuple[str, Path, str]]:
        """(dataset name, folder, split) pairs every run is evaluated on: D1 val and test, D2 test."""
        out = [("d1", self.d1, "val"), ("d1", self.d1, "test")]
        if self.d2 is not None:
            out.append(("d2", self.d2, "test"))
        return out


def find_project(start: Path | None = None) -> Path:
    """The folder holding ``params/`` and ``pyproject.toml``, searched upwards from ``start``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    raise ConfigError(f"no spineseg project (a folder with params/ and pyproject.toml) at or above {here}")


def profile_path(project: Path, profile: str) -> Path:
    """``params/<profile>.yaml``; a profile is the plain name of one of the files there, never a path."""
    path = Path(project) / "params" / f"{check_profile_name(project, profile)}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile {profile!r}: {path} does not exist; the profiles: {known_profiles(project)}")
    return path


def open_study(profile: str = "quick", overrides: Mapping[str, Any] | None = None,
               project_dir: str | Path | None = None, in_place: bool = False) -> Study:
    """Validate the profile (with overrides). Overrides that change results make a variant with its own run
    folder (`Layout.of`) unless `in_place`. Changes nothing: the entry points (a notebook's `start`, the
    command line) set torch's thread count from ``study.cfg.threads`` and seed a new variant."""
    project = Path(project_dir).resolve() if project_dir else find_project()
    return Study(load_profile(profile_path(project, profile), overrides), Layout.of(project, profile, overrides, in_place))


def _weights_files(study: Study) -> dict[str, Path]:
    """Every local encoder weights file the profile names, by the key that names it."""
    named = {"stage1.weights_path": study.cfg.stage1.weights_path}
    named.update({f"stage2.weights_path for {encoder}": path for encoder, path in study.cfg.stage2.weights_path.items()})
    return {key: (study.project / path).resolve() for key, path in named.items() if path}


def check_before_any_stage(study: Study) -> None:
    """What the profile names beyond its settings, checked before stage 0 writes or deletes anything.

    No data source may lie in the folder stage 0 replaces (``runs/<profile>/data``), every encoder
    weights file must exist, and the executor must be able to start: a mistake here would otherwise
    surface only hours later, or cost the user's radiographs.
    """
    cfg, data_dir = study.cfg.data, study.layout.data_dir.resolve()
    sources = {"folder": {"data.d1": cfg.d1, "data.d2": cfg.d2}, "aasce": {"data.aasce_src": cfg.aasce_src}}
    for key, relative in sources.get(cfg.source, {}).items():
        path = (study.project / relative).resolve() if relative else None
        if path is not None and (path == data_dir or data_dir in path.parents or path in data_dir.parents):
            raise ConfigError(f"{key} = {relative!r}: {path} overlaps {data_dir}, the folder stage 0 writes and "
                              f"replaces; keep source data outside runs/")
    for key, path in _weights_files(study).items():
        if not path.is_file():
            raise ConfigError(f"{key}: {path} does not exist")
    check_executor(study.cfg.executor)


def seed_variant(study: Study, overrides: Mapping[str, Any] | None) -> None:
    """A variant starts from the profile's own finished stages before the first one its overrides change: each
    such stage folder the variant lacks and the profile has is copied (so a variant made before the profile
    finished picks them up later); `variant.json` says what came from where."""
    layout = study.layout
    if layout.run_dir == layout.base.run_dir:
        return
    check_before_any_stage(study)  # a refused run leaves no folder behind
    first = first_stage_changed(overrides)
    copied = (atomic.read_json_object(layout.variant, ConfigError, f"delete {layout.run_dir} to start the variant again")
              .get("stages_copied", []) if layout.variant.is_file() else [])
    for folder, stage in STAGE_FOLDERS.items():
        source, target = layout.base.stage_dir(folder), layout.stage_dir(folder)
        if stage < first and source.is_dir() and not target.exists():
            shutil.copytree(source, target)
            copied.append(folder)
    atomic.write_json(layout.variant, {"profile": study.name, "overrides": result_overrides(overrides),
                                       "copied_from": str(layout.base.run_dir), "stages_copied": copied,
                                       "shared": [str(layout.store)] + ([] if layout.own_data else [str(layout.data_dir)])})
