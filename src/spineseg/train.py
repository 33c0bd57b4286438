"""Training one segmentation model: BCE, Adam, early stopping on validation DSC, resumable epochs.

Every epoch ends with an atomic checkpoint (model, optimiser, counters, history), so a run killed at
any point restarts from its last finished epoch. Data order and augmentation are reseeded per epoch
from (seed, epoch), which makes a resumed run take the same path as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from spineseg import atomic
from spineseg.augment import augment_batch, paper_augmentation
from spineseg.data import Split
from spineseg.metrics import dice


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 4
    lr: float = 1e-4
    max_epochs: int = 100
    patience: int = 10
    augment: bool = True
    seed: int = 0
    eval_batch_size: int = 8


@dataclass(frozen=True)
class TrainOutcome:
    best_val_dsc: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return torch.device(name)


def configure_threads(threads: int = 0) -> int:
    """Use every core for intra-op work (0 = all); inter-op threads only add contention here."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(images, dtype=np.float32))[:, None].to(device, non_blocking=True)  # own copy: cached splits are read-only


@torch.inference_mode()
def predict_proba(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 8) -> np.ndarray:
    """Sigmoid probabilities [N, H, W] for images [N, H, W] in [0, 1]."""
    model.eval()
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x = _to_tensor(images[start:start + batch_size], device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(x)
        out[start:start + len(x)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return out


def _save(path: Path, obj) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def fit(model: nn.Module, train: Split, val: Split, settings: TrainSettings, folder: Path,
        device: torch.device, desc: str = "train") -> TrainOutcome:
    """Train until early stopping or max epochs; on return the model holds its best-validation weights.

    ``folder`` receives ``checkpoint.pt`` (last epoch), ``best.pt`` (best weights) and ``history.csv``.
    """
    folder = Path(folder)
    checkpoint_path, best_path = folder / "checkpoint.pt", folder / "best.pt"
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    loss_fn = nn.BCEWithLogitsLoss()
    state = {"epoch": 0, "best_val_dsc": -1.0, "best_epoch": 0, "bad_epochs": 0, "finished": False,
             "history": [], "seconds": 0.0}
    if checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        # "finished" depends on the settings: called again with a larger max_epochs (or patience), go on
        state["finished"] = state["bad_epochs"] >= settings.patience or state["epoch"] >= settings.max_epochs
    augmentation = paper_augmentation() if settings.augment else None
    bar = tqdm(total=settings.max_epochs, initial=state["epoch"], desc=desc, unit="epoch", leave=False,
               mininterval=2.0, disable=state["finished"])
    while not state["finished"] and state["epoch"] < settings.max_epochs:
        epoch, started = state["epoch"], time.perf_counter()
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(train))
        if augmentation is not None:
            augmentation.set_random_seed(settings.seed * 1_000_003 + epoch)
        torch.manual_seed(settings.seed * 1_000_003 + epoch)  # dropout / stochastic depth replay on resume too
        model.train()
        losses = []
        for start in range(0, len(order), settings.batch_size):
            index = np.sort(order[start:start + settings.batch_size])
            images, masks = train.images[index], train.masks[index]
            if augmentation is not None:
                images, masks = augment_batch(augmentation, images, masks)
            x, y = _to_tensor(images, device), _to_tensor(masks, device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        val_dsc = float(dice(predict_proba(model, val.images, device, settings.eval_batch_size) > 0.5, val.masks).mean())
        state["epoch"] = epoch + 1
        if val_dsc > state["best_val_dsc"]:
            state.update(best_val_dsc=val_dsc, best_epoch=epoch + 1, bad_epochs=0)
            _save(best_path, model.state_dict())
        elif state["best_val_dsc"] > 0:
            # Patience starts once the model segments anything: from scratch, the first epochs can
            # predict no foreground at all (DSC 0) while the loss is still falling.
            state["bad_epochs"] += 1
        seconds = time.perf_counter() - started
        state["seconds"] += seconds
        state["history"].append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_dsc": val_dsc,
                                 "seconds": seconds})
        state["finished"] = state["bad_epochs"] >= settings.patience or state["epoch"] >= settings.max_epochs
        atomic.write_csv(folder / "history.csv", pd.DataFrame(state["history"]))
        _save(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scaler": scaler.state_dict(), "state": state})
        bar.update(1)
        bar.set_postfix(loss=f"{state['history'][-1]['train_loss']:.4f}", val_dsc=f"{val_dsc:.4f}",
                        best=f"{state['best_val_dsc']:.4f}")
    bar.close()
    model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    return TrainOutcome(best_val_dsc=state["best_val_dsc"], best_epoch=state["best_epoch"],
                        epochs_run=state["epoch"], stopped_early=state["epoch"] < settings.max_epochs,
                        seconds=state["seconds"])
