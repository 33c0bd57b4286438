"""Using a study's ensemble on new radiographs: ``spineseg predict`` and `predict_radiographs`.

The stage-3 models the study selected are loaded once (nothing is retrained). Each image is read
(PNG, JPEG or DICOM), every member predicts at its own input size, the probabilities are resampled to
the image's own size and combined by the chosen rule (with ``--two-stage``, the study's crop model then
outlines the region in a box around that mask). For each image the output folder gets a mask
(0/255 PNG at the image's size), an overlay, optionally the probability map, and a row of
``predictions.csv``. Reading the next batch and writing the last one overlap the forward passes.
Every file is written atomically; a rerun skips images whose outputs exist; an unreadable file is
reported and skipped.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion
from tqdm.auto import tqdm

from spineseg import atomic
from spineseg.crops import CropGeometry, refine
from spineseg.data.dataset import stored_size
from spineseg.data.radiographs import find_radiographs, read_radiograph
from spineseg.device import pick_device
from spineseg.ensemble import combine, disagreement
from spineseg.errors import ConfigError, SpinesegError, StageOrderError
from spineseg.names import EXTRA_RULES, RULES
from spineseg.predict import predict, resample
from spineseg.study.session import Study
from spineseg.study.stage0_data import prepare_data
from spineseg.study.stage3_final import ensemble_members, trained_crop_model
from spineseg.study.stage4_ensembles import members_validation_dsc
from spineseg.study.store import load_trained

MASKS, OVERLAYS, PROBABILITIES, TABLE = "masks", "overlays", "probabilities", "predictions.csv"
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

    def summary(self) -> str:
        return f"{len(self.written)} written, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"


def image_id(path: Path, root: Path) -> str:
    """A file-name-safe id from the path below the input folder (sub/dir/x.png → sub__dir__x)."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(relative.with_suffix("").parts)).strip("_.")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay(image: np.ndarray, mask: np.ndarray, made_by: str) -> np.ndarray:
    """The radiograph with the predicted mask tinted and outlined, and what made it (rule and T) written on it:
    read on its own, without the truth, an overlay still shows where the mask ends and how it was made."""
    rgb = np.repeat((255 * image).astype(np.uint8)[..., None], 3, axis=2)
    rgb[mask] = (0.65 * rgb[mask] + 0.35 * OVERLAY_COLOUR).astype(np.uint8)
    thickness = max(1, min(mask.shape) // 256)  # about one pixel in 256, so it shows on large radiographs too
    rgb[mask & ~binary_erosion(mask, iterations=thickness, border_value=0)] = OUTLINE_COLOUR
    drawn = Image.fromarray(rgb)
    size = max(10, min(mask.shape) // 24)
    ImageDraw.Draw(drawn).text((size // 2, size // 2), made_by, fill=OUTLINE_COLOUR,
                               font=ImageFont.load_default(size), stroke_width=max(1, size // 10), stroke_fill=(0, 0, 0))
    return np.asarray(drawn)


def predict_radiographs(study: Study, source: str | Path, out: str | Path, rule: str | None = None,
                        threshold: float | None = None, tta: bool = False, probabilities: bool = False,
                        batch_size: int = 4, two_stage: bool = False, log=print) -> PredictionReport:
    """Segment Th8–Th11 on every radiograph at `source` (a file or a folder) with the study's ensemble.

    With `two_stage`, the rule's mask (by default the rule stage 4 chose as the locator on validation)
    is where the study's crop model outlines the region; otherwise the rule defaults to soft voting.
    """
    threshold = study.cfg.stage4.threshold if threshold is None else float(threshold)
    rule = rule or (_learned_locator(study) if two_stage else "soft")
    check_arguments(rule, threshold, batch_size)  # before the models load
    device = pick_device(study.cfg.device)
    crop = _crop_model(study, device) if two_stage else None
    return predict_files(_members(study), source, out, device, rule, threshold, tta, probabilities, batch_size,
                         study.cfg.precision, log, crop)


def check_arguments(rule: str, threshold: float, batch_size: int) -> None:
    check_rule(rule)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold}: a probability threshold lies in [0, 1]")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")


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


def predict_files(members: list[Member], source: str | Path, out: str | Path, device, rule: str = "soft",
                  threshold: float = 0.5, tta: bool = False, probabilities: bool = False, batch_size: int = 4,
                  precision: str = "auto", log=print, crop: CropModel | None = None) -> PredictionReport:
    """The pipeline behind `predict_radiographs`, for any members (the benchmark times it with untrained ones)."""
    check_arguments(rule, threshold, batch_size)
    label = f"{rule}{TWO_STAGE_SUFFIX}" if crop else rule  # how predictions.csv names what made each mask
    weights = np.array([member.weight for member in members]) if rule == "weighted" else None
    source, out = Path(source), Path(out)
    files = _keys(find_radiographs(source), source)
    done = pd.read_csv(out / TABLE, dtype={"id": str}) if (out / TABLE).is_file() else pd.DataFrame(columns=COLUMNS)
    rows = {row["id"]: row for row in done.to_dict(orient="records")}
    report = PredictionReport()
    todo = []
    for key, path in files.items():
        finished = (key in rows and _same_settings(rows[key], label, threshold, tta)
                    and all((out / folder / f"{key}.png").is_file() for folder in _folders(probabilities)))
        (report.skipped.append(key) if finished else todo.append((key, path)))
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=len(todo), desc="predicting", unit="image") as bar:
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        reading: Future | None = pool.submit(_read_batch, batches[0]) if batches else None
        writing: list[Future] = []
        for index in range(len(batches)):
            images, failures = reading.result()
            reading = pool.submit(_read_batch, batches[index + 1]) if index + 1 < len(batches) else None
            report.failed |= failures
            per_member = [_member_probabilities(member, [image for _, _, image in images], device, tta, precision)
                          for member in members]
            for k, (key, path, image) in enumerate(images):
                probs = np.stack([member_probs[k] for member_probs in per_member])
                mask, probability = combine(probs, rule, threshold, weights=weights), probs.mean(axis=0)
                if crop is not None:
                    probability = crop.outline(image, mask, device)
                    mask = probability > threshold
                rows[key] = _row(key, path, image, mask, label, threshold, tta, float(disagreement(probs, threshold)[1]))
                writing.append(pool.submit(_write, out, key, image, mask, f"{label}, T = {threshold:g}",
                                           probability if probabilities else None))
                report.written.append(key)
                bar.update(1)
            for failed in failures:
                bar.update(1)
                log(f"skipped {failed}: {failures[failed]}")
        for job in writing:
            job.result()
    atomic.write_csv(out / TABLE, pd.DataFrame(list(rows.values()), columns=COLUMNS).sort_values("id"))
    log(f"{report.summary()} → {out}")
    return report


def _folders(probabilities: bool) -> tuple[str, ...]:
    return (MASKS, OVERLAYS, PROBABILITIES) if probabilities else (MASKS, OVERLAYS)


@dataclass(frozen=True)
class Member:
    """One model of the ensemble, with the input size it was trained at."""

    name: str
    model: object
    image_size: tuple[int, int]
    weight: float = 1.0  # its best validation DSC, for weighted voting


def _members(study: Study) -> list[Member]:
    try:
        specs = ensemble_members(study, prepare_data(study))
    except StageOrderError as exc:
        raise StageOrderError(f"the study `{study.name}` has no trained ensemble yet ({exc}); "
                              f"run `spineseg run --profile {study.name}` first") from None
    device = pick_device(study.cfg.device)
    missing = [spec.folder_name() for spec in specs if not spec.files(study.layout.store).done.is_file()]
    if missing:
        raise StageOrderError(f"stage 3 of `{study.name}` has not finished ({', '.join(missing)}); "
                              f"run `spineseg run --profile {study.name} --stages 3` first")
    weights = members_validation_dsc(study, specs)
    return [Member(spec.candidate, load_trained(study.layout.store, spec, device), spec.image_size, float(weight))
            for spec, weight in zip(specs, weights)]


@dataclass(frozen=True)
class CropModel:
    """The crop model of the two-stage variant, how it cuts its boxes, and the grid its crops came from."""

    model: object
    geometry: CropGeometry
    grid: tuple[int, int]  # dataset 1's stored size: a radiograph is cut there, as in training

    def outline(self, image: np.ndarray, located: np.ndarray, device) -> np.ndarray:
        """The crop model's probabilities [H, W] around a located mask, at the image's own size."""
        small = resample(image[None].astype(np.float32), self.grid)
        where = resample(located[None].astype(np.float32), self.grid, nearest=True) > 0.5
        return np.clip(resample(refine(self.model, small, where, self.geometry, device), image.shape)[0], 0.0, 1.0)


def _crop_model(study: Study, device) -> CropModel:
    data = prepare_data(study)
    trained = trained_crop_model(study, data, device)
    if trained is None:
        raise ConfigError(f"--two-stage: the profile `{study.name}` has no crop model (two_stage.enabled is false)")
    return CropModel(*trained, stored_size(data.d1, "train"))


def _learned_locator(study: Study) -> str:
    """The rule stage 4 put in front of the crop model, chosen on validation."""
    learned = json.loads(study.layout.learned.read_text()) if study.layout.learned.is_file() else {}
    if "two_stage_locator" not in learned:
        raise StageOrderError(f"--two-stage without --rule: stage 4 of `{study.name}` has not chosen the locating rule; "
                              f"run `spineseg run --profile {study.name} --stages 4` first, or give --rule")
    return learned["two_stage_locator"]


def _member_probabilities(member: Member, images: list[np.ndarray], device, tta: bool, precision: str) -> list[np.ndarray]:
    """One member's Th8–Th11 probabilities for a batch of images of any sizes, each back at its own size."""
    if not images:
        return []
    small = np.concatenate([resample(image[None].astype(np.float32), member.image_size) for image in images])
    region = predict(member.model, small, device, batch_size=len(images), hflip=tta, precision=precision).region
    return [np.clip(resample(r[None], image.shape), 0.0, 1.0)[0] for r, image in zip(region, images)]


def _read_batch(batch: Iterable[tuple[str, Path]]) -> tuple[list[tuple[str, Path, np.ndarray]], dict[str, str]]:
    images, failures = [], {}
    for key, path in batch:
        try:
            images.append((key, path, read_radiograph(path)))
        except SpinesegError as exc:
            failures[str(path)] = str(exc)
    return images, failures


def _row(key: str, path: Path, image: np.ndarray, mask: np.ndarray, rule: str, threshold: float, tta: bool,
         spread: float) -> dict:
    rows, cols = np.nonzero(mask)
    box = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) if rows.size else (np.nan,) * 4
    return {"id": key, "source": str(path), "height": image.shape[0], "width": image.shape[1], "rule": rule,
            "threshold": threshold, "tta": tta, "area_px": int(mask.sum()), **dict(zip(("top", "left", "bottom", "right"), box)),
            "disagreement": round(spread, 6)}


def _write(out: Path, key: str, image: np.ndarray, mask: np.ndarray, made_by: str, probability: np.ndarray | None) -> None:
    atomic.write_bytes(out / MASKS / f"{key}.png", _png(np.where(mask, 255, 0).astype(np.uint8)))
    atomic.write_bytes(out / OVERLAYS / f"{key}.png", _png(overlay(image, mask, made_by)))
    if probability is not None:  # 16-bit, 65535 = 1: the members' mean (the crop model's with --two-stage)
        atomic.write_bytes(out / PROBABILITIES / f"{key}.png", _png(np.round(probability * 65535).astype(np.uint16)))


def check_rule(rule: str) -> str:
    """The rules `predict` can apply: every stage-4 rule (weighted voting weighs members by validation DSC)."""
    usable = [*RULES, *EXTRA_RULES]
    if rule not in usable:
        raise ConfigError(f"--rule {rule!r}: use one of {', '.join(usable)}")
    return rule
