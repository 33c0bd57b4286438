"""Twenty single Ctrl-Cs at varied moments of `spineseg run --profile smoke`: each must exit 130 within 10 s.

Runs the smoke study in a temporary copy of the project (params, notebooks, pyproject.toml, as the tests
copy it), again and again: every run resumes what the one before finished, and gets ONE SIGINT, sent to
its process group as a terminal sends Ctrl-C to its foreground job, from 0.2 s after the start to well
into training (the first kernel's start-up and the step between two notebooks included). Prints one
row per run: the moment, what the run was doing (its last log line), seconds from the SIGINT to the exit,
the exit status and the kernels left running. Exits 1 if any run did not exit 130 within the limit.

    .venv/bin/python scripts/sigint_check.py                    # the check (about 6 min on 2 CPU cores)
    .venv/bin/python scripts/sigint_check.py --inherit-ignored  # started as a background job starts: no exit
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, event, seconds after it): "start" is the command's start; "kernel" the first kernel launched;
# "between" the first notebook's "done" line (the next one starts right after); "stage 1" the second
# notebook's start; "training" the first epoch bar of a training run.
MOMENTS = [
    ("0.2 s", "start", 0.2), ("1 s", "start", 1.0), ("2 s", "start", 2.0),
    ("kernel start-up", "kernel", 0.0), ("kernel start-up + 0.5 s", "kernel", 0.5), ("kernel start-up + 1.5 s", "kernel", 1.5),
    ("00_data running", "kernel", 5.0),
    ("between notebooks", "between", 0.0), ("next kernel starting", "between", 0.3),
    ("stage 1 starting", "stage 1", 1.0),
    ("training", "training", 0.0), ("training + 1 s", "training", 1.0), ("training + 3 s", "training", 3.0),
    ("training + 6 s", "training", 6.0), ("training + 12 s", "training", 12.0), ("training + 25 s", "training", 25.0),
    ("12 s", "start", 12.0), ("20 s", "start", 20.0), ("35 s", "start", 35.0), ("60 s", "start", 60.0),
]


def copy_project(root: Path) -> Path:
    for item in ("params", "notebooks"):
        shutil.copytree(ROOT / item, root / item)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def kernels(pid: int) -> list[int]:
    """The kernels `pid` has started (Linux's /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    found = []
    for child in children:
        try:
            if b"ipykernel" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except FileNotFoundError:
            pass
    return found


def running(pid: int) -> bool:
    """Not gone, and not merely a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def doing(out: Path, err: Path) -> str:
    """The run's last log line; before the first, its last progress bar (the data), else "(starting)"."""
    lines = [line for line in out.read_text(errors="replace").splitlines() if line.strip()]
    if lines:
        return lines[-1].strip()
    bars = [bar for bar in err.read_text(errors="replace").replace("\r", "\n").splitlines() if bar.strip()]
    return bars[-1].split("|")[0].strip() if bars else "(starting)"


def reached(event: str, child: subprocess.Popen, out: Path, err: Path) -> bool:
    if event == "start":
        return True
    if event == "kernel":
        return bool(kernels(child.pid))
    log = out.read_text(errors="replace")
    if event == "between":
        return " done in " in log
    if event == "stage 1":
        return "01_augmentation ..." in log
    return "epoch/s" in err.read_text(errors="replace")  # "training": a training run's epoch bar (stage 0 trains none)


def one_run(project: Path, logs: Path, number: int, event: str, delay: float, limit: float, inherit_ignored: bool) -> dict:
    out, err = logs / f"run{number:02d}.out", logs / f"run{number:02d}.err"
    # A terminal's foreground job starts with SIGINT at its default; a background job of a non-interactive
    # shell starts with it ignored, and Python then never raises KeyboardInterrupt (--inherit-ignored).
    disposition = signal.SIG_IGN if inherit_ignored else signal.SIG_DFL
    with open(out, "w") as stdout, open(err, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "spineseg", "run", "--profile", "smoke"], cwd=project,
                                 stdout=stdout, stderr=stderr, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    started = time.monotonic()
    while not reached(event, child, out, err) and child.poll() is None and time.monotonic() - started < 600:
        time.sleep(0.02)
    if event == "start":
        delay = max(0.0, delay - (time.monotonic() - started))
    time.sleep(delay)
    if child.poll() is not None:
        return {"at": time.monotonic() - started, "doing": "finished before the Ctrl-C", "seconds": None,
                "status": child.returncode, "left": 0, "ok": False}
    at = time.monotonic() - started
    what = doing(out, err)
    seen = kernels(child.pid)
    os.killpg(child.pid, signal.SIGINT)  # one Ctrl-C, to the whole process group
    sent = time.monotonic()
    try:
        child.wait(timeout=limit + 20)
        seconds = time.monotonic() - sent
    except subprocess.TimeoutExpired:
        seconds = None
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    time.sleep(0.2)
    left = [pid for pid in seen + kernels(child.pid) if running(pid)]
    for pid in left:  # so that one failure does not slow the runs after it
        os.killpg(pid, signal.SIGKILL)
    lines = err.read_text(errors="replace").rstrip().splitlines()
    clean = bool(lines) and lines[-1] == "spineseg: interrupted; rerun the same command to resume" and "Traceback" not in "\n".join(lines)
    ok = child.returncode == 130 and seconds is not None and seconds <= limit and not left and clean
    return {"at": at, "doing": what, "seconds": seconds, "status": child.returncode, "left": len(left), "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=len(MOMENTS), help=f"how many of the {len(MOMENTS)} moments (default all)")
    parser.add_argument("--limit", type=float, default=10.0, help="seconds a run may take to exit (default 10)")
    parser.add_argument("--inherit-ignored", action="store_true",
                        help="start each run with SIGINT ignored, as a background job of a non-interactive shell starts")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project and the runs' output")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sigint_check_"))
    project, logs = copy_project(workdir / "project"), workdir / "logs"
    logs.mkdir()
    print(f"spineseg run --profile smoke in {project}; one SIGINT per run, exit 130 within {args.limit:.0f} s expected")
    print(f"{'#':>2}  {'moment':<24} {'at s':>6}  {'doing (last log line)':<46} {'exit s':>7} {'status':>6} {'kernels left':>12}")
    failed = 0
    try:
        for number, (label, event, delay) in enumerate(MOMENTS[:args.runs], 1):
            row = one_run(project, logs, number, event, delay, args.limit, args.inherit_ignored)
            failed += not row["ok"]
            shown = row["doing"].split(" → ")[0]
            shown = shown if len(shown) <= 46 else shown[:45] + "…"
            seconds = f"{row['seconds']:.2f}" if row["seconds"] is not None else "none"
            print(f"{number:>2}  {label:<24} {row['at']:>6.1f}  {shown:<46} {seconds:>7} {row['status']!s:>6} {row['left']:>12}"
                  f"{'' if row['ok'] else '  FAILED'}", flush=True)
    finally:
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    runs = min(args.runs, len(MOMENTS))
    print(f"{runs - failed} of {runs} runs exited 130 within {args.limit:.0f} s after one SIGINT, leaving no kernel")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
