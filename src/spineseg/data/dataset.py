"""The on-disk dataset format every stage reads, its check, its fingerprint and its in-memory loader.

Layout: ``<root>/<name>/images/<id>.png``, ``masks/<id>.png`` (0/255), optional ``labels/<id>.png``
(vertebral level codes, see `spineseg.vertebrae`) and ``manifest.csv`` with ``id, split, image, mask``
(+ ``labels``, ``patient``, ``twins``, ``source``, ``flags``). The split is decided once, when the dataset
is written, so every stage and every rerun sees the same images, and it keeps each patient on one side:
a manifest whose patient spans two splits is refused. Every path in the manifest must lie inside the
dataset folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from spineseg import atomic
from spineseg.data.twins import TwinSearch, find_twins, join_patients, level_centres, spine_crop
from spineseg.errors import DatasetError
from spineseg.limits import MAX_SEED, MAX_SIDE

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.csv"
TWINS = "twins.json"  # beside the manifest of a dataset written with join_twins (`write_twin_report`)
CONVERSION_SUMMARY = "conversion_summary.txt"  # what a converter writes beside its datasets
REQUIRED_COLUMNS = ("id", "split", "image", "mask")
FILE_COLUMNS = ("image", "mask", "labels")
PAPER_FRACTIONS = (0.7, 0.1, 0.2)
MIN_SIZE = 16

Size = int | tuple[int, int]  # a square side, or (height, width)


def as_hw(size: Size) -> tuple[int, int]:
    """A size as (height, width), each side in [MIN_SIZE, MAX_SIDE]."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if min(height, width) < MIN_SIZE:
        raise DatasetError(f"image size must be at least {MIN_SIZE} pixels, got {size}")
    if max(height, width) > MAX_SIDE:
        raise DatasetError(f"image size must be at most {MAX_SIDE} pixels a side, got {size}")
    return int(height), int(width)


def check_seed(seed: int) -> int:
    if not 0 <= int(seed) <= MAX_SEED:
        raise DatasetError(f"seed must be an integer in [0, {MAX_SEED}], got {seed}")
    return int(seed)


@dataclass(frozen=True)
class Sample:
    """One annotated radiograph as produced by a generator or converter."""

    id: str
    image: np.ndarray  # uint8 [H, W]
    mask: np.ndarray  # bool [H, W]
    labels: np.ndarray | None = None  # uint8 [H, W], level codes (spineseg.vertebrae)
    patient: str | None = None
    source: str | None = None
    flags: str = ""  # what is known to be wrong with the annotation, if anything


@dataclass(frozen=True)
class Split:
    """A split held in memory: images in [0, 1], binary masks, all resized to one size."""

    dataset: str
    split: str
    ids: tuple[str, ...]
    images: np.ndarray  # float32 [N, H, W]
    masks: np.ndarray  # uint8 {0, 1} [N, H, W]
    labels: np.ndarray | None = None  # uint8 [N, H, W] level codes, when asked for and present
    patients: tuple[str, ...] = ()  # each image's patient (its id where the manifest names none)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> tuple[int, int]:
        return self.images.shape[1], self.images.shape[2]


def assign_splits(ids: list[str], patients: list[str | None], seed: int,
                  fractions: tuple[float, float, float] = PAPER_FRACTIONS) -> list[str]:
    """Seeded train/val/test assignment that keeps all images of one patient in one split."""
    if len(ids) == 0:
        raise DatasetError("cannot split an empty dataset")
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DatasetError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    groups: dict[str, list[int]] = {}
    for i, (sample_id, patient) in enumerate(zip(ids, patients)):
        groups.setdefault(patient if patient else f"__{sample_id}", []).append(i)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    n = len(ids)
    targets = (round(fractions[0] * n), round(fractions[1] * n))
    counts = [0, 0, 0]
    out = [""] * n
    for key in order:
        slot = 0 if counts[0] < targets[0] else 1 if counts[1] < targets[1] else 2
        for i in groups[key]:
            out[i] = SPLITS[slot]
        counts[slot] += len(groups[key])
    return out


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _join_twins(frame: pd.DataFrame, crops: list[np.ndarray | None],
                centres: list[np.ndarray | None]) -> tuple[pd.DataFrame, TwinSearch]:
    """Patients joined wherever two of their images are one radiograph (`spineseg.data.twins`); the ``twins``
    column says which, how alike and, where label maps exist, how close their spines' shapes are."""
    ids = list(frame["id"])
    patients = [patient or sample_id for patient, sample_id in zip(frame["patient"], ids)]
    search = find_twins(ids, crops, centres if any(c is not None for c in centres) else None, patients)
    evidence: dict[str, list[str]] = {sample_id: [] for sample_id in ids}
    for twin in search.twins:
        evidence[twin.first].append(twin.evidence(twin.second))
        evidence[twin.second].append(twin.evidence(twin.first))
    joined = frame.assign(patient=join_patients(ids, patients, search.twins), twins=["; ".join(evidence[i]) for i in ids])
    return joined, search


def write_dataset(root: str | Path, name: str, samples: Iterable[Sample], *, test_only: bool = False,
                  seed: int = 0, fractions: tuple[float, float, float] = PAPER_FRACTIONS,
                  join_twins: bool = False) -> Path:
    """Write samples in the project format; the manifest goes last, so its presence means complete.

    ``test_only`` marks an external dataset (the paper's dataset 2); otherwise a patient-level
    train/val/test split is drawn with ``seed`` and recorded in the manifest. ``join_twins`` first
    joins the patients of images that are one radiograph filed twice (`spineseg.data.twins`), so that
    the split keeps them together, and writes ``twins.json``: every candidate pair with both scores and
    whether it was joined, and how the search decided.
    """
    folder = Path(root) / name
    rows, crops, centres = [], [], []
    for s in samples:
        if s.image.shape != s.mask.shape:
            raise DatasetError(f"sample {s.id!r}: image {s.image.shape} and mask {s.mask.shape} differ in size")
        row = {"id": s.id, "image": f"images/{s.id}.png", "mask": f"masks/{s.id}.png"}
        atomic.write_bytes(folder / row["image"], _png_bytes(np.asarray(s.image, dtype=np.uint8)))
        atomic.write_bytes(folder / row["mask"], _png_bytes(np.where(s.mask, 255, 0).astype(np.uint8)))
        if s.labels is not None:
            row["labels"] = f"labels/{s.id}.png"
            atomic.write_bytes(folder / row["labels"], _png_bytes(np.asarray(s.labels, dtype=np.uint8)))
        row["patient"] = s.patient or ""
        row["source"] = s.source or ""
        row["flags"] = s.flags
        rows.append(row)
        if join_twins:
            crops.append(spine_crop(s.image, s.mask))
            centres.append(level_centres(s.labels))
    if not rows:
        raise DatasetError(f"dataset {folder}: no samples to write")
    frame = pd.DataFrame(rows)
    if frame["id"].duplicated().any():
        raise DatasetError(f"dataset {folder}: duplicate ids {sorted(frame.loc[frame['id'].duplicated(), 'id'])}")
    if join_twins:
        frame, search = _join_twins(frame, crops, centres)
        write_twin_report(folder / TWINS, search)
    frame["split"] = "test" if test_only else assign_splits(list(frame["id"]), list(frame["patient"]), seed, fractions)
    frame = frame.drop(columns=[c for c in ("twins", "flags") if c in frame and not frame[c].astype(bool).any()])
    columns = [c for c in ("id", "split", "image", "mask", "labels", "patient", "twins", "source", "flags") if c in frame]
    atomic.write_csv(folder / MANIFEST, frame[columns])
    return folder


def hold_out_latest(folder: str | Path, out: str | Path, fraction: float, acquired: dict[str, tuple], seed: int = 0,
                    fractions: tuple[float, float, float] = PAPER_FRACTIONS) -> list[str]:
    """Move the latest acquisitions of dataset `folder` into a test-only dataset `out`; split the rest afresh.

    A later batch tests what a random split cannot: radiographs taken after every training image, as a
    model meets them in use. Patient groups stay whole and are taken latest first, a group counting by its
    latest image (``acquired``: id → a sortable key, e.g. (date, case number)), until at least `fraction` of
    the images are held out; the images left get a new seeded train/val/test split. Returns the ids held out.
    """
    folder, out = Path(folder), Path(out)
    frame = read_manifest(folder)
    if not 0 < fraction < 1:
        raise DatasetError(f"the later batch must be a fraction of the images between 0 and 1, got {fraction}")
    unknown = sorted(set(frame["id"]) - set(acquired))
    if unknown:
        raise DatasetError(f"{folder / MANIFEST}: no acquisition time for {len(unknown)} image(s), e.g. {unknown[:3]}")
    patients = frame["patient"].mask(frame["patient"] == "", frame["id"]) if "patient" in frame else frame["id"]
    latest = frame["id"].map(acquired).groupby(patients, sort=False).max()
    held, count, sizes = [], 0, patients.value_counts()
    for patient in sorted(latest.index, key=lambda p: (latest[p], p), reverse=True):
        if count >= fraction * len(frame):
            break
        held.append(patient)
        count += int(sizes[patient])
    later = patients.isin(held)
    if later.all():
        raise DatasetError(f"{folder}: holding out {fraction:.0%} of the images by patient group leaves no images to train on")
    for column in (c for c in FILE_COLUMNS if c in frame.columns):
        for relative in frame.loc[later, column]:
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).replace(out / relative)
    kept = frame[~later].copy()
    kept["split"] = assign_splits(list(kept["id"]), list(patients[~later]), seed, fractions)
    atomic.write_csv(out / MANIFEST, frame[later].assign(split="test"))
    atomic.write_csv(folder / MANIFEST, kept)
    return list(frame.loc[later, "id"])


def refuse_overlap(out: str | Path, source: str | Path) -> None:
    """Writing ``out`` replaces it: refuse when it is, holds or lies inside ``source``, which would be lost."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents or source in out.parents:
        where = "is" if out == source else "holds" if out in source.parents else "lies inside"
        raise DatasetError(f"the output folder {out} {where} the source {source}: writing it would delete or "
                           f"mix with the source data; choose an output folder outside the source")


@contextmanager
def fresh_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out` to write datasets into, renamed to `out` when the block succeeds.

    A non-empty `out` is refused unless `force`, and then replaced only once the new content is
    complete: a failure half-way (a broken source index, Ctrl-C) leaves `out` as it was. `force` replaces
    only what a conversion wrote (datasets and the conversion summary): a folder holding anything else is
    refused, naming it. The new folder follows the umask, like any folder the user makes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DatasetError(f"{out} is not empty: choose a new or empty folder, or pass --force to replace it")
    foreign = sorted(entry.name for entry in out.iterdir() if not _ours(entry)) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DatasetError(f"{out} holds {shown}, which no spineseg conversion wrote: --force replaces only a folder of "
                           f"spineseg datasets; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would stay on `out`, unreadable to workers of another account
    try:
        yield staging
        if out.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(previous / out.name)
            staging.rename(out)
            shutil.rmtree(previous)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _ours(entry: Path) -> bool:
    """What a spineseg conversion leaves in its output folder: datasets (a folder with a manifest), its summary."""
    return (entry / MANIFEST).is_file() if entry.is_dir() else entry.name == CONVERSION_SUMMARY


def _umask() -> int:
    """The process's umask (os offers it only by setting it: set and restore at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """Read and check a dataset's manifest: columns, ids, split names, and paths inside the folder."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DatasetError(f"no dataset manifest at {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    if frame.empty:
        raise DatasetError(f"{path}: the dataset is empty")
    blank = [int(row) + 2 for row in np.flatnonzero(frame["id"].str.strip() == "")]  # file lines: header first, from 1
    if blank:
        raise DatasetError(f"{path}: line(s) {blank[:5]} have no id; every image needs one ('NA' is a name too)")
    dupes = sorted(set(frame.loc[frame["id"].duplicated(), "id"]))
    if dupes:
        raise DatasetError(f"{path}: duplicate id(s) {dupes}")
    unknown = sorted(set(frame["split"]) - set(SPLITS))
    if unknown:
        raise DatasetError(f"{path}: unknown split name(s) {unknown}; use {list(SPLITS)}")
    root = folder.resolve()
    for column in (c for c in FILE_COLUMNS if c in frame.columns):
        for sample_id, relative in zip(frame["id"], frame[column]):
            if not (root / relative).resolve().is_relative_to(root) or Path(relative).is_absolute():
                raise DatasetError(f"{path}: {column} of {sample_id!r} is {relative!r}, outside the dataset folder {root}")
    return frame


def open_image(path: Path, decode: bool = True) -> Image.Image:
    """An image file opened by PIL, decoded unless `decode` is false (then only its header is read: its size is
    known, and PIL refuses a decompression bomb); a missing or unreadable file is one `DatasetError` naming it."""
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    try:
        with warnings.catch_warnings():
            # between PIL's limit and twice it PIL only warns: such an image is read (at a reduced size where the
            # model needs far less, `radiographs.load_radiograph`) and its size said where it matters, not in a
            # warning on stderr; past twice the limit PIL's DecompressionBombError still refuses it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        if decode:
            img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"unreadable image file {path} ({exc})") from None


HIGH_BIT_DEPTHS = (10, 12, 14, 16)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def bits_used(maximum: float) -> int:
    """The bit depth a high-bit-depth image's values use: the first of `HIGH_BIT_DEPTHS` above its `maximum`."""
    return next((b for b in HIGH_BIT_DEPTHS if maximum < 2**b), 16)


def read_image(path: Path, dtype: type = np.float64) -> np.ndarray:
    """A grayscale image as float64 (or `dtype`) in [0, 1].

    16-bit PNGs are scaled by the bit depth their values actually use (10, 12, 14 or 16 bits), so a
    12-bit detector's image stored in a 16-bit PNG is not read four times too dark. Read as float32, an
    image has the float64 values rounded once (a quotient of integers), so `model_input` makes the same
    array of either: `predict` reads float32, at half the memory.
    """
    with open_image(path) as img:
        if img.mode in HIGH_BIT_MODES:
            values = np.asarray(img, dtype=dtype)
            return np.clip(values / (2 ** bits_used(values.max()) - 1), 0.0, 1.0)
        return np.asarray(img.convert("L"), dtype=dtype) / 255.0


def read_mask(path: Path) -> np.ndarray:
    """A binary mask (0 and 255, or 0 and 1) as bool."""
    with open_image(path) as img:
        values = np.asarray(img.convert("L") if img.mode not in ("1", "L") else img)
    found = np.unique(values)
    if not (set(found.tolist()) <= {0, 255} or set(found.tolist()) <= {0, 1}):
        raise DatasetError(f"mask {path} is not binary: found values {found[:6].tolist()}, expected 0 and 255")
    return values > 0


def read_labels(path: Path) -> np.ndarray:
    """A label map of level codes (uint8)."""
    with open_image(path) as img:
        if img.mode not in ("L", "P"):
            raise DatasetError(f"label map {path} must be an 8-bit single-channel PNG, got mode {img.mode}")
        return np.asarray(img, dtype=np.uint8)


_READERS = {"image": read_image, "mask": read_mask, "labels": read_labels}


@dataclass(frozen=True)
class DatasetCheck:
    """What a full read of a dataset found: its content fingerprint, its image size (when uniform), its splits."""

    fingerprint: str
    size: tuple[int, int] | None
    counts: dict[str, int]


def _refuse_patients_across_splits(frame: pd.DataFrame, manifest: Path) -> None:
    """A patient with images in two splits would be trained on and tested on: name them and their images."""
    if "patient" not in frame.columns:
        return
    named = frame[frame["patient"] != ""]
    splits_of = named.groupby("patient")["split"].nunique()
    crossing = sorted(splits_of[splits_of > 1].index)
    if crossing:
        described = "; ".join(
            f"{patient}: " + ", ".join(f"{row.id} ({row.split})" for row in named[named["patient"] == patient].itertuples())
            for patient in crossing[:5])
        raise DatasetError(f"{manifest}: {len(crossing)} patient(s) have images in more than one split, so a model "
                           f"would be tested on a patient it was trained on: {described}")


def _load_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return {}


def check_dataset(folder: str | Path, *, external: bool = False, cache: Path | None = None) -> DatasetCheck:
    """Decode every file of a dataset once and check it; fingerprint its content.

    Dataset 1 (``external=False``) needs non-empty train, val and test splits; an external dataset
    (the article's dataset 2) must mark every row ``test``. Every image must have a mask of its size
    (and a label map of its size, where the manifest names one). The fingerprint hashes the manifest
    and every file's bytes, so regenerating an image or correcting a mask changes it. Hashes of files
    already checked are reused from ``cache`` while their size and modification time are unchanged.
    """
    folder = Path(folder)
    frame = read_manifest(folder)
    counts = {split: int((frame["split"] == split).sum()) for split in SPLITS}
    manifest = folder / MANIFEST
    if external:
        other = frame.loc[frame["split"] != "test", "id"].tolist()
        if other:
            raise DatasetError(f"{manifest}: an external test dataset must mark every row 'test'; "
                               f"{len(other)} are not (first: {other[:5]})")
    else:
        empty = [split for split, n in counts.items() if n == 0]
        if empty:
            raise DatasetError(f"{manifest}: split(s) {empty} are empty; dataset 1 needs train, val and test images")
        _refuse_patients_across_splits(frame, manifest)
    known = _load_cache(cache)
    entries, digest, sizes = {}, hashlib.sha1(manifest.read_bytes()), set()
    columns = [c for c in FILE_COLUMNS if c in frame.columns]
    for row in frame.itertuples():
        shapes = {}
        for column in columns:
            relative = getattr(row, column)
            if column == "labels" and not relative:
                continue
            path = folder / relative
            if not path.is_file():
                raise DatasetError(f"missing file {path}")
            stat = path.stat()
            entry = known.get(relative)
            if not entry or entry[:2] != [stat.st_size, stat.st_mtime_ns]:
                shape = _READERS[column](path).shape
                entry = [stat.st_size, stat.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest(), *shape]
            entries[relative] = entry
            shapes[column] = tuple(entry[3:5])
            digest.update(f"{relative}:{entry[2]}".encode())
        if len(set(shapes.values())) > 1:
            described = ", ".join(f"{c} {folder / getattr(row, c)} is {shape[1]}x{shape[0]}" for c, shape in shapes.items())
            raise DatasetError(f"size mismatch for {row.id!r}: {described}")
        sizes.add(shapes["image"])
    if cache is not None:
        atomic.write_text(cache, json.dumps(entries))
    return DatasetCheck(digest.hexdigest()[:12], next(iter(sizes)) if len(sizes) == 1 else None, counts)


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if array.shape == size:
        return array
    img = Image.fromarray(array.astype(np.float32), mode="F")
    method = Image.NEAREST if nearest else Image.BILINEAR  # PIL's bilinear is area-aware when shrinking
    return np.asarray(img.resize(size[::-1], method), dtype=np.float32)


def model_input(image: np.ndarray, size: Size) -> np.ndarray:
    """An image [H, W] in [0, 1] as a model of input `size` sees it, in the study's loader and in `predict`
    alike: PIL's bilinear resize (area-aware when shrinking), clipped to [0, 1], float32."""
    return np.clip(_resize(image, as_hw(size), nearest=False), 0.0, 1.0).astype(np.float32)


def stored_size(folder: str | Path, split: str) -> tuple[int, int]:
    """The common size of a split's stored images; a clear error where they differ."""
    frame = read_manifest(folder)
    sizes = set()
    for relative in frame.loc[frame["split"] == split, "image"]:
        with open_image(Path(folder) / relative) as img:
            sizes.add(img.size[::-1])
    if len(sizes) != 1:
        raise DatasetError(f"{Path(folder) / MANIFEST}: the {split} images differ in size ({sorted(sizes)[:4]}); "
                           f"they need a common size to be evaluated on one grid")
    return sizes.pop()


SPLIT_CACHE_BYTES = 2 * 2**30  # the most memory loaded splits keep between calls


class _SplitCache:
    """Loaded splits, least recently used dropped first beyond `SPLIT_CACHE_BYTES`, keyed by what was read:
    the size and modification time of the manifest and of every file, so a file replaced in place is read again."""

    def __init__(self) -> None:
        self._splits: OrderedDict[tuple, tuple[tuple, Split]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, files: tuple) -> Split | None:
        with self._lock:
            found = self._splits.get(key)
            if found is None or found[0] != files:
                return None
            self._splits.move_to_end(key)
            return found[1]

    def put(self, key: tuple, files: tuple, split: Split) -> None:
        with self._lock:
            self._splits[key] = (files, split)
            self._splits.move_to_end(key)
            while self._splits and sum(_nbytes(kept) for _, kept in self._splits.values()) > SPLIT_CACHE_BYTES:
                self._splits.popitem(last=False)


def _nbytes(split: Split) -> int:
    return sum(array.nbytes for array in (split.images, split.masks, split.labels) if array is not None)


_SPLITS = _SplitCache()


def _read_split(folder: Path, rows: pd.DataFrame, split: str, size: tuple[int, int] | None, labels: bool) -> Split:
    if rows.empty:
        raise DatasetError(f"{folder / MANIFEST}: split {split!r} is empty")
    size = size or stored_size(folder, split)
    images = np.empty((len(rows), *size), dtype=np.float32)
    masks = np.empty((len(rows), *size), dtype=np.uint8)
    label_maps = np.empty((len(rows), *size), dtype=np.uint8) if labels else None
    for k, row in enumerate(rows.itertuples()):
        image_path, mask_path = folder / row.image, folder / row.mask
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape != mask.shape:
            raise DatasetError(f"size mismatch: {image_path} is {image.shape[::-1]} but {mask_path} is {mask.shape[::-1]}")
        images[k] = model_input(image, size)
        masks[k] = _resize(mask.astype(np.float32), size, nearest=True) > 0.5
        if label_maps is not None:
            label_maps[k] = _resize(read_labels(folder / row.labels), size, nearest=True)
    for array in (images, masks, label_maps):
        if array is not None:
            array.flags.writeable = False  # shared by every caller through the cache
    patients = rows["patient"] if "patient" in rows.columns else rows["id"]
    patients = tuple(p or i for p, i in zip(patients, rows["id"]))
    return Split(folder.name, split, tuple(rows["id"]), images, masks, label_maps, patients)


def _file_stamps(folder: Path, rows: pd.DataFrame, columns: list[str]) -> tuple:
    """Size and modification time of the manifest and of every file a split reads: what its cache entry is valid for."""
    paths = [folder / MANIFEST, *(folder / relative for column in columns for relative in rows[column])]
    try:
        return tuple((stat.st_size, stat.st_mtime_ns) for stat in map(Path.stat, paths))
    except FileNotFoundError as exc:
        raise DatasetError(f"missing file {exc.filename}") from None


def load_split(folder: str | Path, split: str, size: Size | None = None, labels: bool = False) -> Split:
    """Load one split into memory, resized to ``size`` (a side or (height, width); None: as stored).

    Images are resized bilinearly, masks and label maps by nearest neighbour. ``labels`` also loads the
    label maps, when every image of the split has one. Kept in memory (up to `SPLIT_CACHE_BYTES`) while
    none of the files it was read from changes.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    folder = Path(folder).resolve()
    rows = read_manifest(folder)
    rows = rows[rows["split"] == split]
    labels = bool(labels) and "labels" in rows.columns and not rows.empty and rows["labels"].astype(bool).all()
    size = None if size is None else as_hw(size)
    key = (str(folder), split, size, labels)
    files = _file_stamps(folder, rows, ["image", "mask", "labels"] if labels else ["image", "mask"])
    cached = _SPLITS.get(key, files)
    if cached is None:
        cached = _read_split(folder, rows, split, size, labels)
        _SPLITS.put(key, files, cached)
    return cached


def twins_between(first: str | Path, second: str | Path) -> TwinSearch:
    """Images of dataset ``first`` that are one radiograph with an image of dataset ``second``, best first.

    An external test set (the article's dataset 2) should have none: a twin there was trained on.
    """
    ids_a, crops_a, centres_a = _spine_crops(Path(first))
    ids_b, crops_b, centres_b = _spine_crops(Path(second))
    return find_twins(ids_a, crops_a, centres_a, other_ids=ids_b, other_crops=crops_b, other_centres=centres_b)


def _spine_crops(folder: Path) -> tuple[list[str], list[np.ndarray | None], list[np.ndarray] | None]:
    """Each image's id, spine crop and (where the dataset has label maps) vertebra centres."""
    frame = read_manifest(folder)
    crops = [spine_crop(read_image(folder / row.image), read_mask(folder / row.mask)) for row in frame.itertuples()]
    labelled = "labels" in frame.columns and frame["labels"].astype(bool).all()
    centres = [level_centres(read_labels(folder / row.labels)) for row in frame.itertuples()] if labelled else None
    return list(frame["id"]), crops, centres


def write_twin_report(path: Path, search: TwinSearch) -> None:
    """``twins.json``: how the search decided (rule, distance threshold, unrelated pairs, false-join rate), and
    every candidate pair with its correlation and distance, joined or refused."""
    pairs = [{"first": t.first, "second": t.second, "r": round(t.score, 4),
              "distance": None if np.isnan(t.distance) else round(t.distance, 4), "joined": joined}
             for joined, found in ((True, search.twins), (False, search.refused)) for t in found]
    atomic.write_json(path, {"rule": search.describe(), "threshold": None if np.isnan(search.threshold) else search.threshold,
                             "reference_pairs": search.reference_pairs, "false_join_rate": search.false_join_rate,
                             "pairs": pairs})


def splits_present(folder: str | Path) -> list[str]:
    frame = read_manifest(folder)
    return [s for s in SPLITS if (frame["split"] == s).any()]
