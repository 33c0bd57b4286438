"""Converter for the public AASCE/BoostNet radiographs (Wu et al., MICCAI 2017) into the project format.

The source gives 68 landmarks per image, the four corners of T1…L5; the paper's target is the Th8–Th11
region, so the mask is the union of those four vertebrae's quadrilaterals. Images are stretched to a
square, as in the paper, and the landmarks are scaled with them before rasterising, so the mask is
drawn at the target resolution instead of being resampled.

Landmark coordinates are taken as points in continuous image coordinates, the image spanning [0, W] ×
[0, H] (the distributors' own convention: ``landmarks.csv`` = ``p2`` / (W, H)); a target pixel belongs to
a vertebra when its centre lies inside the quadrilateral.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import scipy.io
from PIL import Image, UnidentifiedImageError
from skimage.draw import polygon
from tqdm.auto import tqdm

from spineseg.data.dataset import DatasetError, Sample, fresh_output, write_dataset

VERTEBRAE = ("Th8", "Th9", "Th10", "Th11")
FIRST_REGION_VERTEBRA = 7  # 0-based among T1…L5
N_LANDMARKS = 68
# Source order is TL, TR, BL, BR; walking the outline needs TL, TR, BR, BL.
OUTLINE_ORDER = (0, 1, 3, 2)
# landmarks.csv is p2 / (W, H) rounded to 5 significant digits (≤ 0.04 px off in the real data), so
# 2 px only trips on a genuine mismatch, such as rows of the two files belonging to different images.
CSV_TOLERANCE_PX = 2.0
TEST_ONLY = MappingProxyType({"training": False, "test": True})
DEFAULT_NAMES = MappingProxyType({"training": "aasce_train", "test": "aasce_test"})

# "sunhl-1th-02-Jan-2017-162 A AP.jpg": case 162, view A. Views of one case may be filed on different
# dates with their letters continuing (254 A–D on 10 Jan, E–P on 11 Jan), so the case number, not the
# dated stem, identifies the patient.
_CASE_STEM = re.compile(r"^(?P<prefix>.+?)-\d{1,2}-[a-z]{3}-\d{4}-(?P<case>\d+)\s+[a-z](?:\s+ap.*)?$", re.IGNORECASE)


def patient_of(filename: str) -> str:
    """Patient key for the split: images of one case must never sit on both sides of it.

    ``sunhl-1th-02-Jan-2017-162 A AP.jpg`` → ``sunhl-1th-162``; names without a case number (such as
    ``sunhl-1th-20-Jul-2016-coronal6.jpg``) give nothing to group on and are their own patient.
    """
    stem = Path(filename).stem
    match = _CASE_STEM.match(stem)
    return f"{match['prefix']}-{match['case']}" if match else stem


def sample_id(filename: str) -> str:
    """File-name-safe id that still reads like the source image's name."""
    stem = Path(filename).stem
    return re.sub(r"[^A-Za-z0-9.-]+", "_", stem).strip("_.")


@dataclass(frozen=True)
class _Annotated:
    filename: str
    image_path: Path
    width: int
    height: int
    region: np.ndarray  # float [4 vertebrae Th8..Th11, 4 corners TL TR BR BL, (x, y)] in source pixels


def _read_filenames(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing {path}")
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _read_landmarks(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"missing {path}")
    try:
        table = pd.read_csv(path, header=None, dtype=float).to_numpy()
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{path}: expected rows of {2 * N_LANDMARKS} numbers, no header ({exc})") from None
    if table.shape[1] != 2 * N_LANDMARKS:
        raise DatasetError(f"{path}: expected {2 * N_LANDMARKS} columns (68 x then 68 y), got {table.shape[1]}")
    return table


def _read_p2(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"missing landmark file {path}")
    try:
        points = scipy.io.loadmat(str(path))["p2"]
    except KeyError:
        raise DatasetError(f"{path}: no 'p2' variable") from None
    except (ValueError, OSError, TypeError) as exc:
        raise DatasetError(f"unreadable landmark file {path} ({exc})") from None
    if points.shape != (N_LANDMARKS, 2):
        raise DatasetError(f"{path}: 'p2' has shape {points.shape}, expected ({N_LANDMARKS}, 2)")
    return points.astype(np.float64)


def _image_size(path: Path) -> tuple[int, int]:
    """The size of a source image, decoded whole: a truncated JPEG fails here, before anything is written."""
    if not path.is_file():
        raise DatasetError(f"missing image {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"unreadable image {path} ({exc})") from None


def _signed_area(quad: np.ndarray) -> float:
    """Shoelace area; positive when the outline runs TL, TR, BR, BL in image coordinates (y down)."""
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _check_region(filename: str, region: np.ndarray) -> None:
    """Catch corners out of order or vertebrae out of sequence, which would silently corrupt the mask."""
    if not np.isfinite(region).all():
        raise DatasetError(f"{filename}: Th8–Th11 landmarks contain non-finite values")
    for name, quad in zip(VERTEBRAE, region):
        area = _signed_area(quad)
        if area <= 0:
            raise DatasetError(f"{filename}: {name} quadrilateral has area {area:.1f} px² with corners in "
                               f"TL, TR, BR, BL order; its corners are out of order or degenerate")
    centres = region[:, :, 1].mean(axis=1)
    if not np.all(np.diff(centres) > 0):
        raise DatasetError(f"{filename}: Th8–Th11 centres are not ordered top to bottom (rows {np.round(centres, 1).tolist()})")


def _read_split(src: Path, split: str, limit: int | None) -> list[_Annotated]:
    """Read and check every annotation of a split before anything is written."""
    image_dir, label_dir = src / "data" / split, src / "labels" / split
    filenames_csv, landmarks_csv = label_dir / "filenames.csv", label_dir / "landmarks.csv"
    filenames, landmarks = _read_filenames(filenames_csv), _read_landmarks(landmarks_csv)
    if len(filenames) != len(landmarks):
        raise DatasetError(f"{filenames_csv} lists {len(filenames)} images but {landmarks_csv} has {len(landmarks)} rows")
    if limit is not None:
        filenames, landmarks = filenames[:limit], landmarks[:limit]
    records, owner_of_id = [], {}
    for row, (filename, normalised) in enumerate(zip(filenames, landmarks)):
        image_path = image_dir / filename
        width, height = _image_size(image_path)
        mat_path = label_dir / f"{filename}.mat"
        points = _read_p2(mat_path)
        from_csv = np.column_stack([normalised[:N_LANDMARKS] * width, normalised[N_LANDMARKS:] * height])
        disagreement = float(np.max(np.abs(from_csv - points)))
        if not disagreement <= CSV_TOLERANCE_PX:
            raise DatasetError(f"{filename}: {landmarks_csv.name} row {row + 1} and {mat_path.name} disagree by up to "
                               f"{disagreement:.1f} px (tolerance {CSV_TOLERANCE_PX:g} px)")
        start = 4 * FIRST_REGION_VERTEBRA
        region = points[start:start + 4 * len(VERTEBRAE)].reshape(len(VERTEBRAE), 4, 2)[:, OUTLINE_ORDER]
        _check_region(filename, region)
        identifier = sample_id(filename)
        if identifier in owner_of_id:
            raise DatasetError(f"{filenames_csv}: {owner_of_id[identifier]!r} and {filename!r} both map to id {identifier!r}")
        owner_of_id[identifier] = filename
        records.append(_Annotated(filename, image_path, width, height, region))
    return records


def _rasterise(region: np.ndarray, size: int) -> np.ndarray:
    """Instance map 1..4 = Th8..Th11; where annotations overlap, the lower vertebra wins."""
    labels = np.zeros((size, size), dtype=np.uint8)
    for label, quad in enumerate(region, start=1):
        # skimage tests integer (row, col) positions, i.e. pixel centres; ours sit at k + 0.5.
        rows, cols = polygon(quad[:, 1] - 0.5, quad[:, 0] - 0.5, shape=labels.shape)
        labels[rows, cols] = label
    return labels


def _to_sample(record: _Annotated, split: str, size: int) -> Sample:
    try:
        with Image.open(record.image_path) as img:
            image = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"unreadable image {record.image_path} ({exc})") from None
    labels = _rasterise(record.region * np.array([size / record.width, size / record.height]), size)
    empty = [name for label, name in enumerate(VERTEBRAE, start=1) if not (labels == label).any()]
    if empty:
        raise DatasetError(f"{record.filename}: {', '.join(empty)} cover no pixel at {size}×{size}")
    return Sample(id=sample_id(record.filename), image=image, mask=labels > 0, labels=labels,
                  patient=patient_of(record.filename), source=f"data/{split}/{record.filename}")


def convert(src: str | Path, out: str | Path, splits: Sequence[str] = ("training", "test"), size: int = 512,
            seed: int = 0, names: Mapping[str, str] = DEFAULT_NAMES, limit: int | None = None,
            force: bool = False) -> dict[str, Path]:
    """Convert the AASCE splits found under ``src`` (the ``boostnet_labeldata`` folder) into ``out``.

    ``training`` gets a seeded patient-level train/val/test split; ``test`` becomes a test-only dataset.
    Every annotation and every source image of every split is read and checked before the first file is
    written, and the datasets are written beside ``out`` and moved into place when complete; a
    non-empty ``out`` is refused unless ``force``. ``limit`` keeps the first images of each split, for
    quick checks. Returns the dataset folder of each converted split.
    """
    src = Path(src)
    unknown = [s for s in splits if s not in TEST_ONLY]
    if unknown:
        raise DatasetError(f"unknown AASCE split(s) {unknown}; the distribution has {list(TEST_ONLY)}")
    unnamed = [s for s in splits if s not in names]
    if unnamed:
        raise DatasetError(f"no dataset name given for split(s) {unnamed}")
    if int(size) < 16:
        raise DatasetError(f"image size must be at least 16 pixels, got {size}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of images, got {limit}")
    found = [s for s in splits if (src / "data" / s).is_dir()]
    if not found:
        raise DatasetError(f"no AASCE split {list(splits)} under {src}: expected {src / 'data' / '<split>'}; "
                           f"src must be the boostnet_labeldata folder")
    records = {split: _read_split(src, split, limit) for split in found}
    with fresh_output(out, force) as staging:
        for split, split_records in records.items():
            progress = tqdm(split_records, desc=f"AASCE {split}", unit="image")
            samples = (_to_sample(record, split, int(size)) for record in progress)
            write_dataset(staging, names[split], samples, test_only=TEST_ONLY[split], seed=seed)
    return {split: Path(out) / names[split] for split in records}
