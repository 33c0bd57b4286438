"""Atomic file writes: a reader (or a rerun after kill -9) never sees a half-written artifact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_MARK = ".tmp"  # in the name of every temporary file: `.<name>.<random>.tmp<suffix>`


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_MARK + path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts should read like any other file
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_path` left in `folder` when a process was killed mid-write.

    Call it only where no other process is writing (a run folder under its lease).
    """
    stale = [path for path in Path(folder).glob(f".*{TEMPORARY_MARK}*") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV without its index."""
    write_text(path, frame.to_csv(index=False))


def read_json_object(path: str | os.PathLike, error: type[Exception], remedy: str) -> dict:
    """A JSON object as `write_json` wrote it; a missing, unreadable or other file raises `error` naming it and `remedy`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing: {remedy}")
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not readable JSON ({exc}): {remedy}") from None
    if not isinstance(values, dict):
        raise error(f"{path} holds no JSON object: {remedy}")
    return values


def read_json_cache(path: str | os.PathLike) -> dict:
    """A JSON object this package wrote as a cache or record; missing, unreadable or not an object reads as
    empty, so that it is made again instead of ending the run."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return values if isinstance(values, dict) else {}
