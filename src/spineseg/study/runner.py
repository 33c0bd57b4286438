"""Executes the stage notebooks headlessly with papermill, in order, for one profile.

Rendered notebooks (and HTML copies for reading without Jupyter) go to ``runs/<profile>/notebooks``.
A failing notebook stops the run with its path and the failing cell's error; rerunning resumes,
because every training run that finished is skipped.
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from spineseg import atomic
from spineseg.errors import ConfigError, NotebookFailed, StageOrderError
from spineseg.study.artifacts import Layout
from spineseg.study.config import load_profile
from spineseg.study.session import open_study, profile_path, seed_variant

NOTEBOOKS = (
    "00_data",
    "01_augmentation",
    "02_backbone_selection",
    "03_final_training",
    "04_ensembles",
    "05_analysis",
    "06_architectures",
)


def parse_stages(text: str | None) -> list[int]:
    """``"2,3"`` or ``"1-4"`` → stage numbers; None → all. Ranges run upwards and name both ends."""
    if not text:
        return list(range(len(NOTEBOOKS)))
    stages: list[int] = []
    for part in str(text).split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ConfigError(f"--stages {text!r}: use numbers like 2,3 or 1-4") from None
        if last < first:
            raise ConfigError(f"--stages {text!r}: the range {part.strip()} runs backwards; write {last}-{first}")
        stages.extend(range(first, last + 1))
    bad = [s for s in stages if not 0 <= s < len(NOTEBOOKS)]
    if bad:
        raise ConfigError(f"--stages {text!r}: stage(s) {bad} do not exist; stages are 0–{len(NOTEBOOKS) - 1}")
    return sorted(set(stages))


def _kernel_manager_class(kernels: list):
    """Kernels in their own session, with their process-level log silenced, each manager added to `kernels`
    (the run's, see `_stop_kernels_on_interrupt`).

    A terminal's Ctrl-C then reaches only `spineseg run`, which stops the kernel cleanly instead of
    both printing ZMQ tracebacks; the kernel's own stderr carries only start-up warnings (what the
    notebooks print reaches the console through papermill, not through it).
    """
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw.update(start_new_session=True, stderr=subprocess.DEVNULL)
            kernels.append(self)  # before the launch: a Ctrl-C right after it must still find the kernel
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return QuietKernelManager


def _kill_kernels(kernels: list, reap: bool) -> None:
    """SIGKILL every kernel of the run still running, with its process group (each leads its own session).

    Inside the SIGINT handler `reap` is False: the interrupted code may hold a Popen's wait lock, and
    nbclient's own clean-up reaps the process. Everything a kernel writes is atomic (`spineseg.atomic`),
    and a rerun resumes from the finished training runs, so nothing is lost that a graceful stop would keep.
    """
    for manager in kernels:
        process = getattr(manager.provisioner, "process", None)
        if process is None or process.returncode is not None:  # never started, or reaped: its pid may be reused
            continue
        with suppress(OSError):  # already gone
            os.killpg(process.pid, signal.SIGKILL)
        if reap:
            with suppress(subprocess.TimeoutExpired):  # stuck in the kernel (D state): nothing more to do here
                process.wait(timeout=10)
            manager.cleanup_connection_file()


@contextmanager
def _stop_kernels_on_interrupt() -> Iterator[list]:
    """Ctrl-C during the run: KeyboardInterrupt at once, and no kernel left behind. Yields the run's list of
    kernel managers, which `_kernel_manager_class` fills.

    Python's SIGINT handling already reaches the notebooks: papermill runs nbclient through jupyter_core's
    `run_sync`, `loop.run_until_complete` in this thread (no asyncio.Runner, no `loop.add_signal_handler`).
    What it missed: nbclient starts a kernel and waits for it outside its try/finally, so a Ctrl-C during
    start-up left that kernel running; and in a cell it stops the kernel gracefully (interrupt, shutdown
    request, SIGTERM after 2.5 s), 2–4 s of the exit. This handler kills the run's kernels and raises
    KeyboardInterrupt; leaving the block by KeyboardInterrupt also kills and reaps any kernel left.
    An ignored SIGINT stays ignored, as Python leaves it: that is how a background job of a
    non-interactive shell (`make test &`, nohup, CI) starts, and how Ctrl-C reaches only the foreground.
    """
    kernels: list = []

    def on_sigint(signum, frame):
        _kill_kernels(kernels, reap=False)
        raise KeyboardInterrupt

    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, on_sigint) if own else None
    try:
        yield kernels
    except KeyboardInterrupt:
        _kill_kernels(kernels, reap=True)
        raise
    finally:
        if own:
            signal.signal(signal.SIGINT, previous)


def notebook_parameters(profile: str, overrides: Mapping[str, Any] | None, project: Path, in_place: bool = False) -> dict[str, Any]:
    """What every stage notebook is called with (its parameters cell declares exactly these)."""
    return {"profile": profile, "overrides": dict(overrides or {}), "project_dir": str(project), "in_place": in_place,
            "interactive": False}


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # a live widget: in a page, tqdm's bar as plain text


def notebook_title(notebook) -> str:
    """The notebook's first Markdown heading ("05 · Analysis"), else its file's name."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return notebook.metadata.get("papermill", {}).get("input_path", "notebook")


def notebook_summary(notebook) -> str:
    """The first sentence of the notebook's introduction, as plain text: its line in the report's index."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            paragraphs = [p for p in cell.source.split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
            if paragraphs:
                text = re.sub(r"[*`]", "", " ".join(paragraphs[0].split()))
                return re.split(r"\. |: ", text)[0].rstrip(".") + "."
    return ""


def _is_console_noise(output) -> bool:
    """Progress bars and warnings: what the kernel wrote to stderr, and tqdm's widgets."""
    return (output.output_type == "stream" and output.name == "stderr") or WIDGET_VIEW in output.get("data", {})


def export_html(notebook: Path, target: Path, code: bool = True) -> Path:
    """An HTML copy of a rendered notebook that reads offline (no script from a CDN), titled by its heading;
    without code cells, for readers who only want the results, also without progress bars and warnings."""
    from importlib import resources

    import nbformat
    from nbconvert import HTMLExporter

    node = nbformat.read(notebook, as_version=4)
    node.metadata["title"] = notebook_title(node)
    if not code:
        for cell in node.cells:
            if cell.cell_type == "code":
                cell.outputs = [output for output in cell.outputs if not _is_console_noise(output)]
    templates = str(resources.files("spineseg").joinpath("resources/offline_html"))
    exporter = HTMLExporter(extra_template_paths=[templates], template_file="spineseg_offline.html.j2",
                            exclude_input=not code, exclude_input_prompt=not code, exclude_output_prompt=not code)
    body, _ = exporter.from_notebook_node(node)
    atomic.write_text(target, body)
    return target


def report_index(project: Path, profile: str, rendered: Sequence[Path]) -> str:
    """The report's front page: the profile and its description, then each page in order with its one line."""
    import nbformat

    description = load_profile(profile_path(project, profile)).description
    items = []
    for path in rendered:
        notebook = nbformat.read(path, as_version=4)
        items.append(f'<li><a href="{html.escape(path.stem)}.html">{html.escape(notebook_title(notebook))}</a> — '
                     f"{html.escape(notebook_summary(notebook))}</li>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>The study, profile '
            f"{html.escape(profile)}</title></head>\n<body>\n<h1>The study, profile <code>{html.escape(profile)}</code></h1>\n"
            f"<p>{html.escape(description)}</p>\n<ol>\n" + "\n".join(items) + "\n</ol>\n</body>\n</html>\n")


def write_report(project: Path, profile: str, out: Path | None = None) -> list[Path]:
    """``runs/<profile>/report/`` (or `out`): ``index.html``, then the rendered notebooks as HTML without their
    code cells, each page self-contained, so the folder can be copied or served as it is."""
    layout = Layout(Path(project).resolve(), profile)
    rendered = [layout.notebook(name) for name in NOTEBOOKS if layout.notebook(name).is_file()]
    if not rendered:
        raise StageOrderError(f"no rendered notebooks under {layout.notebooks_dir}: run `spineseg run --profile {profile}` first")
    page = layout.report if out is None else (lambda name: Path(out) / f"{name}.html")
    pages = [export_html(path, page(path.stem), code=False) for path in rendered]
    index = page("index")
    atomic.write_text(index, report_index(layout.project, profile, rendered))
    return [index, *pages]


def run_study(project: Path, profile: str, stages: Sequence[int] | None = None,
              overrides: Mapping[str, Any] | None = None, log=print, progress=sys.stderr, in_place: bool = False) -> list[Path]:
    """Validate the profile and check the data, then execute the chosen stage notebooks in order.

    Overrides that change results write to a variant's own run folder (`Layout.of`) unless `in_place`.
    A notebook that raises, or whose kernel dies, stops the run with a `NotebookFailed` naming it;
    Ctrl-C stops it with KeyboardInterrupt. Either way a rerun resumes.
    """
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    from spineseg.study.stage0_data import prepare_data

    project = Path(project).resolve()
    study = open_study(profile, overrides, project, in_place)
    layout = study.layout
    if layout.run_dir != layout.base.run_dir:
        log(f"[{profile}] these overrides change results: this run writes to {layout.run_dir} "
            f"(--in-place writes to {layout.base.run_dir})")
    seed_variant(study, overrides)
    # Fail before anything runs: the profile, what it names (stage 0's checks), then every file of every split.
    prepare_data(study)
    # The kernel must be this interpreter, whatever `python` means on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    rendered = []
    with _stop_kernels_on_interrupt() as kernels:  # Ctrl-C: see there
        for index in stages if stages is not None else range(len(NOTEBOOKS)):
            name = NOTEBOOKS[index]
            source, target = project / "notebooks" / f"{name}.ipynb", layout.notebook(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            log(f"[{profile}] {name} ...")
            try:
                papermill.execute_notebook(
                    str(source), str(target), kernel_name="python3", cwd=str(source.parent), progress_bar=False,
                    stderr_file=progress,  # the notebooks' tqdm bars, live on the console
                    parameters=notebook_parameters(profile, overrides, project, in_place),
                    kernel_manager_class=_kernel_manager_class(kernels),
                )
            except PapermillExecutionError as exc:
                raise NotebookFailed(f"{target}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue}") from None
            except DeadKernelError:
                raise NotebookFailed(f"{target}: the kernel running {name} died; most often the system killed it for lack "
                                     f"of memory (try a smaller batch_size or image_size, or fewer threads). Finished "
                                     f"training runs are kept: rerun the same command to resume.") from None
            finally:
                if target.is_file():
                    export_html(target, target.with_suffix(".html"))
            seconds = time.perf_counter() - started
            atomic.write_json(layout.notebook_timing(name), {"notebook": name, "seconds": seconds})
            log(f"[{profile}] {name} done in {seconds:.0f} s → {target}")
            rendered.append(target)
    return rendered
