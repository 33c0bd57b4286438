"""Converter for the public AASCE/BoostNet radiographs (Wu et al., MICCAI 2017) into the project format.

The source gives 68 landmarks per image, the four corners of T1…L5. Every vertebra's quadrilateral is
drawn into the label map with its level code (`spineseg.vertebrae`: Th1 = 1 … L5 = 17), and the mask is
the article's target, Th8–Th11. Images are resized to the target size (tall, e.g. 512 × 192, keeps
these tall radiographs close to their aspect; a square stretches them as the article's square inputs
do), and the landmarks are scaled with them before rasterising, so masks are drawn at the target
resolution instead of being resampled.

Some annotations have the first or last vertebra out of order (Th1 below Th2, L5 drawn at the top of
the image) or a degenerate quadrilateral outside Th8–Th11. Such a level is flagged in the manifest and
kept out of the label map: the band between its trusted neighbours (or the image edge) is marked
unknown (255), so it supervises nothing. The Th8–Th11 mask is unaffected; a problem inside Th8–Th11 is
an error.

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

from spineseg.data.dataset import DatasetError, Sample, Size, as_hw, fresh_output, write_dataset
from spineseg.vertebrae import CODES, IGNORE, LEVELS, REGION

N_LANDMARKS = 68  # four corners of each of the 17 LEVELS, Th1 … L5
_REGION_ROWS = tuple(LEVELS.index(name) for name in REGION)
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
    quads: np.ndarray  # float [17 levels, 4 corners TL TR BR BL, (x, y)] in source pixels
    untrusted: tuple[int, ...]  # rows of `quads` kept out of the label map

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


def _untrusted_levels(filename: str, quads: np.ndarray) -> tuple[int, ...]:
    """Levels whose landmarks cannot be drawn: degenerate corners, or Th1 / L5 out of order.

    A problem inside Th8–Th11, or an order problem between inner levels, corrupts the target: an error.
    """
    if not np.isfinite(quads).all():
        raise DatasetError(f"{filename}: landmarks contain non-finite values")
    untrusted = {k for k, quad in enumerate(quads) if _signed_area(quad) <= 0}
    centres = quads[:, :, 1].mean(axis=1)
    trusted = [k for k in range(len(quads)) if k not in untrusted]
    for upper, lower in zip(trusted, trusted[1:]):
        if centres[lower] > centres[upper]:
            continue
        if upper == 0:
            untrusted.add(0)
        elif lower == len(quads) - 1:
            untrusted.add(lower)
        else:
            raise DatasetError(f"{filename}: {LEVELS[upper]} and {LEVELS[lower]} centres are not ordered top to bottom "
                               f"(rows {centres[upper]:.1f}, {centres[lower]:.1f})")
    inside = [LEVELS[k] for k in sorted(untrusted) if k in _REGION_ROWS]
    if inside:
        area = _signed_area(quads[LEVELS.index(inside[0])])
        raise DatasetError(f"{filename}: {inside[0]} quadrilateral has area {area:.1f} px² with corners in "
                           f"TL, TR, BR, BL order; its corners are out of order or degenerate")
    return tuple(sorted(untrusted))


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
        quads = points.reshape(len(LEVELS), 4, 2)[:, OUTLINE_ORDER]
        untrusted = _untrusted_levels(filename, quads)
        identifier = sample_id(filename)
        if identifier in owner_of_id:
            raise DatasetError(f"{filenames_csv}: {owner_of_id[identifier]!r} and {filename!r} both map to id {identifier!r}")
        owner_of_id[identifier] = filename
        records.append(_Annotated(filename, image_path, width, height, quads, untrusted))
    return records


def _rasterise(quads: np.ndarray, untrusted: tuple[int, ...], size: tuple[int, int]) -> np.ndarray:
    """Level codes of every trusted vertebra; where annotations overlap, the lower vertebra wins.

    An untrusted level leaves the band between its trusted neighbours (or the image edge) unknown.
    """
    labels = np.zeros(size, dtype=np.uint8)
    trusted = [k for k in range(len(quads)) if k not in untrusted]
    for k in trusted:
        # skimage tests integer (row, col) positions, i.e. pixel centres; ours sit at k + 0.5.
        rows, cols = polygon(quads[k, :, 1] - 0.5, quads[k, :, 0] - 0.5, shape=size)
        labels[rows, cols] = CODES[LEVELS[k]]
    for k in untrusted:
        above = [t for t in trusted if t < k]
        below = [t for t in trusted if t > k]
        top = int(np.floor(quads[above[-1], :, 1].max())) + 1 if above else 0
        bottom = int(np.ceil(quads[below[0], :, 1].min())) if below else size[0]
        band = labels[max(top, 0):max(bottom, 0)]
        band[band == 0] = IGNORE
    return labels


def _to_sample(record: _Annotated, split: str, size: tuple[int, int]) -> Sample:
    try:
        with Image.open(record.image_path) as img:
            image = np.asarray(img.convert("L").resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"unreadable image {record.image_path} ({exc})") from None
    scale = np.array([size[1] / record.width, size[0] / record.height])
    labels = _rasterise(record.quads * scale, record.untrusted, size)
    empty = [name for name in REGION if not (labels == CODES[name]).any()]
    if empty:
        raise DatasetError(f"{record.filename}: {', '.join(empty)} cover no pixel at {size[0]}×{size[1]}")
    flags = "; ".join(f"{LEVELS[k]} landmarks out of order or degenerate: kept out of the level labels"
                      for k in record.untrusted)
    return Sample(id=sample_id(record.filename), image=image, mask=np.isin(labels, [CODES[n] for n in REGION]),
                  labels=labels, patient=patient_of(record.filename), source=f"data/{split}/{record.filename}",
                  flags=flags)


def convert(src: str | Path, out: str | Path, splits: Sequence[str] = ("training", "test"), size: Size = 512,
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
    size = as_hw(size)
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
            samples = (_to_sample(record, split, size) for record in progress)
            write_dataset(staging, names[split], samples, test_only=TEST_ONLY[split], seed=seed)
    return {split: Path(out) / names[split] for split in records}
