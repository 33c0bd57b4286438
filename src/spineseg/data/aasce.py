"""Converter for the public AASCE/BoostNet radiographs (Wu et al., MICCAI 2017) into the project format.

The source gives 68 landmarks per image, the four corners of T1…L5. Every vertebra's quadrilateral is
drawn into the label map with its level code (`spineseg.vertebrae`: Th1 = 1 … L5 = 17), and the mask is
the article's target, Th8–Th11. Images are resized to the target size (tall, e.g. 512 × 192, keeps
these tall radiographs close to their aspect; a square stretches them as the article's square inputs
do), and the landmarks are scaled with them before rasterising, so masks are drawn at the target
resolution instead of being resampled.

Annotation errors never cost the dataset. A level whose landmarks are not finite, lie far outside the image
(beyond `OUTSIDE_TOLERANCE` of its side), whose quadrilateral is degenerate, or that falls out of the
top-to-bottom order (Th1 below Th2, L5 drawn at the top of the image, two neighbours swapped) is flagged in
the manifest and kept out of the label map when it lies outside Th8–Th11: the band between its trusted
neighbours (or the image edge) is marked unknown (255), so it supervises nothing. Such a problem inside
Th8–Th11 would corrupt the target itself: that image is dropped, and ``dropped.csv`` beside the manifest
gives the reason — as it does for an image or landmark file that is missing, unreadable, or disagrees with
its row of ``landmarks.csv``. Only a broken index of a split (filenames.csv, landmarks.csv) stops the
conversion. The conversion ends with a summary (converted, flagged, dropped, radiographs filed twice),
printed and written to ``conversion_summary.txt``.

Landmark coordinates are taken as points in continuous image coordinates, the image spanning [0, W] ×
[0, H] (the distributors' own convention: ``landmarks.csv`` = ``p2`` / (W, H)); a target pixel belongs to
a vertebra when its centre lies inside the quadrilateral.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import scipy.io
from PIL import Image, UnidentifiedImageError
from scipy.io.matlab import MatReadError
from skimage.draw import polygon
from tqdm.auto import tqdm

from spineseg import atomic
from spineseg.data.dataset import (
    CONVERSION_SUMMARY,
    TWINS,
    DatasetError,
    Sample,
    Size,
    as_hw,
    check_seed,
    fresh_output,
    hold_out_latest,
    read_manifest,
    refuse_overlap,
    twins_between,
    write_dataset,
)
from spineseg.vertebrae import CODES, IGNORE, LEVELS, REGION

N_LANDMARKS = 68  # four corners of each of the 17 LEVELS, Th1 … L5
_REGION_ROWS = tuple(LEVELS.index(name) for name in REGION)
# Source order is TL, TR, BL, BR; walking the outline needs TL, TR, BR, BL.
OUTLINE_ORDER = (0, 1, 3, 2)
# landmarks.csv is p2 / (W, H) rounded to 5 significant digits (≤ 0.04 px off in the real data), so
# 2 px only trips on a genuine mismatch, such as rows of the two files belonging to different images.
CSV_TOLERANCE_PX = 2.0
# A corner this share of the image's side beyond its edge is an annotation error (the real data overhang by ≤ 2.5 %).
OUTSIDE_TOLERANCE = 0.1
TEST_ONLY = MappingProxyType({"training": False, "test": True})
DROPPED = "dropped.csv"  # beside a dataset's manifest: the images left out, and why
SUMMARY = CONVERSION_SUMMARY  # in the output folder
LATER = "later"  # the name (in `names`) of the training split's latest acquisitions, held out as a test set
DEFAULT_NAMES = MappingProxyType({"training": "aasce_train", "test": "aasce_test", LATER: "aasce_later"})

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


_ACQUIRED = re.compile(r"-(?P<day>\d{1,2})-(?P<month>[a-z]{3})-(?P<year>\d{4})-(?P<rest>.*)$", re.IGNORECASE)


def acquisition_order(filename: str) -> tuple[str, int]:
    """When a radiograph was taken, as far as its name tells: (ISO date, case number), sortable.

    ``sunhl-1th-02-Jan-2017-162 A AP.jpg`` → ("2017-01-02", 162); a case without a number sorts first
    on its day; a name without a date sorts before every dated one.
    """
    match = _ACQUIRED.search(Path(filename).stem)
    if not match:
        return ("", -1)
    try:
        day = datetime.strptime(f"{match['day']}-{match['month']}-{match['year']}", "%d-%b-%Y").date().isoformat()
    except ValueError:
        return ("", -1)
    case = re.match(r"\d+", match["rest"])
    return (day, int(case.group()) if case else -1)


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
    untrusted: Mapping[int, str]  # rows of `quads` kept out of the label map → what is wrong with them


@dataclass(frozen=True)
class _SplitAnnotations:
    """What a split's check found: the images to convert, and those dropped with their reason."""

    records: list[_Annotated]
    dropped: list[tuple[str, str]]  # (source file name, reason)

def _read_filenames(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip()]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from None


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
    except (ValueError, OSError, TypeError, NotImplementedError, MatReadError) as exc:
        raise DatasetError(f"unreadable landmark file {path} ({exc})") from None
    if points.shape != (N_LANDMARKS, 2) or not np.issubdtype(points.dtype, np.number):
        raise DatasetError(f"{path}: 'p2' is {points.dtype} of shape {points.shape}, expected ({N_LANDMARKS}, 2) numbers")
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


def _levels_in_every_chain(centres: np.ndarray, candidates: list[int]) -> set[int]:
    """The candidate levels that lie on every longest chain of centres running top to bottom.

    A level off some longest chain could be the one out of order: L5 drawn at the top leaves one
    longest chain, Th1…L4, and only L5 is blamed; L4 and L5 swapped leave two, and both are blamed.
    """
    n = len(candidates)
    rows = centres[candidates]
    ending, starting = [1] * n, [1] * n  # the longest chain ending / starting at each candidate
    for i in range(n):
        ending[i] = max([ending[j] + 1 for j in range(i) if rows[j] < rows[i]], default=1)
    for i in reversed(range(n)):
        starting[i] = max([starting[j] + 1 for j in range(i + 1, n) if rows[i] < rows[j]], default=1)
    longest = max(ending, default=0)
    on_some = [i for i in range(n) if ending[i] + starting[i] - 1 == longest]
    position_taken = Counter(ending[i] for i in on_some)  # a chain has one candidate at each position
    return {candidates[i] for i in on_some if position_taken[ending[i]] == 1}


def _untrusted_levels(quads: np.ndarray, width: int, height: int) -> dict[int, str]:
    """Levels whose landmarks cannot be drawn, and why: not finite, far outside the image, degenerate, or out of order."""
    untrusted = {}
    reach = OUTSIDE_TOLERANCE * np.array([width, height])
    for k, quad in enumerate(quads):
        if not np.isfinite(quad).all():
            untrusted[k] = "not finite"
        elif (quad < -reach).any() or (quad > np.array([width, height]) + reach).any():
            untrusted[k] = f"outside the {width}×{height} image"
        elif (area := _signed_area(quad)) <= 0:
            untrusted[k] = f"degenerate or corners out of order (area {area:.1f} px² walking TL, TR, BR, BL)"
    drawable = [k for k in range(len(quads)) if k not in untrusted]
    in_order = _levels_in_every_chain(quads[:, :, 1].mean(axis=1), drawable)
    untrusted |= {k: "out of top-to-bottom order" for k in drawable if k not in in_order}
    return dict(sorted(untrusted.items()))


def _region_problems(untrusted: Mapping[int, str]) -> str:
    """Why the Th8–Th11 target of an image cannot be trusted ('' when it can)."""
    return "; ".join(f"{LEVELS[k]} landmarks {reason}" for k, reason in untrusted.items() if k in _REGION_ROWS)


def _read_split(src: Path, split: str, limit: int | None, size: tuple[int, int]) -> _SplitAnnotations:
    """Read and check every annotation of a split before anything is written.

    The split's index (filenames.csv, landmarks.csv) must be whole: a broken index stops the conversion.
    One bad record never costs the dataset: an image that is missing or unreadable, whose landmark file
    is missing, unreadable or disagrees with its landmarks.csv row, whose id another image already has,
    or whose Th8–Th11 cannot be drawn, is dropped with its reason.
    """
    image_dir, label_dir = src / "data" / split, src / "labels" / split
    filenames_csv, landmarks_csv = label_dir / "filenames.csv", label_dir / "landmarks.csv"
    filenames, landmarks = _read_filenames(filenames_csv), _read_landmarks(landmarks_csv)
    if len(filenames) != len(landmarks):
        raise DatasetError(f"{filenames_csv} lists {len(filenames)} images but {landmarks_csv} has {len(landmarks)} rows")
    if limit is not None:
        filenames, landmarks = filenames[:limit], landmarks[:limit]
    records, dropped, owner_of_id = [], [], {}
    for row, (filename, normalised) in enumerate(zip(filenames, landmarks)):
        try:
            record = _read_record(filename, image_dir, label_dir, normalised, f"{landmarks_csv.name} row {row + 1}")
            identifier = sample_id(filename)
            if identifier in owner_of_id:
                raise DatasetError(f"{owner_of_id[identifier]!r} already has its id {identifier!r}")
            problem = _region_problems(record.untrusted) or _empty_region(record, size)
        except DatasetError as exc:
            problem = str(exc)
        if problem:
            dropped.append((filename, problem))
        else:
            owner_of_id[identifier] = filename
            records.append(record)
    return _SplitAnnotations(records, dropped)


def _read_record(filename: str, image_dir: Path, label_dir: Path, normalised: np.ndarray, csv_row: str) -> _Annotated:
    """One image's size and landmarks, checked against its landmarks.csv row; a `DatasetError` names what is wrong."""
    image_path, mat_path = image_dir / filename, label_dir / f"{filename}.mat"
    width, height = _image_size(image_path)
    points = _read_p2(mat_path)
    from_csv = np.column_stack([normalised[:N_LANDMARKS] * width, normalised[N_LANDMARKS:] * height])
    gaps = np.abs(from_csv - points)[np.isfinite(from_csv) & np.isfinite(points)]  # missing points are flagged later
    disagreement = float(gaps.max(initial=0.0))
    if disagreement > CSV_TOLERANCE_PX:
        raise DatasetError(f"{csv_row} and {mat_path.name} disagree by up to {disagreement:.1f} px "
                           f"(tolerance {CSV_TOLERANCE_PX:g} px)")
    quads = points.reshape(len(LEVELS), 4, 2)[:, OUTLINE_ORDER]
    return _Annotated(filename, image_path, width, height, quads, _untrusted_levels(quads, width, height))


def _empty_region(record: _Annotated, size: tuple[int, int]) -> str:
    """Which Th8–Th11 levels cover no pixel at the target size ('' when all do)."""
    labels = _labels_at(record, size)
    empty = [name for name in REGION if not (labels == CODES[name]).any()]
    return f"{', '.join(empty)} cover no pixel at {size[0]}×{size[1]}" if empty else ""


def _labels_at(record: _Annotated, size: tuple[int, int]) -> np.ndarray:
    scale = np.array([size[1] / record.width, size[0] / record.height])
    return _rasterise(record.quads * scale, tuple(record.untrusted), size)


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
    labels = _labels_at(record, size)
    flags = "; ".join(f"{LEVELS[k]} landmarks {reason}: kept out of the level labels"
                      for k, reason in record.untrusted.items())
    return Sample(id=sample_id(record.filename), image=image, mask=np.isin(labels, [CODES[n] for n in REGION]),
                  labels=labels, patient=patient_of(record.filename), source=f"data/{split}/{record.filename}",
                  flags=flags)


def convert(src: str | Path, out: str | Path, splits: Sequence[str] = ("training", "test"), size: Size = 512,
            seed: int = 0, names: Mapping[str, str] = DEFAULT_NAMES, limit: int | None = None,
            force: bool = False, later_batch: float = 0.0) -> dict[str, Path]:
    """Convert the AASCE splits found under ``src`` (the ``boostnet_labeldata`` folder) into ``out``.

    ``training`` gets a seeded patient-level train/val/test split, with radiographs filed twice under
    different case numbers joined into one patient first; ``test`` becomes a test-only dataset. With
    ``later_batch`` > 0, that share of the training images, the latest acquisitions by the dates in their
    names (patient groups whole), becomes a test-only dataset of its own (``names["later"]``) before the
    rest is split (`spineseg.data.dataset.hold_out_latest`).
    Every annotation and every source image of every split is read and checked before the first file is
    written, and the datasets are written beside ``out`` and moved into place when complete; a
    non-empty ``out`` is refused unless ``force``, and an ``out`` that is, holds or lies in ``src``
    always. ``limit`` keeps the first images of each split, for quick checks. Prints the summary it writes
    to ``out/conversion_summary.txt``. Returns the dataset folder of each converted split.
    """
    src = Path(src)
    refuse_overlap(out, src)
    unknown = [s for s in splits if s not in TEST_ONLY]
    if unknown:
        raise DatasetError(f"unknown AASCE split(s) {unknown}; the distribution has {list(TEST_ONLY)}")
    unnamed = [s for s in (*splits, *([LATER] if later_batch else [])) if s not in names]
    if unnamed:
        raise DatasetError(f"no dataset name given for split(s) {unnamed}")
    size, seed = as_hw(size), check_seed(seed)
    if not 0 <= later_batch < 1:
        raise DatasetError(f"the later batch is a share of the training images in [0, 1), got {later_batch}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of images, got {limit}")
    found = [s for s in splits if (src / "data" / s).is_dir()]
    if not found:
        raise DatasetError(f"no AASCE split {list(splits)} under {src}: expected {src / 'data' / '<split>'}; "
                           f"src must be the boostnet_labeldata folder")
    annotations = {split: _read_split(src, split, limit, size) for split in found}
    empty = [split for split, read in annotations.items() if not read.records]
    if empty:
        raise DatasetError(f"every image of AASCE split(s) {empty} was dropped; first reason: "
                           f"{annotations[empty[0]].dropped[0][1]}")
    with fresh_output(out, force) as staging:
        for split, read in annotations.items():
            progress = tqdm(read.records, desc=f"AASCE {split}", unit="image")
            samples = (_to_sample(record, split, size) for record in progress)
            folder = write_dataset(staging, names[split], samples, test_only=TEST_ONLY[split], seed=seed, join_twins=True)
            atomic.write_csv(folder / DROPPED, pd.DataFrame(read.dropped, columns=["source", "reason"]))
        converted = {split: names[split] for split in annotations}
        if later_batch and "training" in annotations:
            acquired = {sample_id(r.filename): acquisition_order(r.filename) for r in annotations["training"].records}
            hold_out_latest(staging / names["training"], staging / names[LATER], later_batch, acquired, seed)
            converted[LATER] = names[LATER]
        summary = _summary(staging, annotations, converted)
        atomic.write_text(staging / SUMMARY, summary)
    print(summary, end="")
    return {split: Path(out) / name for split, name in converted.items()}


def _summary(root: Path, annotations: Mapping[str, _SplitAnnotations], names: Mapping[str, str]) -> str:
    """Converted, flagged and dropped images per split, patients joined as twins, the later batch, and twins
    across the datasets written (`names`: split → dataset name, the later batch included)."""
    lines = []
    for split, read in annotations.items():
        manifest = read_manifest(root / names[split])
        if LATER in names and split == "training":
            manifest = pd.concat([manifest, read_manifest(root / names[LATER])], ignore_index=True)
        flagged = sum(bool(record.untrusted) for record in read.records)
        joined = manifest["patient"].str.contains("+", regex=False)
        lines.append(f"AASCE {split} -> {names[split]}: {len(read.records)} converted ({flagged} with a level flagged "
                     f"and kept out of the labels), {len(read.dropped)} dropped (see {names[split]}/{DROPPED}); "
                     f"{manifest['patient'].nunique()} patient groups, {int(joined.sum())} images in "
                     f"{manifest.loc[joined, 'patient'].nunique()} groups of cases joined as one radiograph filed twice")
    if LATER in names:
        later = read_manifest(root / names[LATER])
        days = sorted(acquisition_order(Path(source).name)[0] for source in later["source"])
        lines.append(f"later batch -> {names[LATER]}: the latest {len(later)} training images ({later['patient'].nunique()} "
                     f"patient groups, acquired {days[0]} to {days[-1]}) held out as a test set; {names['training']} "
                     f"keeps {len(read_manifest(root / names['training']))}")
        report = root / names[split] / TWINS
        if report.is_file():
            lines.extend(_twin_lines(names[split], json.loads(report.read_text())))
    written = list(dict.fromkeys(names.values()))
    for first, second in zip(written, written[1:]):
        search = twins_between(root / first, root / second)
        pairs = ", ".join(twin.evidence(f"{twin.first} = {twin.second}") for twin in search.twins)
        lines.append(f"{first} and {second} share {len(search.twins)} radiograph(s){': ' + pairs if search.twins else ''} "
                     f"({search.describe()})")
    return "".join(f"{line}\n" for line in lines)


def _twin_lines(name: str, report: dict) -> list[str]:
    """The twin search of a dataset: its rule, every join with both scores, and the candidates it refused."""
    def shown(pair: dict) -> str:
        distance = "" if pair["distance"] is None else f", d = {pair['distance']:.4f}"
        return f"{pair['first']} = {pair['second']} (r = {pair['r']:.3f}{distance})"

    joined = [shown(pair) for pair in report["pairs"] if pair["joined"]]
    refused = [shown(pair) for pair in report["pairs"] if not pair["joined"]]
    return [f"{name} twins: {report['rule']}",
            f"{name} twins joined ({len(joined)}): " + ("; ".join(joined) or "none"),
            f"{name} candidates refused by the geometry ({len(refused)}): " + ("; ".join(refused) or "none")]
