"""Using an ensemble on new radiographs: ``spineseg predict`` and `predict_radiographs`.

The ensemble is a study's (its selected stage-3 models, found from its records: no data are read or
made) or a bundle's (`spineseg.study.bundle`); either way each member loads from its self-describing
model folder, once. Each image is read (PNG, JPEG or DICOM), resized as the study resized its images
(`spineseg.data.dataset.model_input`: to the stored grid, then to each member's input size), every
member predicts, the probabilities are resampled to the image's size (as read) and combined by the chosen
rule (with ``--two-stage``, the crop model then outlines the region in a box around that mask). A huge
radiograph is read at a reduced size, still at least four times what the models see
(`spineseg.data.radiographs.load_radiograph`), and segmented there: only its mask (and probability map)
is brought to the file's size, so memory stays bounded. For each
image the output folder gets a mask (0/255 PNG at the image's size), an overlay, optionally the
probability map, and a row of ``predictions.csv``, which is rewritten after every batch. Reading the next
batch and writing the last one overlap the forward passes. Every file is written atomically; a rerun
skips images whose outputs exist; a file that cannot be read is reported once and skipped; an empty mask
is reported per image and counted in the summary.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion
from tqdm.auto import tqdm

from spineseg import atomic
from spineseg.crops import CropModel
from spineseg.data.dataset import model_input
from spineseg.data.radiographs import Radiograph, find_radiographs, load_radiograph
from spineseg.device import pick_device
from spineseg.ensemble import combine, disagreement
from spineseg.errors import ConfigError, SpinesegError, StageOrderError
from spineseg.names import EXTRA_RULES, PRECISIONS, RULES, is_device
from spineseg.predict import predict, resample
from spineseg.saved_models import load_model
from spineseg.study.artifacts import read_table
from spineseg.study.bundle import EnsembleFolders, study_ensemble
from spineseg.study.session import Study

MASKS, OVERLAYS, PROBABILITIES, TABLE = "masks", "overlays", "probabilities", "predictions.csv"
ARTICLE_THRESHOLD = 0.5  # T of the article's ensembles, where no study or bundle says otherwise
TWO_STAGE_SUFFIX = "+crop"  # a rule's name in predictions.csv when the crop model outlined its mask
COLUMNS = ["id", "source", "height", "width", "rule", "threshold", "tta", "area_px", "top", "left", "bottom", "right",
           "disagreement"]
OVERLAY_COLOUR = np.array([255, 64, 32])
OUTLINE_COLOUR = (255, 230, 0)


@dataclass
class PredictionReport:
    """What a `predict_radiographs` call did."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # source file → reason
    empty: list[str] = field(default_factory=list)  # written with an all-empty mask

    def summary(self) -> str:
        empty = f" ({len(self.empty)} with an empty mask: {', '.join(self.empty)})" if self.empty else ""
        return f"{len(self.written)} written{empty}, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"


@dataclass(frozen=True)
class InferenceOptions:
    """How an ensemble runs, as one value from the command line (or a notebook) to every forward pass."""

    device: str = "auto"
    precision: str = "auto"
    tta: bool = False  # also predict each mirror image, and average
    batch_size: int = 4
    threshold: float | None = None  # None: the T the study's stage 4 used (or the bundle's)
    any_modality: bool = False  # read DICOMs that are not projection radiographs too

    def __post_init__(self) -> None:
        if not is_device(self.device):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:<index>")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold {self.threshold}: a probability threshold lies in [0, 1]")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")


@dataclass(frozen=True)
class Member:
    """One model of the ensemble, with the input size it was trained at."""

    name: str
    model: object
    image_size: tuple[int, int]
    weight: float = 1.0  # its best validation DSC, for weighted voting


@dataclass(frozen=True)
class Ensemble:
    """What `predict_files` applies: the members, the crop model if asked for, and how radiographs reach them."""

    members: list[Member]
    grid: tuple[int, int] | None = None  # the stored size of the study's images: a radiograph is resized there first
    crop: CropModel | None = None  # its boxes are cut from the radiograph at `grid`, as in training

    def inputs(self, image: np.ndarray) -> np.ndarray:
        """A radiograph as the study stored its images (at the grid), from which each member's input is resized."""
        return image.astype(np.float32, copy=False) if self.grid is None else model_input(image, self.grid)


def load_ensemble(found: EnsembleFolders, device, two_stage: bool = False) -> Ensemble:
    """The models of a study or a bundle, each from its model folder; the crop model only when asked for (and found)."""
    loaded = [(load_model(folder, device), weight) for folder, weight in found.members]
    grids = {description.grid for (description, _), _ in loaded}
    if len(grids) != 1:
        raise ConfigError(f"the members of {found.origin} were trained on images stored at different sizes {sorted(map(str, grids))}")
    members = [Member(description.name, model, description.input_size, weight) for (description, model), weight in loaded]
    grid, crop = grids.pop(), None
    if two_stage:
        description, model = load_model(found.crop, device)
        if description.crop is None or description.grid is None:
            raise ConfigError(f"--two-stage: {found.crop} is not a crop model with the grid its crops were cut from")
        if description.grid != grid:  # its boxes would be cut at a size it never saw
            members_grid = grid or "sizes their model.json files do not record (rerun stage 3 to describe them)"
            raise ConfigError(f"--two-stage: the crop model of {found.origin} was trained on images stored at "
                              f"{description.grid}, its members at {members_grid}; they do not belong together")
        crop = CropModel(model, description.crop)
    return Ensemble(members, grid, crop)


def predict_radiographs(study: Study, source: str | Path, out: str | Path, options: InferenceOptions | None = None,
                        rule: str | None = None, probabilities: bool = False, two_stage: bool = False,
                        log=print) -> PredictionReport:
    """Segment Th8–Th11 on every radiograph at `source` (a file or a folder) with the study's ensemble.

    `options` default to the profile's device, precision and stage-4 threshold."""
    found = study_ensemble(study)
    options = options or InferenceOptions(study.cfg.device, found.precision)
    return predict_with(found, source, out, options, rule, probabilities, two_stage, log)


def predict_with(found: EnsembleFolders, source: str | Path, out: str | Path, options: InferenceOptions,
                 rule: str | None = None, probabilities: bool = False, two_stage: bool = False,
                 log=print) -> PredictionReport:
    """`predict_files` with a study's or a bundle's models. With `two_stage`, the rule's mask (by default the
    rule stage 4 chose as the locator on validation) is where the crop model outlines the region; otherwise
    the rule defaults to soft voting."""
    if two_stage and found.crop is None:
        raise ConfigError(f"--two-stage: {found.origin} has no trained crop model (two_stage.enabled is false, "
                          f"stage 3 has not trained it, or, in a bundle, the two-stage variant did not win on validation)")
    if two_stage and rule is None and found.locator is None:
        raise StageOrderError(f"--two-stage without --rule: {found.origin} has no locating rule chosen by stage 4; "
                              f"run stage 4 first, or give --rule")
    rule = check_rule(rule or (found.locator if two_stage else "soft"))  # before the models load
    if options.threshold is None:
        options = replace(options, threshold=found.threshold)
    device = pick_device(options.device)
    return predict_files(load_ensemble(found, device, two_stage), source, out, options, rule, probabilities, log)


def image_id(path: Path, root: Path) -> str:
    """A file-name-safe id from the path below the input folder (sub/dir/x.png → sub__dir__x)."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(relative.with_suffix("").parts)).strip("_.")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask at another size, each pixel the mask's pixel nearest its centre (no float copy at either size)."""
    if mask.shape == tuple(shape):
        return mask
    rows, cols = (((np.arange(n) + 0.5) * old / n).astype(int) for n, old in zip(shape, mask.shape))
    return mask[np.ix_(rows, cols)]


def overlay(image: np.ndarray, mask: np.ndarray, made_by: str) -> np.ndarray:
    """The radiograph with the predicted mask tinted and outlined, and what made it (rule and T) written on it:
    read on its own, without the truth, an overlay still shows where the mask ends and how it was made.

    An image smaller than its mask (a huge radiograph read at a reduced size, see
    `spineseg.data.radiographs.WORKING_PIXELS`) gets its overlay at its own size, the mask sampled there."""
    mask = nearest(mask, image.shape)
    rgb = np.repeat((255 * image).astype(np.uint8)[..., None], 3, axis=2)
    rgb[mask] = (0.65 * rgb[mask] + 0.35 * OVERLAY_COLOUR).astype(np.uint8)
    thickness = max(1, min(mask.shape) // 256)  # about one pixel in 256, so it shows on large radiographs too
    rgb[mask & ~binary_erosion(mask, iterations=thickness, border_value=0)] = OUTLINE_COLOUR
    drawn = Image.fromarray(rgb)
    size = max(10, min(mask.shape) // 24)
    ImageDraw.Draw(drawn).text((size // 2, size // 2), made_by, fill=OUTLINE_COLOUR,
                               font=ImageFont.load_default(size), stroke_width=max(1, size // 10), stroke_fill=(0, 0, 0))
    return np.asarray(drawn)


def _keys(files: list[Path], source: Path) -> dict[str, Path]:
    """Each file's output id; two files that would write the same outputs are refused."""
    keys: dict[str, Path] = {}
    for path in files:
        key = image_id(path, source)
        if key in keys:
            raise ConfigError(f"{keys[key]} and {path} would both be written as `{key}`: rename one of them")
        keys[key] = path
    return keys


def _same_settings(row: dict, rule: str, threshold: float, tta: bool) -> bool:
    """Whether an image in predictions.csv was segmented as this call would (a rerun with another rule redoes it)."""
    return row["rule"] == rule and np.isclose(float(row["threshold"]), threshold) and str(row.get("tta")) == str(tta)


def _inputs_below(source: Path, out: Path) -> list[Path]:
    """The radiographs at `source`, less anything under `out` (a rerun must not read its own outputs back)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for the masks, overlays and predictions.csv")
    outputs = out.resolve()
    return [path for path in find_radiographs(source) if not path.resolve().is_relative_to(outputs)]


def predict_files(ensemble: Ensemble, source: str | Path, out: str | Path, options: InferenceOptions,
                  rule: str = "soft", probabilities: bool = False, log=print) -> PredictionReport:
    """The pipeline behind `predict_radiographs`, for any ensemble (the benchmark times it with untrained members);
    an ensemble that comes without a T is thresholded at the article's 0.5."""
    check_rule(rule)
    if options.threshold is None:
        options = replace(options, threshold=ARTICLE_THRESHOLD)
    device = pick_device(options.device)
    label = f"{rule}{TWO_STAGE_SUFFIX}" if ensemble.crop else rule  # how predictions.csv names what made each mask
    weights = np.array([member.weight for member in ensemble.members]) if rule == "weighted" else None
    source, out = Path(source), Path(out)
    files = _keys(_inputs_below(source, out), source)
    rows = {row["id"]: row for row in read_table(out / TABLE).to_dict(orient="records")} if (out / TABLE).is_file() else {}
    report = PredictionReport()
    todo = []
    for key, path in files.items():
        finished = (key in rows and _same_settings(rows[key], label, options.threshold, options.tta)
                    and all((out / folder / f"{key}.png").is_file() for folder in _folders(probabilities)))
        (report.skipped.append(key) if finished else todo.append((key, path)))
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=len(todo), desc="predicting", unit="image") as bar:
        batches = [todo[i:i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
        read = partial(_read_batch, ensemble, options.any_modality)
        reading: Future | None = pool.submit(read, batches[0]) if batches else None
        writing: list[Future] = []
        for index in range(len(batches)):
            images, failures = reading.result()
            reading = pool.submit(read, batches[index + 1]) if index + 1 < len(batches) else None
            for path, reason in failures.items():
                report.failed[path] = reason
                log(f"skipped {path}: {reason}")
                bar.update(1)
            per_member = [_member_probabilities(member, images, device, options) for member in ensemble.members]
            for k, (key, path, image, at_grid) in enumerate(images):
                probs = np.stack([member_probs[k] for member_probs in per_member])  # at the size read
                mask, probability = combine(probs, rule, options.threshold, weights=weights), probs.mean(axis=0)
                if ensemble.crop is not None:
                    probability = ensemble.crop.outline(at_grid[None], mask[None], device)[0]
                    mask = probability > options.threshold
                if image.reduced:  # only the result at the file's size: nearest for the mask, bilinear for the map
                    mask = nearest(mask, image.shape)
                    probability = resample(probability[None], image.shape)[0] if probabilities else probability
                if not mask.any():
                    report.empty.append(key)
                    log(f"warning: {key}: empty mask (nothing reached T = {options.threshold:g}); see its overlay")
                rows[key] = _row(key, path, image, mask, label, options.threshold, options.tta,
                                 float(disagreement(probs, options.threshold)[1]))
                writing.append(pool.submit(_write, out, key, image, mask, f"{label}, T = {options.threshold:g}",
                                           probability if probabilities else None))
                report.written.append(key)
                bar.update(1)
            _write_table(out, rows)  # after each batch, so that a rerun after Ctrl-C resumes where this one stopped
        for job in writing:
            job.result()
    _write_table(out, rows)
    log(f"{report.summary()} → {out}")
    return report


def _write_table(out: Path, rows: dict[str, dict]) -> None:
    atomic.write_csv(out / TABLE, pd.DataFrame(list(rows.values()), columns=COLUMNS).sort_values("id"))


def _folders(probabilities: bool) -> tuple[str, ...]:
    return (MASKS, OVERLAYS, PROBABILITIES) if probabilities else (MASKS, OVERLAYS)


def _member_probabilities(member: Member, images: list[tuple], device, options: InferenceOptions) -> list[np.ndarray]:
    """One member's Th8–Th11 probabilities for a batch of images of any sizes, each back at the size it was read."""
    if not images:
        return []
    small = np.stack([model_input(at_grid, member.image_size) for _, _, _, at_grid in images])
    region = predict(member.model, small, device, batch_size=len(images), hflip=options.tta, precision=options.precision).region
    return [np.clip(resample(r[None], image.pixels.shape), 0.0, 1.0)[0] for r, (_, _, image, _) in zip(region, images)]


def _read_batch(ensemble: Ensemble, any_modality: bool, batch: Iterable[tuple[str, Path]]) -> tuple[list[tuple], dict[str, str]]:
    """(id, path, radiograph, image at the grid) of each readable file; the reason for each other one. A radiograph
    far larger than any size the ensemble resizes it to is read at a reduced size (`load_radiograph`); its `shape`,
    the mask's size, stays the file's."""
    sizes = [member.image_size for member in ensemble.members] + ([ensemble.grid] if ensemble.grid else [])
    needed = (max(h for h, _ in sizes), max(w for _, w in sizes)) if sizes else None
    images, failures = [], {}
    for key, path in batch:
        try:
            radiograph = load_radiograph(path, any_modality, needed)
            images.append((key, path, radiograph, ensemble.inputs(radiograph.pixels)))
        except (SpinesegError, Image.DecompressionBombError, MemoryError) as exc:
            failures[str(path)] = _reason(path, exc)
    return images, failures


def _reason(path: Path, exc: Exception) -> str:
    """What went wrong with a file, without its path: the line that reports it names the path once."""
    text = str(exc).replace(f"'{path}'", "").replace(str(path), "")
    text = re.sub(r"\(\s*\)", "", re.sub(r"\s+\)", ")", re.sub(r"\s+", " ", text))).strip(" :")
    return text if isinstance(exc, SpinesegError) else f"{type(exc).__name__}: {text or 'too large to decode'}"


def _row(key: str, path: Path, image: Radiograph, mask: np.ndarray, rule: str, threshold: float, tta: bool,
         spread: float) -> dict:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))  # not every pixel's index
    box = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) if rows.size else (np.nan,) * 4
    return {"id": key, "source": str(path), "height": image.shape[0], "width": image.shape[1], "rule": rule,
            "threshold": threshold, "tta": tta, "area_px": int(mask.sum()), **dict(zip(("top", "left", "bottom", "right"), box)),
            "disagreement": round(spread, 6)}


def _write(out: Path, key: str, image: Radiograph, mask: np.ndarray, made_by: str, probability: np.ndarray | None) -> None:
    atomic.write_bytes(out / MASKS / f"{key}.png", _png(np.where(mask, np.uint8(255), np.uint8(0))))  # 1 byte a pixel
    atomic.write_bytes(out / OVERLAYS / f"{key}.png", _png(overlay(image.pixels, mask, made_by)))
    if probability is not None:  # 16-bit, 65535 = 1: the members' mean (the crop model's with --two-stage)
        scaled = probability * 65535
        atomic.write_bytes(out / PROBABILITIES / f"{key}.png", _png(np.rint(scaled, out=scaled).astype(np.uint16)))


def check_rule(rule: str) -> str:
    """The rules `predict` can apply: the article's and the extra ones (weighted voting weighs members by validation
    DSC); not the stage-4 results that learned on validation (tuned T, stacking, calibration)."""
    usable = [*RULES, *EXTRA_RULES]
    if rule not in usable:
        raise ConfigError(f"--rule {rule!r}: use one of {', '.join(usable)}")
    return rule
