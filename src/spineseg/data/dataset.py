"""The on-disk dataset format every stage reads, and its in-memory loader.

Layout: ``<root>/<name>/images/<id>.png``, ``masks/<id>.png`` (0/255), optional ``labels/<id>.png``
(instance map, 1–4 = Th8..Th11) and ``manifest.csv`` with ``id, split, image, mask`` (+ ``labels``,
``patient``, ``source``). The split is decided once, when the dataset is written, so every stage and
every rerun sees the same images.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from spineseg import atomic
from spineseg.errors import DatasetError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("id", "split", "image", "mask")
PAPER_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass(frozen=True)
class Sample:
    """One annotated radiograph as produced by a generator or converter."""

    id: str
    image: np.ndarray  # uint8 [H, W]
    mask: np.ndarray  # bool [H, W]
    labels: np.ndarray | None = None  # uint8 [H, W], 0 = background, 1..4 = Th8..Th11
    patient: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Split:
    """A split held in memory: images in [0, 1], binary masks, all resized to one size."""

    dataset: str
    split: str
    ids: tuple[str, ...]
    images: np.ndarray  # float32 [N, H, W]
    masks: np.ndarray  # uint8 {0, 1} [N, H, W]

    def __len__(self) -> int:
        return len(self.ids)


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


def write_dataset(root: str | Path, name: str, samples: Iterable[Sample], *, test_only: bool = False,
                  seed: int = 0, fractions: tuple[float, float, float] = PAPER_FRACTIONS) -> Path:
    """Write samples in the project format; the manifest goes last, so its presence means complete.

    ``test_only`` marks an external dataset (the paper's dataset 2); otherwise a patient-level
    train/val/test split is drawn with ``seed`` and recorded in the manifest.
    """
    folder = Path(root) / name
    rows = []
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
        rows.append(row)
    if not rows:
        raise DatasetError(f"dataset {folder}: no samples to write")
    frame = pd.DataFrame(rows)
    if frame["id"].duplicated().any():
        raise DatasetError(f"dataset {folder}: duplicate ids {sorted(frame.loc[frame['id'].duplicated(), 'id'])}")
    frame["split"] = "test" if test_only else assign_splits(list(frame["id"]), list(frame["patient"]), seed, fractions)
    columns = [c for c in ("id", "split", "image", "mask", "labels", "patient", "source") if c in frame]
    atomic.write_csv(folder / MANIFEST, frame[columns])
    return folder


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """Read and check a dataset's manifest: columns, ids, split names."""
    path = Path(folder) / MANIFEST
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
    dupes = sorted(set(frame.loc[frame["id"].duplicated(), "id"]))
    if dupes:
        raise DatasetError(f"{path}: duplicate id(s) {dupes}")
    unknown = sorted(set(frame["split"]) - set(SPLITS))
    if unknown:
        raise DatasetError(f"{path}: unknown split name(s) {unknown}; use {list(SPLITS)}")
    return frame


def _read_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I"):
                return np.asarray(img, dtype=np.float64) / 65535.0
            return np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"unreadable image file {path} ({exc})") from None


def _resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if array.shape == (size, size):
        return array
    img = Image.fromarray(array.astype(np.float32), mode="F")
    method = Image.NEAREST if nearest else Image.BILINEAR  # PIL's bilinear is area-aware when shrinking
    return np.asarray(img.resize((size, size), method), dtype=np.float32)


@lru_cache(maxsize=16)
def _load_split_cached(folder: str, split: str, size: int, stamp: float) -> Split:
    frame = read_manifest(folder)
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise DatasetError(f"{Path(folder) / MANIFEST}: split {split!r} is empty")
    images = np.empty((len(rows), size, size), dtype=np.float32)
    masks = np.empty((len(rows), size, size), dtype=np.uint8)
    for k, row in enumerate(rows.itertuples()):
        image_path, mask_path = Path(folder) / row.image, Path(folder) / row.mask
        image, mask = _read_png(image_path), _read_png(mask_path)
        if image.shape != mask.shape:
            raise DatasetError(f"size mismatch: {image_path} is {image.shape[::-1]} but {mask_path} is {mask.shape[::-1]}")
        values = np.unique(mask)
        if not np.all(np.isin(values, (0.0, 1.0))):
            raise DatasetError(f"mask {mask_path} is not binary: found values {np.round(values[:6] * 255).astype(int).tolist()}, expected 0 and 255")
        images[k] = np.clip(_resize(image, size, nearest=False), 0.0, 1.0)
        masks[k] = _resize(mask, size, nearest=True) > 0.5
    images.flags.writeable = False  # shared by every caller through the cache
    masks.flags.writeable = False
    return Split(Path(folder).name, split, tuple(rows["id"]), images, masks)


def load_split(folder: str | Path, split: str, size: int) -> Split:
    """Load one split of a dataset folder into memory, resized to ``size`` × ``size`` (cached per process)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if int(size) < 16:
        raise DatasetError(f"image size must be at least 16 pixels, got {size}")
    manifest = Path(folder) / MANIFEST
    stamp = manifest.stat().st_mtime if manifest.is_file() else 0.0
    return _load_split_cached(str(Path(folder).resolve()), split, int(size), stamp)


def splits_present(folder: str | Path) -> list[str]:
    frame = read_manifest(folder)
    return [s for s in SPLITS if (frame["split"] == s).any()]

