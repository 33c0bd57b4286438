"""The run store: training runs as tasks, each in a folder keyed by the hash of its spec.

A run's folder holds its config, history, best weights, per-image metrics and float16 probability
maps for every evaluated split, a summary and, written last, ``DONE`` (see `artifacts.RunFiles`).
A rerun skips finished runs; an interrupted one resumes from its last epoch checkpoint. A stage's
grid is a list of independent specs mapped by an executor, so a distributed engine can map it too.

A lease (an OS file lock beside the run folder, released by the OS when its holder dies) lets only
one process train a run: two studies or workers sharing a store never train the same run twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from spineseg import atomic
from spineseg.data import load_split, splits_present
from spineseg.device import pick_device
from spineseg.errors import StageOrderError
from spineseg.metrics import per_image
from spineseg.models import build_model
from spineseg.predict import load_weights, predict_proba
from spineseg.study.artifacts import RunFiles, read_table
from spineseg.study.stage0_data import StudyData
from spineseg.train import TrainOutcome, TrainSettings, fit


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run; its hash names the run's folder."""

    stage: str
    encoder: str
    image_size: int
    train: TrainSettings
    architecture: str = "unet"
    pretrained: str = "none"
    weights_path: str | None = None  # an encoder state dict to start from
    init: str | None = None  # the folder of a finished run whose best weights this one starts from
    data: str = ""  # StudyData.fingerprint

    @property
    def seed(self) -> int:
        return self.train.seed

    @property
    def augment(self) -> bool:
        return self.train.augment

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def folder_name(self) -> str:
        return f"{self.stage}-{self.encoder}-{self.image_size}px-s{self.seed}-{self.key()}"

    def files(self, store: Path) -> RunFiles:
        return RunFiles(Path(store) / self.folder_name())


class Executor(Protocol):
    def map(self, fn: Callable, items: Sequence) -> list: ...


class SequentialExecutor:
    """Runs tasks one after another in this process, with an overall progress bar."""

    def __init__(self, desc: str = "runs"):
        self.desc = desc

    def map(self, fn: Callable, items: Sequence) -> list:
        return [fn(item) for item in tqdm(items, desc=self.desc, unit="run")]


def _evaluate(model, files: RunFiles, data: StudyData, image_size: int, device: torch.device) -> None:
    """Probability maps (float16) and per-image metrics of every split the run is evaluated on."""
    for name, dataset_folder, split in data.eval_splits():
        if split not in splits_present(dataset_folder):
            continue
        loaded = load_split(dataset_folder, split, image_size)
        probs = predict_proba(model, loaded.images, device)
        with atomic.atomic_path(files.probs(name, split)) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, ids=np.array(loaded.ids), probs=probs.astype(np.float16))
        metrics = per_image(probs > 0.5, loaded.masks)
        metrics.insert(0, "patient", loaded.patients)
        metrics.insert(0, "id", loaded.ids)
        atomic.write_csv(files.metrics(name, split), metrics)


def summary_columns() -> list[str]:
    """The columns of a run summary, in one order whether the run was trained now or earlier."""
    spec = [f.name for f in fields(RunSpec) if f.name != "train"]
    return [*spec, *(f.name for f in fields(TrainSettings)), *(f.name for f in fields(TrainOutcome)), "key", "folder", "device"]


def execute(spec: RunSpec, data: StudyData, store: Path, device: str = "auto", wait: bool = True) -> dict | None:
    """Train and evaluate one run unless it is already finished; return its summary.

    Another process training the same run holds its lease: then wait for it to finish, or with
    ``wait=False`` return None at once so the caller can do other runs first.
    """
    files = spec.files(store)
    if files.done.is_file():
        return json.loads(files.summary.read_text())
    files.lease.parent.mkdir(parents=True, exist_ok=True)
    lease = FileLock(files.lease)
    try:
        lease.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    try:
        if files.done.is_file():  # finished by the previous holder
            return json.loads(files.summary.read_text())
        return _train(spec, files, data, device)
    finally:
        lease.release()


def starting_model(spec: RunSpec, store: Path):
    """A run's model before its first epoch: ImageNet, a local encoder file, or another run's weights."""
    model = build_model(spec.encoder, spec.architecture, spec.pretrained, spec.weights_path)
    if spec.init:
        start = RunFiles(Path(store) / spec.init)
        if not start.done.is_file():
            raise StageOrderError(f"{spec.folder_name()} starts from {start.folder}, which has not finished")
        load_weights(model, start.best, torch.device("cpu"))
    return model


def _train(spec: RunSpec, files: RunFiles, data: StudyData, device: str) -> dict:
    resuming = files.checkpoint.is_file()
    if resuming:
        epochs = len(pd.read_csv(files.history)) if files.history.is_file() else 0
        tqdm.write(f"resuming {files.folder.name} after epoch {epochs}")
    atomic.write_json(files.config, asdict(spec))
    torch_device = pick_device(device)
    torch.manual_seed(spec.seed)
    # A checkpoint holds every weight: resuming needs neither the network nor the weights file.
    model = build_model(spec.encoder, spec.architecture) if resuming else starting_model(spec, files.folder.parent)
    train_split = load_split(data.d1, "train", spec.image_size)
    val_split = load_split(data.d1, "val", spec.image_size)
    outcome = fit(model, train_split, val_split, spec.train, files.folder, torch_device,
                  desc=f"{spec.encoder} s{spec.seed}")
    _evaluate(model, files, data, spec.image_size, torch_device)
    flat_spec = {key: value for key, value in asdict(spec).items() if key != "train"} | asdict(spec.train)
    summary = {**flat_spec, **asdict(outcome), "key": spec.key(), "folder": files.folder.name,
               "device": str(torch_device)}
    atomic.write_json(files.summary, summary)
    atomic.write_text(files.done, "")
    files.checkpoint.unlink(missing_ok=True)  # best.pt keeps the weights that matter
    return summary


def run_all(specs: Iterable[RunSpec], data: StudyData, store: Path, device: str = "auto",
            executor: Executor | None = None, log=tqdm.write) -> list[dict]:
    """Every run's summary, in the order of `specs`; finished runs are skipped, leased ones done last."""
    specs = list(specs)
    done = sum(spec.files(store).done.is_file() for spec in specs)
    if done:
        log(f"{done} of {len(specs)} runs already finished: skipped")
    executor = executor or SequentialExecutor(desc=f"{len(specs)} runs")
    summaries = executor.map(partial(execute, data=data, store=store, device=device, wait=False), specs)
    busy = [index for index, summary in enumerate(summaries) if summary is None]
    if busy:
        log(f"{len(busy)} runs are being trained by another process: waiting for them")
        for index, summary in zip(busy, executor.map(partial(execute, data=data, store=store, device=device),
                                                     [specs[i] for i in busy])):
            summaries[index] = summary
    return summaries


def load_trained(store: Path, spec: RunSpec, device: torch.device):
    """A finished run's model with its best weights, ready for inference."""
    return load_weights(build_model(spec.encoder, spec.architecture, "none"), spec.files(store).best, device)


def load_probs(store: Path, spec: RunSpec, dataset: str, split: str) -> tuple[list[str], np.ndarray]:
    """Cached probability maps of a finished run, as float32 [N, H, W] with their image ids."""
    path = spec.files(store).probs(dataset, split)
    if not path.is_file():
        raise StageOrderError(f"no cached probabilities at {path}; run the stage that trains {spec.encoder} first")
    with np.load(path) as npz:
        return [str(i) for i in npz["ids"]], npz["probs"].astype(np.float32)


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
