"""The run store: training runs as tasks, each in a folder keyed by the hash of its spec.

A run's folder holds its config, history, best weights, per-image metrics and float16 probability
maps for every evaluated split, a summary and, written last, ``DONE`` (see `artifacts.RunFiles`).
A rerun skips finished runs; an interrupted one resumes from its last epoch checkpoint. A stage's
grid is a list of independent specs mapped by an executor, so a distributed engine can map it too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spineseg import atomic
from spineseg.data import load_split, splits_present
from spineseg.device import pick_device
from spineseg.errors import StageOrderError
from spineseg.metrics import per_image
from spineseg.models import build_model
from spineseg.predict import load_weights, predict_proba
from spineseg.study.artifacts import RunFiles
from spineseg.train import TrainSettings, fit


@dataclass(frozen=True)
class StudyData:
    """Dataset 1 (train/val/test) and the optional external dataset 2 (test only)."""

    d1: Path
    d2: Path | None = None

    def folder(self, dataset: str) -> Path:
        folder = {"d1": self.d1, "d2": self.d2}[dataset]
        if folder is None:
            raise StageOrderError(f"this study has no dataset {dataset}")
        return folder

    def eval_splits(self) -> list[tuple[str, Path, str]]:
        """(dataset name, folder, split) pairs every run is evaluated on: D1 val and test, D2 test."""
        out = [("d1", self.d1, "val"), ("d1", self.d1, "test")]
        if self.d2 is not None:
            out.append(("d2", self.d2, "test"))
        return out

    def fingerprint(self) -> str:
        """Changes whenever a manifest (ids or splits) changes, so runs on other data get other keys."""
        digest = hashlib.sha1()
        for folder in (self.d1, self.d2):
            if folder is not None:
                digest.update((Path(folder) / "manifest.csv").read_bytes())
        return digest.hexdigest()[:12]


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run; its hash names the run's folder."""

    stage: str
    encoder: str
    image_size: int
    train: TrainSettings
    architecture: str = "unet"
    pretrained: str = "none"
    weights_path: str | None = None
    data: str = ""  # StudyData.fingerprint()

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
        metrics.insert(0, "id", loaded.ids)
        atomic.write_csv(files.metrics(name, split), metrics)


def execute(spec: RunSpec, data: StudyData, store: Path, device: str = "auto") -> dict:
    """Train and evaluate one run unless it is already finished; return its summary."""
    files = spec.files(store)
    if files.done.is_file():
        return json.loads(files.summary.read_text())
    atomic.write_json(files.config, asdict(spec))
    torch_device = pick_device(device)
    torch.manual_seed(spec.seed)
    # A checkpoint holds every weight: resuming needs neither the network nor the weights file.
    resuming = files.checkpoint.is_file()
    model = build_model(spec.encoder, spec.architecture, "none" if resuming else spec.pretrained,
                        None if resuming else spec.weights_path)
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
            executor: Executor | None = None) -> list[dict]:
    specs = list(specs)
    executor = executor or SequentialExecutor(desc=f"{len(specs)} runs")
    return executor.map(partial(execute, data=data, store=store, device=device), specs)


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
            frame = pd.read_csv(path, dtype={"id": str})
            frame.insert(0, "dataset", dataset)
            frame.insert(0, "run", spec.seed)
            frame.insert(0, "group", group(spec))
            frames.append(frame)
    if not frames:
        raise StageOrderError(f"no per-image metrics for split {split!r} under {store}")
    return pd.concat(frames, ignore_index=True)
