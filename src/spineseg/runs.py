"""Training runs as tasks: a config, a folder keyed by its hash, atomic artifacts, a completion marker.

A run's folder holds ``config.json``, ``history.csv``, ``best.pt`` (best weights), per-image metrics
and float16 probability maps for every evaluated split, ``summary.json`` and, written last, ``DONE``.
A rerun skips finished runs; an interrupted one resumes from its last epoch checkpoint. A stage's
grid is a list of independent specs mapped by an executor, so a distributed engine can map it later.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spineseg import atomic
from spineseg.data import load_split, splits_present
from spineseg.metrics import per_image
from spineseg.models import build_model
from spineseg.train import TrainSettings, fit, pick_device, predict_proba

DONE = "DONE"


@dataclass(frozen=True)
class StudyData:
    """Dataset 1 (train/val/test) and the optional external dataset 2 (test only)."""

    d1: Path
    d2: Path | None = None

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
    seed: int
    batch_size: int = 4
    lr: float = 1e-4
    max_epochs: int = 100
    patience: int = 10
    augment: bool = True
    architecture: str = "unet"
    pretrained: str = "none"
    weights_path: str | None = None
    data: str = ""  # StudyData.fingerprint()

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def folder_name(self) -> str:
        return f"{self.stage}-{self.encoder}-{self.image_size}px-s{self.seed}-{self.key()}"

    def settings(self) -> TrainSettings:
        return TrainSettings(batch_size=self.batch_size, lr=self.lr, max_epochs=self.max_epochs,
                             patience=self.patience, augment=self.augment, seed=self.seed)


class Executor(Protocol):
    def map(self, fn: Callable, items: Sequence) -> list: ...


class SequentialExecutor:
    """Runs tasks one after another in this process, with an overall progress bar."""

    def __init__(self, desc: str = "runs"):
        self.desc = desc

    def map(self, fn: Callable, items: Sequence) -> list:
        return [fn(item) for item in tqdm(items, desc=self.desc, unit="run")]


def run_folder(store: Path, spec: RunSpec) -> Path:
    return Path(store) / spec.folder_name()


def execute(spec: RunSpec, data: StudyData, store: Path, device: str = "auto") -> dict:
    """Train and evaluate one run unless it is already finished; return its summary."""
    folder = run_folder(store, spec)
    if (folder / DONE).is_file():
        return json.loads((folder / "summary.json").read_text())
    atomic.write_json(folder / "config.json", asdict(spec))
    torch_device = pick_device(device)
    torch.manual_seed(spec.seed)
    # A checkpoint holds every weight: resuming needs neither the network nor the weights file.
    resuming = (folder / "checkpoint.pt").is_file()
    model = build_model(spec.encoder, spec.architecture, "none" if resuming else spec.pretrained,
                        None if resuming else spec.weights_path)
    train_split = load_split(data.d1, "train", spec.image_size)
    val_split = load_split(data.d1, "val", spec.image_size)
    outcome = fit(model, train_split, val_split, spec.settings(), folder, torch_device,
                  desc=f"{spec.encoder} s{spec.seed}")
    for name, dataset_folder, split in data.eval_splits():
        if split not in splits_present(dataset_folder):
            continue
        loaded = load_split(dataset_folder, split, spec.image_size)
        probs = predict_proba(model, loaded.images, torch_device)
        with atomic.atomic_path(folder / f"probs_{name}_{split}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, ids=np.array(loaded.ids), probs=probs.astype(np.float16))
        metrics = per_image(probs > 0.5, loaded.masks)
        metrics.insert(0, "id", loaded.ids)
        atomic.write_csv(folder / f"metrics_{name}_{split}.csv", metrics)
    summary = {**asdict(spec), **asdict(outcome), "key": spec.key(), "folder": folder.name,
               "device": str(torch_device)}
    atomic.write_json(folder / "summary.json", summary)
    atomic.write_text(folder / DONE, "")
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # best.pt keeps the weights that matter
    return summary


def run_all(specs: Iterable[RunSpec], data: StudyData, store: Path, device: str = "auto",
            executor: Executor | None = None) -> list[dict]:
    specs = list(specs)
    executor = executor or SequentialExecutor(desc=f"{len(specs)} runs")
    return executor.map(partial(execute, data=data, store=store, device=device), specs)


def load_probs(store: Path, spec: RunSpec, dataset: str, split: str) -> tuple[list[str], np.ndarray]:
    """Cached probability maps of a finished run, as float32 [N, H, W] with their image ids."""
    path = run_folder(store, spec) / f"probs_{dataset}_{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no cached probabilities at {path}; run the stage that trains {spec.encoder} first")
    with np.load(path) as npz:
        return [str(i) for i in npz["ids"]], npz["probs"].astype(np.float32)


def load_metrics(store: Path, specs: Iterable[RunSpec], group: Callable[[RunSpec], str],
                 split: str = "test") -> pd.DataFrame:
    """Per-image metrics of finished runs as one long frame: group, run, dataset, id, metrics."""
    frames = []
    for spec in specs:
        for path in sorted(run_folder(store, spec).glob(f"metrics_*_{split}.csv")):
            frame = pd.read_csv(path, dtype={"id": str})
            frame.insert(0, "dataset", path.stem.split("_")[1])
            frame.insert(0, "run", spec.seed)
            frame.insert(0, "group", group(spec))
            frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"no per-image metrics for split {split!r} under {store}")
    return pd.concat(frames, ignore_index=True)

