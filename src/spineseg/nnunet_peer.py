"""nnU-Net v2, the method a user would pick instead, trained at a set budget on a study's split (`spineseg.data.nnunet`).

nnU-Net keeps its own plan (patch, batch, network, augmentation, loss, learning rate and its polynomial decay):
the budget sets only how many epochs of how many iterations it trains, so that it can be given the CPU time the
study's own models had. The final checkpoint predicts the exported test images with nnU-Net's own sliding
window and mirroring, as ``nnUNetv2_predict`` would.

It runs in a child process (``python -m spineseg.nnunet_peer``): nnU-Net reads its three folders from the
environment when it is imported and starts augmentation workers of its own. Inside one work folder:

    nnUNet_raw/Dataset<id>_<name>/   the export (the caller writes it, `spineseg.data.nnunet.export_nnunet`)
    nnUNet_preprocessed/, nnUNet_results/   nnU-Net's own folders; a checkpoint after every epoch, so a rerun resumes
    predictions/<case>.npz           foreground probability of every test image (nnU-Net's ``probabilities``)
    nnunet.log                       everything nnU-Net printed
    minutes.json                     the minutes of each step so far, summed over interrupted attempts
    summary.json                     written last: the plan, the budget, the minutes of each step

nnU-Net (the ``nnunet`` install extra, the registry's ``nnunetv2``) is needed only here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spineseg import atomic
from spineseg.errors import ConfigError, SpinesegError, StageOrderError

RAW, PREPROCESSED, RESULTS = "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"
PREDICTIONS, LOG, TIMING, SUMMARY = "predictions", "nnunet.log", "minutes.json", "summary.json"
CONFIGURATION = "2d"  # a radiograph is one slice
FOLD = 0  # the export's splits_final.json holds one fold: the study's own train / validation split
TRAINER = "nnUNetTrainer_spinesegBudget"
PROGRESS = "spineseg-progress:"  # the child's lines that move the parent's progress bars


class NnUNetFailed(SpinesegError, RuntimeError):
    """nnU-Net's child process stopped with an error; the message names its log."""


@dataclass(frozen=True)
class Budget:
    """How long nnU-Net trains: `epochs` of `iterations` batches (nnU-Net's default: 1000 × 250), each epoch
    followed by `validation_iterations` batches of its running validation Dice, which only logs."""

    epochs: int
    iterations: int
    validation_iterations: int
    augmentation_workers: int = 1  # nnU-Net's background augmentation processes (nnUNet_n_proc_DA)
    threads: int = 0  # torch threads in the trainer; 0: every core

    @property
    def batches(self) -> int:
        return self.epochs * self.iterations


def available() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def require() -> None:
    """One clear line where nnU-Net is missing, before any work starts."""
    if not available():
        raise ConfigError("nnunet.enabled needs nnU-Net v2, which is not installed: pip install -e '.[nnunet]' "
                          "(`make study PROFILE=<profile>` installs it for a profile with an nnunet section), or set nnunet.enabled: false")


def dataset_folder(work: Path, dataset_id: int) -> Path:
    """The export inside `work` (there must be exactly one Dataset<id>_* folder)."""
    found = sorted((Path(work) / RAW).glob(f"Dataset{dataset_id:03d}_*"))
    if len(found) != 1:
        raise StageOrderError(f"{Path(work) / RAW}: expected one Dataset{dataset_id:03d}_* export, found {len(found)}")
    return found[0]


def train_and_predict(work: Path, dataset_id: int, budget: Budget, device: str = "cpu") -> dict:
    """Plan, preprocess, train and predict on `device` ("cpu" or "cuda") in a child process, each step skipped
    when done; return summary.json. Progress bars count the epochs and the test images; everything nnU-Net
    prints goes to the work folder's log."""
    require()
    work = Path(work)
    if (work / SUMMARY).is_file():  # written last: nothing left to do
        return read_summary(work)
    dataset_folder(work, dataset_id)
    env = os.environ | {RAW: str(work / RAW), PREPROCESSED: str(work / PREPROCESSED), RESULTS: str(work / RESULTS),
                        "nnUNet_n_proc_DA": str(budget.augmentation_workers), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "spineseg.nnunet_peer", str(work), str(dataset_id), json.dumps(asdict(budget)), device]
    tail: deque[str] = deque(maxlen=20)
    bars = {"epoch": tqdm(total=budget.epochs, desc="nnU-Net epochs", unit="epoch"),
            "image": tqdm(total=len(list((dataset_folder(work, dataset_id) / "imagesTs").glob("*.png"))),
                          desc="nnU-Net test images", unit="image")}
    with (work / LOG).open("a") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in process.stdout:
                log.write(line)
                tail.append(line.rstrip())
                if line.startswith(PROGRESS):  # "<PROGRESS> epoch|image <done>"
                    kind, done = line.split()[1:3]
                    bars[kind].update(int(done) - bars[kind].n)
        finally:
            if process.poll() is None:  # interrupted: nnU-Net's last epoch checkpoint stays for the rerun
                process.terminate()
            process.wait()
            for bar in bars.values():
                bar.close()
    if process.returncode:
        raise NnUNetFailed(f"nnU-Net stopped (exit {process.returncode}); its output is in {work / LOG}; last lines:\n"
                           + "\n".join(tail))
    return read_summary(work)


def read_summary(work: Path) -> dict:
    path = Path(work) / SUMMARY
    if not path.is_file():
        raise StageOrderError(f"no {path}: nnU-Net has not finished there")
    return json.loads(path.read_text())


def foreground_probability(work: Path, case: str) -> np.ndarray:
    """nnU-Net's probability of Th8–Th11 for one exported test case, [H, W] at the exported image's size."""
    path = Path(work) / PREDICTIONS / f"{case}.npz"
    if not path.is_file():
        raise StageOrderError(f"nnU-Net has no prediction for {case} at {path}: rerun the stage that trains it")
    with np.load(path) as saved:
        probabilities = saved["probabilities"]  # [classes, (1,) H, W]
    return np.asarray(probabilities[1], dtype=np.float32).reshape(probabilities.shape[-2:])


# ---- the child process: everything below imports nnU-Net ------------------------------------------------------


def _trainer_class(budget: Budget):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class Trainer(nnUNetTrainer):
        # nnU-Net saves the constructor's arguments by name to rebuild a trainer: keep its signature
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device | None = None):
            super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cpu"))
            self.num_epochs = budget.epochs
            self.num_iterations_per_epoch = budget.iterations
            self.num_val_iterations_per_epoch = budget.validation_iterations
            self.save_every = 1  # a checkpoint after every epoch: an interrupted run resumes there

        def on_epoch_end(self):
            super().on_epoch_end()
            print(f"{PROGRESS} epoch {self.current_epoch}", flush=True)

    Trainer.__name__ = Trainer.__qualname__ = TRAINER
    return Trainer


def _plan(dataset_id: int, raw: Path, preprocessed: Path) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    target = preprocessed / raw.name
    if not (target / "nnUNetPlans.json").is_file():
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
        plan_experiments([dataset_id])
    if not (target / "nnUNetPlans_2d").is_dir() or not (target / "splits_final.json").is_file():
        preprocess([dataset_id], configurations=(CONFIGURATION,), num_processes=(1,))
        shutil.copyfile(raw / "splits_final.json", target / "splits_final.json")  # our split, not five random folds


def _child(work: Path, dataset_id: int, budget: Budget, device_name: str) -> None:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(budget.threads or os.cpu_count() or 1)
    device = torch.device(device_name)
    raw = dataset_folder(work, dataset_id)
    clock = _Clock(work / TIMING)
    with clock("plan_and_preprocess"):
        _plan(dataset_id, raw, work / PREPROCESSED)
    plans = load_json(work / PREPROCESSED / raw.name / "nnUNetPlans.json")
    plans["continue_training"] = False  # nnU-Net 2.8 reads this key; resuming is done below
    trainer = _trainer_class(budget)(plans, CONFIGURATION, FOLD, load_json(raw / "dataset.json"), device)
    final, latest = (Path(trainer.output_folder) / name for name in ("checkpoint_final.pth", "checkpoint_latest.pth"))
    if final.is_file():
        trainer.load_checkpoint(str(final))
    else:
        with clock("train"):
            if latest.is_file():
                trainer.load_checkpoint(str(latest))
                print(f"resuming nnU-Net after epoch {trainer.current_epoch} of {budget.epochs}", flush=True)
            print(f"{PROGRESS} epoch {trainer.current_epoch}", flush=True)
            trainer.run_training()
    print(f"{PROGRESS} epoch {trainer.current_epoch}", flush=True)
    trainer.set_deep_supervision_enabled(False)
    predictor = nnUNetPredictor(use_mirroring=True, perform_everything_on_device=device.type != "cpu", device=device,
                                allow_tqdm=True)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()],
                                    trainer.dataset_json, TRAINER, trainer.inference_allowed_mirroring_axes)
    (work / PREDICTIONS).mkdir(exist_ok=True)
    for done, image in enumerate(sorted((raw / "imagesTs").glob("*_0000.png")), start=1):
        case = image.name.removesuffix("_0000.png")
        target = work / PREDICTIONS / f"{case}.npz"
        if not target.is_file():  # a rerun predicts only what is missing; a file is whole once it has its name
            partial = work / PREDICTIONS / f".{case}.partial"
            with clock("predict"):
                predictor.predict_from_files_sequential([[str(image)]], [str(partial)], save_probabilities=True)
            os.replace(f"{partial}.npz", target)
            for byproduct in (".png", ".pkl"):  # nnU-Net's mask and properties beside it: not read
                Path(f"{partial}{byproduct}").unlink(missing_ok=True)
        print(f"{PROGRESS} image {done}", flush=True)
    configuration = trainer.configuration_manager
    folds = load_json(raw / "splits_final.json")[FOLD]
    atomic.write_json(work / SUMMARY, {
        "nnunetv2": _version("nnunetv2"), "configuration": CONFIGURATION,
        "patch_size": list(configuration.patch_size), "batch_size": configuration.batch_size,
        "budget": asdict(budget), "batches": budget.batches, "epochs_run": trainer.current_epoch,
        "training_cases": len(folds["train"]), "validation_cases": len(folds["val"]),
        "test_cases": len(list((work / PREDICTIONS).glob("*.npz"))), "mirroring": True,
        "device": device.type, "threads": torch.get_num_threads(),
        "minutes": {step: round(clock.minutes.get(step, 0.0), 2) for step in ("plan_and_preprocess", "train", "predict")}})


class _Clock:
    """Minutes per step, summed over every attempt and kept in a file: a resumed run reports all its time."""

    def __init__(self, path: Path):
        self.path = path
        self.minutes: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextmanager
    def __call__(self, step: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.minutes[step] = self.minutes.get(step, 0.0) + (time.monotonic() - start) / 60
            atomic.write_json(self.path, self.minutes)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    _child(Path(sys.argv[1]), int(sys.argv[2]), Budget(**json.loads(sys.argv[3])), sys.argv[4])
