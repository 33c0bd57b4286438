"""Ctrl-C during `run_study`, in this process: the first SIGINT raises KeyboardInterrupt and leaves no kernel behind.

The smoke profile's data, and a stage-0 notebook that only says which kernel runs it and then sleeps;
each test starts one kernel (a few seconds). The whole command, a SIGINT sent as a terminal sends it, is
tests/test_study_smoke.py's Ctrl-C test and scripts/sigint_check.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import nbformat
import pytest

from conftest import running
from spineseg.study import runner
from spineseg.study.core.artifacts import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt_project")
    shutil.copytree(ROOT / "params", root / "params")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    parameters = nbformat.v4.new_code_cell('profile = "smoke"\noverrides = {}\nproject_dir = "."\nin_place = False\n'
                                           "interactive = True")
    parameters.metadata["tags"] = ["parameters"]
    sleeper = nbformat.v4.new_code_cell("import os, pathlib, time\n"
                                        "pathlib.Path(project_dir, 'kernel.pid').write_text(str(os.getpid()))\n"
                                        "time.sleep(120)")
    notebook = nbformat.v4.new_notebook(cells=[parameters, sleeper])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (root / "notebooks").mkdir()
    nbformat.write(notebook, root / "notebooks" / f"{NOTEBOOKS[0]}.ipynb")
    return root


@pytest.fixture(autouse=True)
def sigint_at_default():
    """Python's SIGINT handler, whatever the shell that started pytest chose (a background job ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_kernel_start_up_leaves_no_kernel(project, monkeypatch):
    launched = []
    quiet = runner._kernel_manager_class

    def interrupted_at_start_up(kernels: list):
        class InterruptedAtStartUp(quiet(kernels)):
            async def _async_launch_kernel(self, kernel_cmd, **kw):
                info = await super()._async_launch_kernel(kernel_cmd, **kw)
                launched.append(self.provisioner.process)
                signal.raise_signal(signal.SIGINT)  # Ctrl-C: the kernel runs, nbclient waits for it to answer
                return info

        return InterruptedAtStartUp

    monkeypatch.setattr(runner, "_kernel_manager_class", interrupted_at_start_up)
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_study(project, "smoke", stages=[0], log=lambda message: None)
        assert len(launched) == 1
        assert not running(launched[0].pid), "the kernel outlived the Ctrl-C"
    finally:
        for process in launched:  # what the run left, so that it does not outlive the test either
            if running(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_first_ctrl_c_in_a_cell_raises_at_once_and_stops_the_kernel(project):
    pid_file = project / "kernel.pid"
    pid_file.unlink(missing_ok=True)
    sent = []

    def press_ctrl_c():
        deadline = time.monotonic() + 120
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # inside the cell's sleep
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)  # one SIGINT, no second

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(project, "smoke", stages=[0], log=lambda message: None)
    seconds = time.monotonic() - sent[0]
    kernel = int(pid_file.read_text())
    assert seconds < 5, f"KeyboardInterrupt {seconds:.1f} s after the SIGINT"
    assert not running(kernel), "the kernel outlived the Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
