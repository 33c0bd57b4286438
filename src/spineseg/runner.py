"""Executes the stage notebooks headlessly with papermill, in order, for one profile.

Rendered notebooks (and HTML copies for reading without Jupyter) go to ``runs/<profile>/notebooks``.
A failing notebook stops the run with its path and the failing cell's error; rerunning resumes,
because every training run that finished is skipped.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from spineseg import atomic
from spineseg.config import load_profile

NOTEBOOKS = (
    "00_data",
    "01_augmentation",
    "02_backbone_selection",
    "03_final_training",
    "04_ensembles",
    "05_analysis",
)


class NotebookFailed(RuntimeError):
    """A stage notebook raised; the message names the rendered notebook and the error."""


def parse_stages(text: str | None) -> list[int]:
    """``"2,3"`` or ``"1-4"`` → stage numbers; None → all."""
    if not text:
        return list(range(len(NOTEBOOKS)))
    stages: list[int] = []
    for part in str(text).split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            stages.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--stages {text!r}: use numbers like 2,3 or 1-4") from None
    bad = [s for s in stages if not 0 <= s < len(NOTEBOOKS)]
    if bad:
        raise ValueError(f"--stages {text!r}: stage(s) {bad} do not exist; stages are 0–{len(NOTEBOOKS) - 1}")
    return sorted(set(stages))


def _export_html(notebook: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    atomic.write_text(notebook.with_suffix(".html"), body)


def run_study(project: Path, profile: str, stages: Sequence[int] | None = None,
              overrides: Mapping[str, Any] | None = None, log=print, progress=sys.stderr) -> list[Path]:
    """Validate the profile, then execute the chosen stage notebooks in order."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    project = Path(project).resolve()
    cfg = load_profile(project / "params" / f"{profile}.yaml", overrides)  # fail before anything runs
    out_dir = project / "runs" / cfg["name"] / "notebooks"
    # The kernel must be this interpreter, whatever `python` means on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    rendered = []
    for index in stages if stages is not None else range(len(NOTEBOOKS)):
        name = NOTEBOOKS[index]
        source, target = project / "notebooks" / f"{name}.ipynb", out_dir / f"{name}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        log(f"[{profile}] {name} ...")
        try:
            papermill.execute_notebook(
                str(source), str(target), kernel_name="python3", cwd=str(source.parent), progress_bar=False,
                stderr_file=progress,  # the notebooks' tqdm bars, live on the console
                parameters={"profile": profile, "overrides": dict(overrides or {}), "project_dir": str(project),
                            "interactive": False},
            )
        except PapermillExecutionError as exc:
            raise NotebookFailed(f"{target}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue}") from None
        finally:
            if target.is_file():
                _export_html(target)
        seconds = time.perf_counter() - started
        atomic.write_json(out_dir / f"{name}.timing.json", {"notebook": name, "seconds": seconds})
        log(f"[{profile}] {name} done in {seconds:.0f} s → {target}")
        rendered.append(target)
    return rendered
