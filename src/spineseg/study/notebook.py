"""The notebooks' entry: the first cell of every stage notebook calls `start`. It sits above the session and the
stages because it uses both (opening the study, then stage 0's data check), so neither imports the other."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from spineseg.study.core import provenance
from spineseg.study.core.session import open_study, seed_variant
from spineseg.study.stages.stage0_data import prepare_data


def start(profile: str, overrides: Mapping[str, Any] | None, project_dir: str | None, notebook: str,
          in_place: bool = False):
    """The first cell of every stage notebook: open the study, locate its data, and say what runs;
    `notebook`'s section of the provenance file records this execution."""
    from IPython.display import Markdown, display

    from spineseg.device import configure_threads

    study = open_study(profile, overrides, project_dir or None, in_place)
    seed_variant(study, overrides)
    configure_threads(study.cfg.threads)
    data = prepare_data(study)
    facts = provenance.collect(study.project, study.name, overrides, study.cfg.device, study.cfg.threads)
    # the endpoints as declared, in every stage's record from stage 0 on: written before anything is trained
    facts["endpoints"] = {"primary": study.cfg.analysis.primary_endpoint, "choose_by": study.cfg.stage4.choose_by,
                          "against": ["best single model", "mean-position prior"] + (["nnU-Net"] if study.cfg.nnunet.enabled else [])}
    provenance.record(study.layout.provenance, notebook, facts)
    # the description is the profile author's text, shown as text: its HTML (a <script>) never runs in the page
    # the run folder relative to the project: a rendered page names no folder of the machine that ran it
    artifacts = study.layout.run_dir.relative_to(study.project).as_posix()
    display(Markdown(f"**Profile `{study.name}`** — {html.escape(study.cfg.description)}  \nArtifacts: `{artifacts}/`"))
    display(Markdown(provenance.markdown(facts)))
    return study, data
