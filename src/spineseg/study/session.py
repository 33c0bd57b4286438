"""A study session: a validated profile, where its artifacts live, and the notebooks' one setup call."""

from __future__ import annotations

import html
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spineseg import atomic
from spineseg.errors import ConfigError
from spineseg.study.artifacts import (
    STAGE_FOLDERS,
    Layout,
    check_profile_name,
    first_stage_changed,
    known_profiles,
    result_overrides,
)
from spineseg.study.config import Profile, load_profile
from spineseg.study.executors import check_executor


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


def start(profile: str, overrides: Mapping[str, Any] | None, project_dir: str | None, notebook: str,
          in_place: bool = False):
    """The first cell of every stage notebook: open the study, locate its data, and say what runs;
    `notebook`'s section of the provenance file records this execution."""
    from IPython.display import Markdown, display

    from spineseg.device import configure_threads
    from spineseg.study import provenance
    from spineseg.study.stage0_data import prepare_data

    study = open_study(profile, overrides, project_dir or None, in_place)
    seed_variant(study, overrides)
    configure_threads(study.cfg.threads)
    data = prepare_data(study)
    facts = provenance.collect(study.project, study.name, overrides, study.cfg.device, study.cfg.threads)
    # the endpoints as declared, in every stage's record from stage 0 on: written before anything is trained
    facts["endpoints"] = {"primary": study.cfg.analysis.primary_endpoint, "choose_by": study.cfg.stage4.choose_by}
    provenance.record(study.layout.provenance, notebook, facts)
    # the description is the profile author's text, shown as text: its HTML (a <script>) never runs in the page
    # the run folder relative to the project: a rendered page names no folder of the machine that ran it
    artifacts = study.layout.run_dir.relative_to(study.project).as_posix()
    display(Markdown(f"**Profile `{study.name}`** — {html.escape(study.cfg.description)}  \nArtifacts: `{artifacts}/`"))
    display(Markdown(provenance.markdown(facts)))
    return study, data
