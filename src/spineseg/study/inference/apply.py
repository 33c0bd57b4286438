"""Using an ensemble on new radiographs: ``spineseg predict`` (a study's ensemble: `deployment.predict_radiographs`).

The ensemble is a study's (its selected stage-3 models, found from its records: no data are read or
made) or a bundle's (`spineseg.study.inference.bundle`); either way each member loads from its self-describing
model folder, once. Each image is read (PNG, JPEG or DICOM), resized as the study resized its images
(`spineseg.data.dataset.model_input`: to the stored grid, then to each member's input size), every
member predicts, the probabilities are resampled to the image's size (as read) and combined by the chosen
rule (with ``--two-stage``, the crop model then outlines the region in a box around that mask). With
``--located`` the members take no part: the locator (`spineseg.locator`) places the chain C7…S1 on the
image at the grid, and the crop model outlines the four vertebrae it names there, as stage 4 made the
located variant's masks (`spineseg.study.stages.located`); the output folder also gets ``chains.csv``. A huge
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

import hashlib
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
from spineseg.chain import Chain, ChainPrior
from spineseg.crops import CropModel
from spineseg.data.dataset import model_input
from spineseg.data.radiographs import Radiograph, find_radiographs, load_radiograph
from spineseg.device import pick_device
from spineseg.ensemble import combine, disagreement
from spineseg.errors import ConfigError, SpinesegError, StageOrderError
from spineseg.located_mask import crop_outline
from spineseg.locator import Locator
from spineseg.metrics import ARTICLE_THRESHOLD
from spineseg.names import CENTRES, EXTRA_RULES, LOCATED, PRECISIONS, RULES, TWO_STAGE, is_device
from spineseg.predict import predict, resample
from spineseg.saved_models import ModelDescription, load_model
from spineseg.study.core.artifacts import read_table
from spineseg.study.inference.bundle import EnsembleFolders
from spineseg.vertebrae import CHAIN, REGION

MASKS, OVERLAYS, PROBABILITIES, TABLE, CHAINS = "masks", "overlays", "probabilities", "predictions.csv", "chains.csv"
TWO_STAGE_SUFFIX = "+crop"  # a rule's name in predictions.csv when the crop model outlined its mask
COLUMNS = ["id", "source", "height", "width", "rule", "threshold", "tta", "area_px", "top", "left", "bottom", "right",
           "disagreement"]
CENTRE_COLUMNS = [f"{name.lower()}_{axis}" for name in REGION for axis in ("row", "col")]  # where --located put Th8–Th11
CHAIN_COLUMNS = ["id", "vertebra", "row", "col", "outside"]
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
    tta: bool | None = None  # also predict each mirror image, and average; None: as the study's stage 3 evaluated
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
class ChainLocator:
    """The located variant's locator, with the input size it was trained at."""

    locator: Locator
    input_size: tuple[int, int]

    def chains(self, at_grid: np.ndarray, device, precision: str) -> list[Chain]:
        """Each image's chain on the grid of `at_grid` [N, H, W], found at the locator's input size as stage 3 found it."""
        small = np.stack([model_input(image, self.input_size) for image in at_grid])
        factor = np.asarray(at_grid.shape[1:], dtype=float) / np.asarray(self.input_size, dtype=float)
        return [chain.scaled(factor) for chain in self.locator.chains(small, device, len(small), precision)]


@dataclass(frozen=True)
class Ensemble:
    """What `predict_files` applies: the members, the crop model if asked for, and how radiographs reach them."""

    members: list[Member]
    grid: tuple[int, int] | None = None  # the stored size of the study's images: a radiograph is resized there first
    crop: CropModel | None = None  # its boxes are cut from the radiograph at `grid`, as in training
    locator: ChainLocator | None = None  # the located variant: the crop model outlines the four vertebrae it names

    def inputs(self, image: np.ndarray) -> np.ndarray:
        """A radiograph as the study stored its images (at the grid), from which each member's input is resized."""
        return image.astype(np.float32, copy=False) if self.grid is None else model_input(image, self.grid)


def load_ensemble(found: EnsembleFolders, device, two_stage: bool = False, located: bool = False) -> Ensemble:
    """The models of a study or a bundle, each from its model folder; the crop model and the locator only when asked
    for (and found). The located variant's masks need no member: their model.json files still give the grid."""
    described = [(ModelDescription.load(folder, found.shown(folder)), folder, weight) for folder, weight in found.members]
    grids = {description.grid for description, _, _ in described}
    if len(grids) != 1:
        raise ConfigError(f"the members of {found.origin} were trained on images stored at different sizes {sorted(map(str, grids))}")
    grid, crop, locator = grids.pop(), None, None
    members = [] if located else [Member(description.name, load_model(folder, device, found.shown(folder))[1], description.input_size, weight)
                                  for description, folder, weight in described]
    option = "--located" if located else "--two-stage"
    if two_stage or located:
        description, model = load_model(found.crop, device, found.shown(found.crop))
        if description.crop is None or description.grid is None:
            raise ConfigError(f"{option}: {found.crop} is not a crop model with the grid its crops were cut from")
        _same_grid(description, grid, option, f"the crop model of {found.origin}")  # its boxes are cut at the grid
        crop = CropModel(model, description.crop)
    if located:
        description, model = load_model(found.locator_model, device, found.shown(found.locator_model))
        _same_grid(description, grid, option, f"the locator of {found.origin}")  # stage 3 found its chains there
        locator = ChainLocator(Locator(model, _chain_prior(description, found.locator_model), found.locator_hflip),
                               description.input_size)
    return Ensemble(members, grid, crop, locator)


def _same_grid(description: ModelDescription, grid: tuple[int, int] | None, option: str, what: str) -> None:
    """A model of a variant sees the radiograph at the grid its members' images were stored at, or it is refused."""
    if description.grid != grid:
        members_grid = grid or "sizes their model.json files do not record (rerun stage 3 to describe them)"
        raise ConfigError(f"{option}: {what} was trained on images stored at {description.grid}, "
                          f"its members at {members_grid}; they do not belong together")


def _chain_prior(description: ModelDescription, folder: Path) -> ChainPrior:
    """A locator's chain prior, as its model.json records it (the spacing of its training vertebrae)."""
    if description.target != CENTRES or description.chain_prior is None:
        raise ConfigError(f"--located: {folder} is not a locator with its chain prior in model.json "
                          f"(target {description.target!r})")
    try:
        return ChainPrior.from_dict(description.chain_prior)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--located: the chain prior in {folder / 'model.json'} is damaged ({exc})") from None


def check_variant(rule: str | None, two_stage: bool, located: bool) -> None:
    """Options that do not go together, refused before anything is read: each variant makes its own mask."""
    if two_stage and located:
        raise ConfigError("--located and --two-stage: each makes its own mask; choose one")
    if located and rule is not None:
        raise ConfigError(f"--rule {rule} and --located: the located mask is the locator's and the crop model's, "
                          f"made by no rule; leave out --rule")


def predict_with(found: EnsembleFolders, source: str | Path, out: str | Path, options: InferenceOptions,
                 rule: str | None = None, probabilities: bool = False, two_stage: bool = False, located: bool = False,
                 log=print) -> PredictionReport:
    """`predict_files` with a study's or a bundle's models. With `two_stage`, the rule's mask (by default the
    rule stage 4 chose as the locator on validation) is where the crop model outlines the region; with `located`,
    the crop model outlines the four vertebrae the locator names. Given none of rule, `two_stage`, `located`, what
    stage 4 chose on validation (`chosen`); soft voting where it chose nothing."""
    check_variant(rule, two_stage, located)
    if rule is None and not (two_stage or located) and found.best_rule:
        rule, two_stage, located = chosen(found, log)
    missing = [f"no trained {what}" for what, folder in (("locator", found.locator_model), ("crop model", found.crop))
               if folder is None] if located else []
    if missing:
        raise ConfigError(f"--located: {found.origin} has {' and '.join(missing)} (it needs both locator.enabled and "
                          f"two_stage.enabled, trained by stage 3; in a bundle, the located variant must have won on "
                          f"validation)")
    if two_stage and found.crop is None:
        raise ConfigError(f"--two-stage: {found.origin} has no trained crop model (two_stage.enabled is false, "
                          f"stage 3 has not trained it, or, in a bundle, the two-stage variant did not win on validation)")
    if two_stage and rule is None and found.locator is None:
        raise StageOrderError(f"--two-stage without --rule: {found.origin} has no locating rule chosen by stage 4; "
                              f"run stage 4 first, or give --rule")
    rule = check_rule(rule or (found.locator if two_stage else "soft"))  # before the models load
    if options.threshold is None:
        options = replace(options, threshold=found.threshold)
    if options.tta is None:
        options = replace(options, tta=found.members_hflip)
    device = pick_device(options.device)
    return predict_files(load_ensemble(found, device, two_stage, located), source, out, options, rule, probabilities, log)


def chosen(found: EnsembleFolders, log=print) -> tuple[str | None, bool, bool]:
    """(rule, two_stage, located) of what stage 4 chose on validation, as predict can run it: a rule, the two-stage
    variant behind its locating rule, or the located variant; soft voting where the choice learned something predict
    does not carry (a tuned T, the stacker, calibration) or is a baseline, said in one line."""
    best = found.best_rule
    if best == LOCATED:
        log("the study's validation-best result is the located variant: predicting with it (--rule gives another)")
        return None, False, True
    if best == TWO_STAGE:
        log(f"the study's validation-best result is the two-stage variant behind {found.locator}: predicting with it")
        return None, True, False
    if best in (*RULES, *EXTRA_RULES):
        log(f"the study's validation-best rule is {best}: predicting with it (--rule gives another)")
        return best, False, False
    log(f"the study's validation-best result ({best}) learned what predict does not carry: soft voting instead")
    return "soft", False, False


def image_id(path: Path, root: Path) -> str:
    """A file-name-safe id from the path below the input folder (sub/dir/x.png → sub__dir__x): letters of any script
    are kept (знімок_1 and пацієнт_1 stay apart); a name of nothing but punctuation gets one from its path's hash."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    key = re.sub(r"[^\w.-]+", "_", "__".join(relative.with_suffix("").parts)).strip("_.")
    return key or f"image-{hashlib.sha1(relative.as_posix().encode()).hexdigest()[:10]}"


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


def overlay(image: np.ndarray, mask: np.ndarray, made_by: str, centres: np.ndarray | None = None) -> np.ndarray:
    """The radiograph with the predicted mask tinted and outlined, and what made it (rule and T) written on it:
    read on its own, without the truth, an overlay still shows where the mask ends and how it was made. `centres`
    [K, 2] (row, column at the mask's size, NaN where none), the vertebrae a locator named, are small dots.

    An image smaller than its mask (a huge radiograph read at a reduced size, see
    `spineseg.data.radiographs.WORKING_PIXELS`) gets its overlay at its own size, the mask sampled there."""
    to_image = np.asarray(image.shape, dtype=float) / np.asarray(mask.shape, dtype=float)
    mask = nearest(mask, image.shape)
    rgb = np.repeat((255 * image).astype(np.uint8)[..., None], 3, axis=2)
    rgb[mask] = (0.65 * rgb[mask] + 0.35 * OVERLAY_COLOUR).astype(np.uint8)
    thickness = max(1, min(mask.shape) // 256)  # about one pixel in 256, so it shows on large radiographs too
    rgb[mask & ~binary_erosion(mask, iterations=thickness, border_value=0)] = OUTLINE_COLOUR
    drawn = Image.fromarray(rgb)
    draw, size = ImageDraw.Draw(drawn), max(10, min(mask.shape) // 24)
    draw.text((size // 2, size // 2), made_by, fill=OUTLINE_COLOUR, font=ImageFont.load_default(size),
              stroke_width=max(1, size // 10), stroke_fill=(0, 0, 0))
    radius = 2 * thickness
    for row, col in ([] if centres is None else np.asarray(centres) * to_image):
        if np.isfinite([row, col]).all():  # PIL's x is the column
            draw.ellipse((col - radius, row - radius, col + radius, row + radius), fill=OUTLINE_COLOUR, outline=(0, 0, 0))
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


def check_folders(source: str | Path, out: str | Path) -> None:
    """--input and --out that cannot work together, refused before anything is read or written."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for the masks, overlays and predictions.csv")
    if source == out or source.is_relative_to(out):
        raise ConfigError(f"--out {out} is, or holds, the --input {source}: the outputs would mix with the radiographs; "
                          f"name another folder")


def _inputs_below(source: Path, out: Path) -> list[Path]:
    """The radiographs at `source`, less anything under `out` (a rerun must not read its own outputs back)."""
    check_folders(source, out)
    outputs = out.resolve()
    found = [path for path in find_radiographs(source) if not path.resolve().is_relative_to(outputs)]
    if not found:
        raise ConfigError(f"--input {source}: no PNG, JPEG or DICOM radiograph found there")
    return found


def predict_files(ensemble: Ensemble, source: str | Path, out: str | Path, options: InferenceOptions,
                  rule: str = "soft", probabilities: bool = False, log=print) -> PredictionReport:
    """The pipeline behind `predict_with`, for any ensemble (the benchmark times it with untrained members);
    an ensemble that comes without a T is thresholded at the article's 0.5."""
    check_rule(rule)
    if options.threshold is None:
        options = replace(options, threshold=ARTICLE_THRESHOLD)
    if options.tta is None:  # an ensemble without a study: its members as they are
        options = replace(options, tta=False)
    device = pick_device(options.device)
    # how predictions.csv names what made each mask
    label = LOCATED if ensemble.locator else f"{rule}{TWO_STAGE_SUFFIX}" if ensemble.crop else rule
    weights = np.array([member.weight for member in ensemble.members]) if rule == "weighted" else None
    source, out = Path(source), Path(out)
    files = _keys(_inputs_below(source, out), source)
    rows = {row["id"]: row for row in read_table(out / TABLE).to_dict(orient="records")} if (out / TABLE).is_file() else {}
    chains = _read_chains(out / CHAINS)
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
            segment = _located if ensemble.locator else partial(_by_rule, rule=rule, weights=weights)
            for (key, path, image, _), (mask, probability, spread, chain) in zip(images, segment(ensemble, images, device, options)):
                if mask.shape != image.shape:  # only the result at the file's size: nearest for the mask, bilinear for the map
                    mask = nearest(mask, image.shape)
                    probability = resample(probability[None], image.shape)[0] if probabilities else probability
                if not mask.any():
                    report.empty.append(key)
                    log(f"warning: {key}: empty mask (nothing reached T = {options.threshold:g}); see its overlay")
                rows[key] = _row(key, path, image, mask, label, options.threshold, options.tta, spread, chain)
                chains.pop(key, None)  # a chain belongs to a located mask only
                if chain is not None:
                    chains[key] = _chain_rows(key, chain)
                writing.append(pool.submit(_write, out, key, image, mask, f"{label}, T = {options.threshold:g}",
                                           probability if probabilities else None, chain))
                report.written.append(key)
                bar.update(1)
            _write_tables(out, rows, chains)  # after each batch, so that a rerun after Ctrl-C resumes where this one stopped
        for job in writing:
            job.result()
    _write_tables(out, rows, chains)
    log(f"{report.summary()} → {out}")
    return report


def _by_rule(ensemble: Ensemble, images: list[tuple], device, options: InferenceOptions, rule: str,
             weights: np.ndarray | None) -> list[tuple]:
    """(mask, probability, the members' disagreement, no chain) of each image, at the size it was read: the members'
    probabilities combined by `rule`, then, with a crop model, its outline in a box around that mask."""
    per_member = [_member_probabilities(member, images, device, options) for member in ensemble.members]
    segmented = []
    for k, (_, _, _, at_grid) in enumerate(images):
        probs = np.stack([member_probs[k] for member_probs in per_member])
        mask, probability = combine(probs, rule, options.threshold, weights=weights), probs.mean(axis=0)
        if ensemble.crop is not None:
            probability = ensemble.crop.outline(at_grid[None], mask[None], device)[0]
            mask = probability > options.threshold
        segmented.append((mask, probability, float(disagreement(probs, options.threshold)[1]), None))
    return segmented


def _located(ensemble: Ensemble, images: list[tuple], device, options: InferenceOptions) -> list[tuple]:
    """(mask, probability, no disagreement, chain at the image's size) of each image, the mask at the grid as stage 4
    made the located variant's (`spineseg.study.stages.located.Located.outline`): the crop model's outline in boxes around
    the four vertebrae the chain names, kept to the pixels nearer to one of them than to any other vertebra."""
    if not images:
        return []
    at_grid = np.stack([at_grid for _, _, _, at_grid in images])
    chains = ensemble.locator.chains(at_grid, device, options.precision)
    probs = crop_outline(ensemble.crop, at_grid, chains, device)
    to_image = [np.asarray(image.shape, dtype=float) / np.asarray(ensemble.grid, dtype=float) for _, _, image, _ in images]
    return [(p > options.threshold, p, np.nan, chain.scaled(factor)) for p, chain, factor in zip(probs, chains, to_image)]


def _read_chains(path: Path) -> dict[str, list[dict]]:
    """chains.csv of an earlier run, by image id."""
    chains: dict[str, list[dict]] = {}
    for row in read_table(path).to_dict(orient="records") if path.is_file() else []:
        chains.setdefault(row["id"], []).append(row)
    return chains


def _chain_rows(key: str, chain: Chain) -> list[dict]:
    return [{"id": key, "vertebra": name, "row": round(float(row), 1), "col": round(float(col), 1), "outside": outside}
            for name, (row, col), outside in zip(CHAIN, chain.centres, chain.outside)]


def _write_tables(out: Path, rows: dict[str, dict], chains: dict[str, list[dict]]) -> None:
    """predictions.csv (with the centre columns when a mask is located) and chains.csv (where one was, or is)."""
    located = any(row["rule"] == LOCATED for row in rows.values())
    columns = [*COLUMNS, *CENTRE_COLUMNS] if located else COLUMNS
    atomic.write_csv(out / TABLE, pd.DataFrame(list(rows.values()), columns=columns).sort_values("id"))
    if chains or (out / CHAINS).is_file():
        atomic.write_csv(out / CHAINS, pd.DataFrame([row for key in sorted(chains) for row in chains[key]], columns=CHAIN_COLUMNS))


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
         spread: float, chain: Chain | None) -> dict:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))  # not every pixel's index
    box = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) if rows.size else (np.nan,) * 4
    centres = {} if chain is None else dict(zip(CENTRE_COLUMNS, np.round(chain.region_centres().ravel(), 1)))
    return {"id": key, "source": str(path), "height": image.shape[0], "width": image.shape[1], "rule": rule,
            "threshold": threshold, "tta": tta, "area_px": int(mask.sum()), **dict(zip(("top", "left", "bottom", "right"), box)),
            "disagreement": round(spread, 6), **centres}


def _write(out: Path, key: str, image: Radiograph, mask: np.ndarray, made_by: str, probability: np.ndarray | None,
           chain: Chain | None) -> None:
    centres = None if chain is None else chain.region_centres()
    atomic.write_bytes(out / MASKS / f"{key}.png", _png(np.where(mask, np.uint8(255), np.uint8(0))))  # 1 byte a pixel
    atomic.write_bytes(out / OVERLAYS / f"{key}.png", _png(overlay(image.pixels, mask, made_by, centres)))
    if probability is not None:  # 16-bit, 65535 = 1: the members' mean (the crop model's with --two-stage or --located)
        scaled = probability * 65535
        atomic.write_bytes(out / PROBABILITIES / f"{key}.png", _png(np.rint(scaled, out=scaled).astype(np.uint16)))


def check_rule(rule: str) -> str:
    """The rules `predict` can apply: the article's and the extra ones (weighted voting weighs members by validation
    DSC); not the stage-4 results that learned on validation (tuned T, stacking, calibration)."""
    usable = [*RULES, *EXTRA_RULES]
    if rule not in usable:
        raise ConfigError(f"--rule {rule!r}: use one of {', '.join(usable)}")
    return rule
