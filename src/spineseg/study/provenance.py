"""What produced a study's results: code version, packages, machine, profile and overrides, time.

`spineseg run` records it in ``runs/<profile>/provenance.json`` before the first notebook, and every
rendered notebook starts with the same facts, so a reader of a table knows where it came from.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

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
        "command": " ".join(sys.argv),
    }


def record(path: Path, facts: dict) -> dict:
    atomic.write_json(path, facts)
    return facts


def markdown(facts: Mapping[str, Any]) -> str:
    """The provenance block at the top of a rendered notebook."""
    packages = ", ".join(f"{name} {version}" for name, version in facts["packages"].items())
    modified = {True: " (with uncommitted changes)", False: "", None: ""}[facts["git_modified"]]
    overrides = ", ".join(f"`{k}={v}`" for k, v in facts["overrides"].items()) or "none"
    return (f"<small>**Provenance** · profile `{facts['profile']}` · overrides {overrides} · code "
            f"`{facts['git_commit'][:12]}`{modified} · Python {facts['python']}, {packages} · device {facts['device']}, "
            f"{facts['threads']} threads · {facts['machine']} · {facts['time']}</small>")
