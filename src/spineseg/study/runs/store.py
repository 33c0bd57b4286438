"""The run store: training runs as tasks, each in a folder keyed by the hash of its spec.

A run's folder holds its config, history, best weights, per-image metrics and float16 probability
maps for every evaluated split, a summary, ``model.json`` (the model described: loading it needs no
spec, profile or data; `spineseg.saved_models`) and, written last, ``DONE`` (see `artifacts.RunFiles`).
A rerun skips finished runs; an interrupted one resumes from its last epoch checkpoint. A stage's
grid is a list of independent specs mapped by an executor (`spineseg.study.core.executors`: here, or Dask).

A lease (an OS file lock beside the run folder, released by the OS when its holder dies) lets only
one process train a run: two studies or workers sharing a store never train the same run twice.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from spineseg import atomic
from spineseg.chain import ChainPrior, chain_centres
from spineseg.crops import CropGeometry, training_crops
from spineseg.data import Split, load_split, splits_present
from spineseg.data.dataset import as_hw, stored_size
from spineseg.device import pick_device
from spineseg.errors import ConfigError, DatasetError, StageOrderError
from spineseg.identification import centre_errors, vertebra_centres
from spineseg.locator import Locator, identified_share
from spineseg.metrics import ARTICLE_THRESHOLD, average_precision, per_image
from spineseg.names import CENTRES, candidate_name
from spineseg.predict import Segmenter, load_weights, predict, resample
from spineseg.saved_models import ModelDescription, build_segmenter
from spineseg.study.core.artifacts import RunFiles, read_table
from spineseg.study.core.executors import Executor, SequentialExecutor
from spineseg.study.core.provenance import code_version
from spineseg.study.core.session import StudyData
from spineseg.train import TrainOutcome, TrainSettings, fit


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run; its hash names the run's folder."""

    stage: str
    encoder: str
    image_size: tuple[int, int]  # (height, width) the model trains and predicts at
    train: TrainSettings
    architecture: str = "unet"
    pretrained: str = "none"
    weights_path: str | None = None  # an encoder state dict to start from
    attention: bool = False  # scSE in the decoder
    init: str | None = None  # the folder of a finished run whose best weights this one starts from
    data: str = ""  # StudyData.fingerprint
    crop: CropGeometry | None = None  # a crop model of the two-stage variant: trains on crops around the region

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_hw(self.image_size))  # a side means a square

    @property
    def seed(self) -> int:
        return self.train.seed

    @property
    def augment(self) -> bool:
        return self.train.augment

    def key(self) -> str:
        spec = asdict(self)
        if spec["crop"] is None:
            del spec["crop"]  # runs without crops keep the keys they had before crops existed
        for setting, article in (("augmentation", "paper"), ("lr_schedule", "constant"), ("choose_after", 0.0)):
            if spec["train"][setting] == article:
                del spec["train"][setting]  # and runs with the article's augmentation and rate theirs
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def target(self) -> str:
        return self.train.target

    @property
    def candidate(self) -> str:
        """How tables name this model: the encoder, marked when it is level-aware."""
        return candidate_name(self.encoder, "crop" if self.crop else self.target)

    def folder_name(self) -> str:
        target = "-crop" if self.crop else "" if self.target == "binary" else f"-{self.target}"
        height, width = self.image_size
        return f"{self.stage}-{self.encoder}{target}-{height}x{width}px-s{self.seed}-{self.key()}"

    def files(self, store: Path) -> RunFiles:
        return RunFiles(Path(store) / self.folder_name())


def segmenter(spec: RunSpec, pretrained: str = "none", weights_path: str | None = None) -> Segmenter:
    """The network of a run (`build_segmenter`), from `pretrained` encoder weights or from nothing."""
    return build_segmenter(spec.encoder, spec.architecture, spec.target, spec.train.coordinates, spec.attention,
                           pretrained, weights_path)


def evaluation_grid(folder: Path, split: str, fallback: tuple[int, int] | None) -> tuple[int, int] | None:
    """Where runs are scored: the dataset's stored size, so that models of any input size compare;
    the run's own size only for datasets whose images differ in size."""
    try:
        return stored_size(folder, split)
    except DatasetError:
        return fallback


@dataclass(frozen=True)
class Scored:
    """A model's predictions on one split, on its evaluation grid, and their per-image metrics."""

    probs: np.ndarray
    levels: np.ndarray | None
    ids: list[str]
    metrics: pd.DataFrame


def score_split(model: Segmenter, spec: RunSpec, folder: Path, split: str, device: torch.device, hflip: bool = False) -> Scored:
    """Predict a split at the run's input size and score it on the dataset's evaluation grid."""
    grid = evaluation_grid(folder, split, spec.image_size)
    images = load_split(folder, split, spec.image_size).images
    prediction = predict(model, images, device, hflip=hflip, precision=spec.train.precision)
    truth = load_split(folder, split, grid)
    probs = resample(prediction.region, grid)
    levels = None if prediction.levels is None else resample(prediction.levels, grid, nearest=True)
    metrics = per_image(probs > ARTICLE_THRESHOLD, truth.masks)
    metrics["ap"] = average_precision(probs, truth.masks)
    metrics.insert(0, "patient", truth.patients)
    metrics.insert(0, "id", truth.ids)
    return Scored(probs, levels, list(truth.ids), metrics)


def _evaluate(model: Segmenter, spec: RunSpec, files: RunFiles, data: StudyData, device: torch.device, hflip: bool) -> None:
    """Probability maps (float16, on the evaluation grid), level maps, and per-image metrics of every split;
    a locator's chains instead (`_evaluate_locator`).

    A crop model needs a located region to look at: stage 4 scores it behind its locator."""
    if spec.target == CENTRES:
        _evaluate_locator(Locator(model, load_chain_prior(files), hflip), spec, files, data, device)
        atomic.write_json(files.evaluation, {"hflip": hflip})
        return
    for name, dataset_folder, split in ([] if spec.crop else data.eval_splits()):
        if split not in splits_present(dataset_folder):
            continue
        scored = score_split(model, spec, dataset_folder, split, device, hflip)
        arrays = {"ids": np.array(scored.ids), "probs": scored.probs.astype(np.float16)}
        if scored.levels is not None:
            arrays["levels"] = scored.levels
        with atomic.atomic_path(files.probs(name, split)) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        atomic.write_csv(files.metrics(name, split), scored.metrics)
    atomic.write_json(files.evaluation, {"hflip": hflip})


OUTSIDE_CODES = {"": 0, "above": 1, "below": 2}  # how a chain's `outside` is stored


def _evaluate_locator(locator: Locator, spec: RunSpec, files: RunFiles, data: StudyData, device: torch.device) -> None:
    """Each split's chains on its evaluation grid (`RunFiles.chains`) and, where it has level labels, whether
    each image's chain names Th8–Th11 right (`spineseg.identification`'s centre criterion)."""
    for name, dataset_folder, split in data.eval_splits():
        if split not in splits_present(dataset_folder):
            continue
        grid = evaluation_grid(dataset_folder, split, spec.image_size)
        images = load_split(dataset_folder, split, spec.image_size).images
        factor = np.asarray(grid, dtype=float) / np.asarray(spec.image_size, dtype=float)
        chains = [chain.scaled(factor) for chain in locator.chains(images, device, precision=spec.train.precision)]
        truth = load_split(dataset_folder, split, grid, labels=True)
        arrays = {"ids": np.array(truth.ids), "centres": np.stack([c.centres for c in chains]).astype(np.float32),
                  "outside": np.array([[OUTSIDE_CODES[o] for o in c.outside] for c in chains], dtype=np.int8),
                  "evidence": np.stack([c.evidence for c in chains]).astype(np.float32)}
        with atomic.atomic_path(files.chains(name, split)) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        metrics = pd.DataFrame({"id": truth.ids, "patient": truth.patients})
        if truth.labels is not None:
            errors = [centre_errors(c.region_centres(), vertebra_centres(labels)) for c, labels in zip(chains, truth.labels)]
            metrics["identified"] = [bool((e == 0).all()) for e in errors]
        atomic.write_csv(files.metrics(name, split), metrics)


def load_chain_prior(files: RunFiles) -> ChainPrior:
    try:
        return ChainPrior.from_dict(json.loads(files.chain_prior.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageOrderError(f"{files.chain_prior}: the locator's chain prior is missing or damaged ({exc}); "
                              f"delete {files.folder} to train the locator again") from None


def _locator_score(files: RunFiles, train: Split, val: Split, device: torch.device, hflip: bool):
    """The locator's early-stopping score: the share of validation images whose chain names Th8–Th11 right,
    with the chain prior of its training label maps (written beside its weights)."""
    if train.labels is None or val.labels is None:
        raise ConfigError(f"the locator learns from level label maps, and {train.dataset} has none")
    prior = ChainPrior.fit(np.stack([chain_centres(labels) for labels in train.labels]), train.size)
    atomic.write_json(files.chain_prior, prior.to_dict())
    return lambda model: identified_share(Locator(model, prior, hflip).chains(val.images, device), val.labels)


def summary_columns() -> list[str]:
    """The columns of a run summary, in one order whether the run was trained now or earlier."""
    spec = [f.name for f in fields(RunSpec) if f.name != "train"]
    return [*spec, *(f.name for f in fields(TrainSettings)), *(f.name for f in fields(TrainOutcome)), "key", "folder", "device"]


def _evaluated_as(files: RunFiles, hflip: bool) -> bool:
    return files.evaluation.is_file() and json.loads(files.evaluation.read_text()) == {"hflip": hflip}


def execute(spec: RunSpec, data: StudyData, store: Path, device: str = "auto", wait: bool = True,
            hflip: bool = False) -> dict | None:
    """Train and evaluate one run unless it is already finished; return its summary.

    A finished run asked for another evaluation (test-time flipping on or off) is evaluated again from
    its best weights, without training. Another process training the same run holds its lease: then
    wait for it to finish, or with ``wait=False`` return None at once so the caller can do other runs.
    """
    files = spec.files(store)
    if files.done.is_file() and _evaluated_as(files, hflip) and _predictions_present(spec, files, data):
        return read_summary(files)
    files.lease.parent.mkdir(parents=True, exist_ok=True)
    lease = FileLock(files.lease)
    try:
        lease.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    try:
        if files.done.is_file():  # finished, perhaps by the previous holder
            if not (_evaluated_as(files, hflip) and _predictions_present(spec, files, data)):
                torch_device = pick_device(device)
                _evaluate(load_trained(store, spec, torch_device), spec, files, data, torch_device, hflip)
            return read_summary(files)
        return _train(spec, files, data, device, hflip)
    finally:
        lease.release()


def _predictions_present(spec: RunSpec, files: RunFiles, data: StudyData) -> bool:
    """Every prediction file the run's evaluation writes is there: one deleted as damaged is made again from best.pt."""
    if spec.crop is not None:
        return True
    written = files.chains if spec.target == CENTRES else files.probs
    return all(written(name, split).is_file() and files.metrics(name, split).is_file()
               for name, folder, split in data.eval_splits() if split in splits_present(folder))


def read_summary(files: RunFiles) -> dict:
    """A finished run's summary.json; a damaged one is one error saying which folder to delete."""
    try:
        return json.loads(files.summary.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageOrderError(f"{files.summary} is damaged ({type(exc).__name__}); delete {files.folder} to train this "
                              f"run again") from None


def damaged(path: Path, exc: Exception) -> StageOrderError:
    """A run's cached prediction file that cannot be read: what to do, in one line."""
    return StageOrderError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           f"delete it and rerun stage 3: it is made again from the run's best.pt, nothing is retrained")


def starting_model(spec: RunSpec, store: Path) -> Segmenter:
    """A run's model before its first epoch: ImageNet, a local encoder file, or another run's weights."""
    model = segmenter(spec, spec.pretrained, spec.weights_path)
    if spec.init:
        start = RunFiles(Path(store) / spec.init)
        if not start.done.is_file():
            raise StageOrderError(f"{spec.folder_name()} starts from {start.folder}, which has not finished")
        load_weights(model, start.best, torch.device("cpu"))
    return model


def _train(spec: RunSpec, files: RunFiles, data: StudyData, device: str, hflip: bool) -> dict:
    resuming = files.checkpoint.is_file()
    if resuming:
        epochs = len(pd.read_csv(files.history)) if files.history.is_file() else 0
        tqdm.write(f"resuming {files.folder.name} after epoch {epochs}")
    atomic.write_json(files.config, asdict(spec))
    torch_device = pick_device(device)
    torch.manual_seed(spec.seed)
    # A checkpoint holds every weight: resuming needs neither the network nor the weights file.
    model = segmenter(spec) if resuming else starting_model(spec, files.folder.parent)
    train_split, val_split = _training_splits(spec, data, model.objective.needs_labels)
    score = _locator_score(files, train_split, val_split, torch_device, hflip) if spec.target == CENTRES else None
    outcome = fit(model, train_split, val_split, spec.train, files.folder, torch_device,
                  desc=f"{spec.candidate} s{spec.seed}", score=score)
    _evaluate(model, spec, files, data, torch_device, hflip)
    flat_spec = {key: value for key, value in asdict(spec).items() if key != "train"} | asdict(spec.train)
    summary = {**flat_spec, **asdict(outcome), "key": spec.key(), "folder": files.folder.name,
               "device": str(torch_device)}
    summary = json.loads(json.dumps(summary))  # as it reads back from summary.json (a size is a list there)
    atomic.write_json(files.summary, summary)
    describe(spec, files, training_grid(data)).save(files.folder)
    atomic.write_text(files.done, "")
    files.checkpoint.unlink(missing_ok=True)  # best.pt keeps the weights that matter
    return summary


def training_grid(data: StudyData) -> tuple[int, int] | None:
    """The stored size of dataset 1's training images, which every run resizes from; None where they differ."""
    return evaluation_grid(data.d1, "train", None)


def describe(spec: RunSpec, files: RunFiles, grid: tuple[int, int] | None) -> ModelDescription:
    """A finished run's model.json: its network and inputs, where its weights started, and what it reached."""
    summary = json.loads(files.summary.read_text())
    reached = {key: summary[key] for key in ("best_val_dsc", "best_epoch", "epochs_run", "stopped_early", "seconds")
               if key in summary}
    for split in ("val", "test"):
        for dataset, path in files.metrics_files(split):
            metrics = read_table(path)
            for column in ("dsc", "identified"):
                if column in metrics:
                    reached[f"mean_{column}_{dataset}_{split}"] = round(float(metrics[column].astype(float).mean()), 6)
    origin = {"pretrained": spec.pretrained, "weights_path": spec.weights_path, "init": spec.init}
    prior = load_chain_prior(files).to_dict() if spec.target == CENTRES else None
    return ModelDescription(spec.candidate, spec.encoder, spec.architecture, spec.target, spec.image_size,
                            spec.train.coordinates, spec.attention, grid, spec.crop, origin, spec.train.precision,
                            reached, code_version(), prior)


def _training_splits(spec: RunSpec, data: StudyData, labels: bool) -> tuple[Split, Split]:
    """Dataset 1's training and validation images at the run's size, or a crop model's crops of them."""
    if spec.crop is None:
        return (load_split(data.d1, "train", spec.image_size, labels=labels),
                load_split(data.d1, "val", spec.image_size, labels=labels))
    try:
        grid = stored_size(data.d1, "train")
    except DatasetError as exc:
        raise ConfigError(f"two_stage: the crop model cuts its crops from dataset 1 at its stored size, and {exc}") from None
    return (training_crops(load_split(data.d1, "train", grid), spec.crop, spec.seed),
            training_crops(load_split(data.d1, "val", grid), spec.crop.exact(), spec.seed))


def run_label(spec: RunSpec) -> str:
    return f"{spec.stage} {spec.candidate} seed {spec.seed} ({spec.folder_name()})"


def run_all(specs: Iterable[RunSpec], data: StudyData, store: Path, device: str = "auto",
            executor: Executor | None = None, log=tqdm.write, hflip: bool = False) -> list[dict]:
    """Every run's summary, in the order of `specs`; finished runs are skipped, leased ones done last."""
    specs = list(specs)
    finished = [spec.files(store).done.is_file() for spec in specs]
    if any(finished):
        log(f"{sum(finished)} of {len(specs)} runs already finished: skipped")
    task = partial(execute, data=data, store=store, device=device, wait=False, hflip=hflip)
    if all(finished) and all(_evaluated_as(spec.files(store), hflip) for spec in specs):
        return [task(spec) for spec in specs]  # only summaries to read: no executor (no cluster to start, no jobs)
    executor = executor or SequentialExecutor(desc=f"{len(specs)} runs")
    summaries = executor.map(task, specs, label=run_label)
    busy = [index for index, summary in enumerate(summaries) if summary is None]
    if busy:
        log(f"{len(busy)} runs are being trained by another process: waiting for them")
        waiting = partial(execute, data=data, store=store, device=device, hflip=hflip)
        for index, summary in zip(busy, executor.map(waiting, [specs[i] for i in busy], label=run_label)):
            summaries[index] = summary
    return summaries


def require_trained(spec: RunSpec, store: Path, what: str, profile: str) -> None:
    """A run a later stage loads must have finished; else one line saying which (`what`) and what to run."""
    if not spec.files(store).done.is_file():
        raise StageOrderError(f"{what} {spec.folder_name()} has not been trained: "
                              f"run `spineseg run --profile {profile} --stages 3` first")


def load_trained(store: Path, spec: RunSpec, device: torch.device) -> Segmenter:
    """A finished run's model with its best weights, ready for inference."""
    return load_weights(segmenter(spec), spec.files(store).best, device)


@dataclass(frozen=True)
class CachedPrediction:
    ids: list[str]
    probs: np.ndarray  # float32 [N, H, W] on the evaluation grid
    levels: np.ndarray | None  # uint8 [N, H, W] for level-aware runs


def load_probs(files: RunFiles, name: str, dataset: str, split: str) -> CachedPrediction:
    """Cached predictions of a finished run (`name`, as the tables call it) on one dataset split."""
    path = files.probs(dataset, split)
    if not path.is_file():
        raise StageOrderError(f"no cached probabilities at {path}; run the stage that trains {name} first")
    try:
        with np.load(path) as npz:
            levels = npz["levels"] if "levels" in npz.files else None
            return CachedPrediction([str(i) for i in npz["ids"]], npz["probs"].astype(np.float32), levels)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise damaged(path, exc) from None


def load_metrics(store: Path, specs: Iterable[RunSpec], group: Callable[[RunSpec], str],
                 split: str = "test") -> pd.DataFrame:
    """Per-image metrics of finished runs as one long frame: group, run, dataset, id, metrics."""
    frames = []
    for spec in specs:
        for dataset, path in spec.files(store).metrics_files(split):
            frame = read_table(path)
            frame.insert(0, "dataset", dataset)
            frame.insert(0, "run", spec.seed)
            frame.insert(0, "group", group(spec))
            frames.append(frame)
    if not frames:
        raise StageOrderError(f"no per-image metrics for split {split!r} under {store}")
    return pd.concat(frames, ignore_index=True)
