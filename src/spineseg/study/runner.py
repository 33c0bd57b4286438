"""Executes the stage notebooks headlessly with papermill, in order, for one profile.

Rendered notebooks (and HTML copies for reading without Jupyter) go to ``runs/<profile>/notebooks``.
A failing notebook stops the run with its path and the failing cell's error; rerunning resumes,
because every training run that finished is skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from spineseg import atomic, nnunet_peer
from spineseg.errors import ConfigError, NotebookFailed
from spineseg.study.core.artifacts import NOTEBOOKS
from spineseg.study.core.session import open_study, seed_variant
from spineseg.study.report.pages import export_html


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


@contextmanager
def _this_interpreter_first() -> Iterator[None]:
    """The kernel must be this interpreter, whatever `python` means on PATH: this one's folder first on PATH while
    the notebooks run, the caller's PATH back afterwards."""
    before = os.environ.get("PATH")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{before or ''}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def notebook_parameters(profile: str, overrides: Mapping[str, Any] | None, project: Path, in_place: bool = False) -> dict[str, Any]:
    """What every stage notebook is called with (its parameters cell declares exactly these)."""
    return {"profile": profile, "overrides": dict(overrides or {}), "project_dir": str(project), "in_place": in_place,
            "interactive": False}


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

    from spineseg.study.stages.stage0_data import prepare_data

    project = Path(project).resolve()
    study = open_study(profile, overrides, project, in_place)
    if study.cfg.nnunet.enabled and (stages is None or 3 in stages):
        nnunet_peer.require()  # stage 3 trains the peer: a missing nnU-Net is said now, not after stages 1 and 2
    layout = study.layout
    if layout.run_dir != layout.base.run_dir:
        log(f"[{profile}] these overrides change results: this run writes to {layout.run_dir} "
            f"(--in-place writes to {layout.base.run_dir})")
    seed_variant(study, overrides)
    # Fail before anything runs: the profile, what it names (stage 0's checks), then every file of every split.
    prepare_data(study)
    rendered = []
    with _this_interpreter_first(), _stop_kernels_on_interrupt() as kernels:  # Ctrl-C: see there
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
