"""A study's ensemble as a bundle that travels: ``spineseg export`` writes it (`spineseg.study.deployment`),
``predict --model`` reads it here, with no training code, run store or stage module loaded.

A bundle (a zip, or the folder it unpacks to) holds every selected stage-3 member as a model folder
(``model.json`` + ``best.pt``, `spineseg.saved_models`), the crop model when the two-stage or the located
variant won on validation, the locator when the located variant won, the study's learned rule and
threshold (``learned.json``), ``provenance.json``, a model card, and ``bundle.json``, which says how they
fit together. Predicting with it needs neither the project, nor the profile, nor the training data: the
same is true of a study's own run folders, which `deployment.study_ensemble` finds without reading (or making)
any dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator

from spineseg.errors import ConfigError
from spineseg.names import PRECISIONS
from spineseg.saved_models import BEST, MODEL_FILE
from spineseg.study.core.config import shown as shown_value

FORMAT = "spineseg-bundle/1"
MAX_MEMBERS = 64  # more than any study selects: a longer list is a damaged or hostile bundle.json
MAX_ENTRY_BYTES = 2**30  # the largest file a bundle may unpack (a U-Net's best.pt is tens to a few hundred MB)
MAX_BUNDLE_BYTES = 8 * 2**30  # all of them together
MAX_MANIFEST_BYTES = 2**20
UNPACKED = "spineseg-bundle-"  # prefix of the temporary folders bundles unpack to, with the unpacking process's id


@dataclass(frozen=True)
class EnsembleFolders:
    """Where an ensemble's models are and what the study decided about them: a study's runs or a bundle."""

    members: list[tuple[Path, float]]  # each member's model folder and validation DSC (weighted voting)
    crop: Path | None  # the two-stage variant's crop model
    threshold: float  # the study's T
    precision: str  # the study's arithmetic (`auto`: fp16 on a GPU, fp32 on a CPU)
    locator: str | None  # the rule stage 4 put in front of the crop model
    origin: str  # what the messages call it: "the study `smoke`", "the bundle x.zip"
    locator_model: Path | None = None  # the located variant's locator (`spineseg.locator`)
    # whether the locator averages each image with its mirror, as the profile's locator.tta_hflip says; where nothing
    # records it (a bundle's hand-made bundle.json), True: the locator's default, with which stage 3 made its chains
    locator_hflip: bool = True
    root: Path | None = None  # a bundle's unpacked folder: messages name a model by its entry in the bundle
    best_rule: str | None = None  # what stage 4 chose on validation, `predict`'s default
    # whether the study's stage 3 averaged each member's image with its mirror (stage3.tta_hflip): the members'
    # probabilities stage 4 combined, so `predict`'s default
    members_hflip: bool = False

    def shown(self, folder: Path) -> str | None:
        """How messages name a model folder: its entry in the bundle (the unpacked path is gone when one is read)."""
        if self.root is None or not folder.is_relative_to(self.root.resolve()):
            return None
        return f"{self.origin}: {folder.relative_to(self.root.resolve()).as_posix()}"


class _Member(BaseModel):
    model_config = ConfigDict(extra="ignore")

    folder: StrictStr
    validation_dsc: Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]


class _Manifest(BaseModel):
    """bundle.json as `export_bundle` writes it, every field of its type: ``"threshold": true`` is no threshold."""

    model_config = ConfigDict(extra="ignore")

    format: Literal[FORMAT]  # type: ignore[valid-type]
    members: Annotated[list[_Member], Field(min_length=1, max_length=MAX_MEMBERS)]
    crop_model: StrictStr | None = None
    locator_model: StrictStr | None = None
    locator_hflip: StrictBool | None = None
    threshold: Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
    precision: Literal[PRECISIONS]  # type: ignore[valid-type]
    two_stage_locator: StrictStr | None = None
    best_rule: StrictStr | None = None
    members_hflip: StrictBool

    @model_validator(mode="after")
    def _each_member_once(self) -> _Manifest:
        folders = [member.folder for member in self.members]
        repeated = sorted({folder for folder in folders if folders.count(folder) > 1})
        if repeated:
            raise ValueError(f"lists the member folder {repeated[0]!r} {folders.count(repeated[0])} times")
        return self


@contextmanager
def open_bundle(path: str | Path) -> Iterator[EnsembleFolders]:
    """A bundle's models: a folder read in place, a zip unpacked to a temporary folder for as long as the context lasts.

    Of a zip only what bundle.json names is unpacked (the models' model.json and best.pt, the records beside them),
    each entry and all of them within `MAX_ENTRY_BYTES` and `MAX_BUNDLE_BYTES`, after bundle.json itself has been read
    from the zip and checked (`_Manifest`); a zip with an entry stored twice is refused. The folder is removed on every
    exit Python sees; one left by a killed process is removed by the next `open_bundle`.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--model {path} does not exist")
    if path.is_dir():
        manifest = path / "bundle.json"
        yield _bundle_folders(path, _manifest(manifest.read_bytes() if manifest.is_file() else None, path), path)
        return
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"--model {path}: not a bundle (a .zip from `spineseg export`, or the folder it unpacks to)")
    _remove_abandoned_unpacks()
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix=f"{UNPACKED}{os.getpid()}-") as folder:
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(f"--model {path}: the zip stores {twice[0]!r} twice; which one is meant cannot be told")
        entries = {info.filename: info for info in archive.infolist() if not info.is_dir()}
        manifest = _manifest(_read_entry(archive, entries.get("bundle.json"), MAX_MANIFEST_BYTES, path), path)
        wanted = _wanted_entries(manifest, entries, path)
        total = sum(entries[name].file_size for name in wanted)
        if total > MAX_BUNDLE_BYTES:
            raise ConfigError(f"--model {path}: its models would unpack to {total / 2**30:.1f} GiB, more than the "
                              f"{MAX_BUNDLE_BYTES / 2**30:.0f} GiB a bundle may hold")
        for name in wanted:
            target = Path(folder) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_read_entry(archive, entries[name], MAX_ENTRY_BYTES, path))
        yield _bundle_folders(Path(folder), manifest, path)


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None, limit: int, shown: Path) -> bytes | None:
    """One entry's bytes, read no further than `limit` (a size the zip's directory understates is caught too)."""
    if info is None:
        return None
    if info.file_size > limit:
        raise ConfigError(f"--model {shown}: {info.filename} would unpack to {info.file_size / 2**20:.0f} MiB, more than "
                          f"the {limit / 2**20:.0f} MiB a bundle's file may hold")
    try:
        with archive.open(info) as entry:
            data = entry.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError) as exc:  # CRC, truncation, encryption
        raise ConfigError(f"--model {shown}: the zip is damaged at {info.filename} ({type(exc).__name__}: {exc}); "
                          f"export it again") from None
    if len(data) > limit:
        raise ConfigError(f"--model {shown}: {info.filename} unpacks to more than its stated size; refused")
    return data


def _manifest(data: bytes | None, shown: Path) -> _Manifest:
    if data is None:
        raise ConfigError(f"--model {shown}: no bundle.json in it; it is not a bundle from `spineseg export`")
    try:
        values = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--model {shown}: bundle.json is not readable JSON ({exc})") from None
    if isinstance(values, dict) and values.get("format") != FORMAT:
        raise ConfigError(f"--model {shown}: format {values.get('format')!r}, this spineseg reads {FORMAT!r}")
    if isinstance(values, dict) and values.get("members") == []:
        raise ConfigError(f"--model {shown}: the bundle lists no members")
    try:
        return _Manifest.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # the whole file's fault (a member listed twice): the file, not its every value
            raise ConfigError(f"--model {shown}: bundle.json {message}") from None
        field = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"--model {shown}: bundle.json field {field} = {shown_value(error.get('input'))}: {message}") from None


def _wanted_entries(manifest: _Manifest, entries: dict[str, zipfile.ZipInfo], shown: Path) -> list[str]:
    """The zip entries a prediction reads: each named model's model.json and best.pt, and the records beside them."""
    wanted = [name for name in ("bundle.json", "learned.json", "provenance.json", "MODEL_CARD.md") if name in entries]
    models = [member.folder for member in manifest.members] + [f for f in (manifest.crop_model, manifest.locator_model) if f]
    for folder in models:
        for name in (MODEL_FILE, BEST):
            entry = f"{folder.strip('/')}/{name}"
            if entry not in entries:
                raise ConfigError(f"--model {shown}: bundle.json names the model folder {folder!r}, but the zip has no {entry}")
            wanted.append(entry)
    return wanted


def _remove_abandoned_unpacks() -> None:
    """Unpacked bundles whose process is gone (killed before it could clean up): removed."""
    for folder in Path(tempfile.gettempdir()).glob(f"{UNPACKED}*"):
        pid = folder.name.removeprefix(UNPACKED).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process: alive, and not ours to clean up after
    return True


def _bundle_folders(root: Path, manifest: _Manifest, shown: Path) -> EnsembleFolders:
    folder = partial(_inside, root, shown=shown)
    crop, locator = (folder(name) if name else None for name in (manifest.crop_model, manifest.locator_model))
    return EnsembleFolders([(folder(m.folder), m.validation_dsc) for m in manifest.members], crop, manifest.threshold,
                           manifest.precision, manifest.two_stage_locator, f"the bundle {shown}", locator,
                           manifest.locator_hflip is not False,  # where nothing records it: True (`EnsembleFolders`)
                           root, manifest.best_rule, manifest.members_hflip)


def _inside(root: Path, relative: str, shown: Path) -> Path:
    if os.path.isabs(relative):
        raise ConfigError(f"--model {shown}: {relative!r} is not a folder inside the bundle")
    try:
        folder = (root / relative).resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop, say
        raise ConfigError(f"--model {shown}: the model folder {relative!r} cannot be resolved ({exc})") from None
    if not folder.is_relative_to(root.resolve()):
        raise ConfigError(f"--model {shown}: {relative!r} lies outside the bundle")
    return folder
