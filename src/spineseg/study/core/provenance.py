"""What produced a study's results: code version, packages, machine, profile and overrides, time.

Each stage notebook records the facts of its own execution as its section of ``runs/<profile>/provenance.json``
(keyed by the notebook's name) and shows them at its top, so a reader of a table knows where it came from.
A partial run (``--stages 0``) rewrites only the sections of the stages it ran: what made the other
stages' files stays on record.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from spineseg import atomic

PACKAGES = ("torch", "segmentation-models-pytorch", "timm", "albumentations", "numpy")


def _git(project: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(project), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def code_version() -> dict:
    """Which code made a model: the installed spineseg and, in a git checkout, its commit."""
    commit = _git(Path(__file__).resolve().parent, "rev-parse", "HEAD")
    return {"spineseg": _version("spineseg"), "git_commit": commit or "unknown (not a git checkout)"}


def collect(project: Path, profile: str, overrides: Mapping[str, Any] | None, device: str, threads: int) -> dict:
    commit = _git(project, "rev-parse", "HEAD")
    status = _git(project, "status", "--porcelain", "--untracked-files=no")
    return {
        "profile": profile,
        "overrides": dict(overrides or {}),
        "git_commit": commit or "unknown (not a git checkout)",
        "git_modified": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "packages": {package: _version(package) for package in PACKAGES},
        "device": device,
        "threads": threads or os.cpu_count(),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores",
        "platform": platform.platform(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record(path: Path, notebook: str, facts: dict) -> dict:
    """Set one notebook's section of the provenance file, keeping the others; the lock makes two studies
    that finish stages at once both land."""
    with FileLock(path.with_name(f"{path.name}.lock")):
        sections = _sections(path)
        sections[notebook] = facts
        atomic.write_json(path, sections)
    return facts


def _sections(path: Path) -> dict:
    """The recorded sections; a file from before sections (one run's facts, stages unknown) is dropped."""
    found = atomic.read_json_cache(path)
    return {key: value for key, value in found.items() if isinstance(value, dict) and "time" in value}


def markdown(facts: Mapping[str, Any]) -> str:
    """The provenance block at the top of a rendered notebook."""
    packages = ", ".join(f"{name} {version}" for name, version in facts["packages"].items())
    modified = {True: " (with uncommitted changes)", False: "", None: ""}[facts["git_modified"]]
    overrides = ", ".join(f"`{k}={v}`" for k, v in facts["overrides"].items()) or "none"
    return (f"<small>**Provenance** · profile `{facts['profile']}` · overrides {overrides} · code "
            f"`{facts['git_commit'][:12]}`{modified} · Python {facts['python']}, {packages} · device {facts['device']}, "
            f"{facts['threads']} threads · {facts['machine']} · {facts['time']}</small>")
