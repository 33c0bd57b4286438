"""Training one segmentation model: Adam, early stopping on validation DSC, resumable epochs.

The loss is the objective's (BCE for the article's binary target, cross-entropy + Dice for levels).

Every epoch ends with one atomic checkpoint (model, optimiser, counters, history and the best
weights), so a run killed at any point restarts from its last finished epoch. ``best.pt`` and
``history.csv`` are derived from the checkpoint after it is written, and rewritten from it on
resume, so the three never disagree about the epoch. Checkpoints are read with
``weights_only=True``: a crafted file cannot run code. Data order and augmentation are reseeded per
epoch from (seed, epoch), which makes a resumed run take the same path as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spineseg import atomic
from spineseg.augment import AUGMENTATIONS, augment_batch
from spineseg.data import Split
from spineseg.device import autocast, resolve_precision
from spineseg.errors import SpinesegError
from spineseg.metrics import ARTICLE_THRESHOLD, dice
from spineseg.objectives import coordinate_planes
from spineseg.predict import Segmenter, as_batch, predict_proba
from spineseg.saved_models import BEST, CHECKPOINT, HISTORY

# What `fit` leaves in its folder.


OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop, "adamax": torch.optim.Adamax}
WARMUP_EPOCHS = 1  # the cosine schedule's first epoch climbs from a tenth of the rate


def _cosine(lr: float, epoch: int, epochs: int) -> float:
    if epoch < WARMUP_EPOCHS:
        return lr / 10
    return lr * 0.5 * (1 + np.cos(np.pi * (epoch - WARMUP_EPOCHS) / max(epochs - WARMUP_EPOCHS, 1)))


LR_SCHEDULES = {"constant": lambda lr, epoch, epochs: lr, "cosine": _cosine}


@dataclass(frozen=True)
class TrainSettings:
    """The hyperparameters of one training run (the study declares their values)."""

    batch_size: int
    lr: float
    max_epochs: int
    patience: int
    augment: bool
    seed: int
    target: str = "binary"  # what the model learns: `spineseg.objectives.TARGETS`
    coordinates: bool = False  # row and column planes as extra input channels
    crop_height: int = 0  # train on random full-width crops this tall (0: whole images)
    precision: str = "auto"  # `spineseg.device.autocast`
    optimizer: str = "adam"  # `OPTIMIZERS`: the article's Adam, or RMSprop / Adamax (Dastgir et al.)
    eval_batch_size: int = 8
    augmentation: str = "paper"  # `spineseg.augment.AUGMENTATIONS`, when `augment`
    lr_schedule: str = "constant"  # `LR_SCHEDULES`: the article's constant rate, or a cosine decay over max_epochs
    # the share of max_epochs before which no checkpoint is chosen (0: any epoch): where the validation score is a
    # noisy count of a few dozen images, an early lucky epoch would stop a cosine schedule long before it anneals
    choose_after: float = 0.0

    @property
    def first_eligible(self) -> int:
        """The first epoch (from 1) whose checkpoint may be chosen."""
        return max(1, int(np.ceil(self.choose_after * self.max_epochs)))

    def lr_at(self, epoch: int) -> float:
        """The learning rate of an epoch (from 0): a function of the epoch alone, so a resumed run follows it too."""
        return LR_SCHEDULES[self.lr_schedule](self.lr, epoch, self.max_epochs)


@dataclass(frozen=True)
class TrainOutcome:
    best_val_dsc: float  # the best validation score: mean DSC, or what `fit`'s `score` measures (a locator's identification)
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float


@dataclass
class _Progress:
    """Everything about a run's epochs that a checkpoint restores."""

    epoch: int = 0
    best_val_dsc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    def finished(self, settings: TrainSettings) -> bool:
        # Derived from the settings, not stored: called again with more epochs (or patience), go on.
        return self.bad_epochs >= settings.patience or self.epoch >= settings.max_epochs

    def record(self, val_dsc: float, train_loss: float, seconds: float, eligible: bool = True) -> bool:
        """Book one finished epoch; True when it is the best so far. An epoch not `eligible` to be chosen (before
        `TrainSettings.first_eligible`) neither becomes the best nor spends patience."""
        self.epoch += 1
        improved = eligible and val_dsc > self.best_val_dsc
        if improved:
            self.best_val_dsc, self.best_epoch, self.bad_epochs = val_dsc, self.epoch, 0
        elif eligible and self.best_val_dsc > 0:
            # Patience starts once the model segments anything: from scratch, the first epochs can
            # predict no foreground at all (DSC 0) while the loss is still falling.
            self.bad_epochs += 1
        self.seconds += seconds
        self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_dsc": val_dsc, "seconds": seconds})
        return improved

    def outcome(self, settings: TrainSettings) -> TrainOutcome:
        return TrainOutcome(best_val_dsc=self.best_val_dsc, best_epoch=self.best_epoch, epochs_run=self.epoch,
                            stopped_early=self.epoch < settings.max_epochs, seconds=self.seconds)


@dataclass
class Trainer:
    """A model with its optimiser and loss: one gradient step at a time."""

    model: Segmenter
    device: torch.device
    lr: float
    precision: str = "auto"
    optimizer_name: str = "adam"

    def __post_init__(self) -> None:
        self.model.to(self.device)
        self.optimizer = OPTIMIZERS[self.optimizer_name](self.model.parameters(), lr=self.lr)
        fp16 = resolve_precision(self.precision, self.device) == "fp16"  # bf16 has fp32's range: no scaling
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)

    def step(self, images: np.ndarray, targets: np.ndarray, planes: np.ndarray | None = None) -> float:
        """One optimiser step on [B, H, W] images and targets (masks or level classes); returns the loss."""
        x = as_batch(images, self.device)
        y = torch.from_numpy(np.array(targets)).to(self.device)
        planes = None if planes is None else torch.from_numpy(planes).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.model.objective.loss(self.model.logits(x, planes), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])


def _crop(images: np.ndarray, targets: np.ndarray, planes: np.ndarray, height: int, rng: np.random.Generator):
    """Random full-width crops `height` rows tall; the planes keep each crop's place in its radiograph."""
    tops = rng.integers(0, images.shape[1] - height + 1, size=len(images))
    rows = tops[:, None] + np.arange(height)
    take = np.arange(len(images))[:, None]
    return images[take, rows], targets[take, rows], planes[take, :, rows].transpose(0, 2, 1, 3)


def train_epoch(trainer: Trainer, train: Split, settings: TrainSettings, epoch: int, augmentation) -> float:
    """One pass over the training split in the (seed, epoch) order; returns the mean loss."""
    rng = np.random.default_rng([settings.seed, epoch])
    order = rng.permutation(len(train))
    starts = list(range(0, len(order), settings.batch_size))
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()  # a lone last image joins the batch before it: BatchNorm cannot normalise one 1×1 map
    if augmentation is not None:
        augmentation.set_random_seed(settings.seed * 1_000_003 + epoch)
    torch.manual_seed(settings.seed * 1_000_003 + epoch)  # dropout / stochastic depth replay on resume too
    for group in trainer.optimizer.param_groups:
        group["lr"] = settings.lr_at(epoch)
    trainer.model.train()
    objective = trainer.model.objective
    targets = objective.targets(train)
    losses = []
    for start, end in zip(starts, [*starts[1:], len(order)]):
        index = np.sort(order[start:end])
        images, batch_targets = train.images[index], targets[index]
        if augmentation is not None:
            images, batch_targets = augment_batch(augmentation, images, batch_targets, keep_levels=objective.keeps_levels_in_view)
        planes = None
        if settings.crop_height and settings.crop_height < images.shape[1]:
            full = np.broadcast_to(coordinate_planes(*images.shape[1:]), (len(images), 2, *images.shape[1:]))
            images, batch_targets, planes = _crop(images, batch_targets, full, settings.crop_height, rng)
        losses.append(trainer.step(images, batch_targets, planes if trainer.model.coordinates else None))
    return float(np.mean(losses))


def _validation_dsc(model: Segmenter, val: Split, device: torch.device, batch_size: int, precision: str = "auto") -> float:
    """Mean per-image DSC at the article's T: the early-stopping criterion of a segmentation model."""
    return float(dice(predict_proba(model, val.images, device, batch_size, precision) > ARTICLE_THRESHOLD, val.masks).mean())


def _save(path: Path, obj) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_derived(folder: Path, saved: dict, best_changed: bool = True) -> None:
    """best.pt (unless the epoch kept the best weights best.pt already holds), then history.csv (its row count
    marks both as current) from a committed checkpoint."""
    if best_changed or not (folder / BEST).is_file():
        _save(folder / BEST, saved["best_model"])
    atomic.write_csv(folder / HISTORY, pd.DataFrame(saved["state"]["history"]))


def _derived_are_current(folder: Path, epoch: int) -> bool:
    try:
        return (folder / BEST).is_file() and len(pd.read_csv(folder / HISTORY)) == epoch
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return False


def _resume(folder: Path, trainer: Trainer) -> tuple[_Progress, dict | None]:
    """The progress (and best weights) of the last finished epoch; a fresh start without a checkpoint."""
    atomic.remove_stale_temporaries(folder)  # a kill during a write leaves one; nobody else writes here
    path = folder / CHECKPOINT
    if not path.is_file():
        return _Progress(), None
    try:
        saved = torch.load(path, map_location=trainer.device, weights_only=True)
        trainer.load(saved)
        progress = _Progress(**{key: saved["state"][key] for key in _Progress.__dataclass_fields__})
    except Exception as exc:
        raise SpinesegError(f"cannot resume from {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                            f"delete {folder} to train this run from the start") from None
    if not _derived_are_current(folder, progress.epoch):
        _write_derived(folder, saved)
    return progress, saved["best_model"]


def _checkpoint(folder: Path, trainer: Trainer, progress: _Progress, best_model: dict, improved: bool) -> None:
    saved = {**trainer.state(), "best_model": best_model, "state": asdict(progress)}
    _save(folder / CHECKPOINT, saved)
    _write_derived(folder, saved, best_changed=improved)


def fit(model: Segmenter, train: Split, val: Split, settings: TrainSettings, folder: Path,
        device: torch.device, desc: str = "train", score: Callable[[Segmenter], float] | None = None) -> TrainOutcome:
    """Train until early stopping or max epochs; on return the model holds its best-validation weights.

    ``folder`` receives ``checkpoint.pt`` (last epoch), ``best.pt`` (best weights) and ``history.csv``;
    one process at a time may train in it. ``score`` measures the model on validation after each epoch
    (higher is better; default: mean DSC on `val`).
    """
    if score is None:
        score = partial(_validation_dsc, val=val, device=device, batch_size=settings.eval_batch_size, precision=settings.precision)
    folder = Path(folder)
    trainer = Trainer(model, device, settings.lr, settings.precision, settings.optimizer)
    progress, best_model = _resume(folder, trainer)
    augmentation = AUGMENTATIONS[settings.augmentation]() if settings.augment else None
    bar = tqdm(total=settings.max_epochs, initial=progress.epoch, desc=desc, unit="epoch", leave=False,
               mininterval=2.0, disable=progress.finished(settings))
    while not progress.finished(settings):
        started = time.perf_counter()
        loss = train_epoch(trainer, train, settings, progress.epoch, augmentation)
        val_dsc = score(model)
        eligible = progress.epoch + 1 >= settings.first_eligible
        improved = progress.record(val_dsc, loss, time.perf_counter() - started, eligible)
        if improved or not eligible:  # before an epoch may be chosen, best.pt holds the latest weights
            best_model = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        _checkpoint(folder, trainer, progress, best_model, improved or not eligible)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", val_dsc=f"{val_dsc:.4f}", best=f"{progress.best_val_dsc:.4f}")
    bar.close()
    model.load_state_dict(best_model)
    return progress.outcome(settings)
