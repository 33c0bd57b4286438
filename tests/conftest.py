"""Shared fixtures for the core-module tests: tiny synthetic datasets and a network guard.

Everything here is small on purpose (64 × 64 images, tens of samples): `make check`, the ~610 tests not
marked slow, ran in 1 min 49 s in a fresh clone on a 2-core CPU machine (2026-12-05; 2 min 16 s before #27's
savings: no fsync in tests, shared training runs); `make test` adds the slow ones (smoke study, Dask, bench):
7 min 48 s, same clone and day.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from spineseg.data import Sample, write_dataset

# CI must not flake: the same examples on every run there; locally hypothesis keeps exploring.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def rectangle_samples(n: int, size: int = 64, seed: int = 0, prefix: str = "img") -> list[Sample]:
    """``n`` images of one bright rectangle on dark noise, with the rectangle as the mask.

    Intensity alone separates foreground from background, so a small network learns it in a few
    epochs; the rectangles vary in size and place so the task is not a constant.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = rng.integers(0, 60, size=(size, size)).astype(np.uint8)
        mask = np.zeros((size, size), dtype=bool)
        h, w = rng.integers(size // 4, size // 2, size=2)
        top, left = rng.integers(2, size - h - 2), rng.integers(2, size - w - 2)
        mask[top:top + h, left:left + w] = True
        image[mask] = rng.integers(170, 230, size=int(mask.sum())).astype(np.uint8)
        samples.append(Sample(id=f"{prefix}{i:03d}", image=image, mask=mask))
    return samples


def write_rectangles(root: Path, name: str, n: int, size: int = 64, seed: int = 0, **kwargs) -> Path:
    """Write ``n`` rectangle samples as a dataset folder ``root/name`` (kwargs go to write_dataset)."""
    return write_dataset(root, name, rectangle_samples(n, size=size, seed=seed), seed=seed, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def no_fsync():
    """Atomic writes skip `os.fsync` in the test process: it only makes a file survive a power cut, which no test
    makes (what a ``kill -9`` leaves is in the page cache either way), and the suite's 4,000-odd calls cost 5-15 s of
    `make check`. The rename that makes a write atomic is untouched; child processes (kill -9, leases) still sync."""
    patch = pytest.MonkeyPatch()
    patch.setattr(os, "fsync", lambda fd: None)
    yield
    patch.undo()


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """20 images of 64 × 64 with their masks, split 70/10/20 (14/2/4); returns the dataset folder."""
    return write_rectangles(tmp_path, "tiny", 20)


@pytest.fixture(scope="session")
def train_val_folder(tmp_path_factory) -> Path:
    """A 20-image dataset split 80/20/0 (16 train, 4 val) for the training tests, written once."""
    return write_rectangles(tmp_path_factory.mktemp("trainval"), "rects", 20, seed=1, fractions=(0.8, 0.2, 0.0))


@pytest.fixture
def block_network(monkeypatch) -> list:
    """Refuse every internet connection (as an OSError, like an unplugged cable) and record it.

    Returns the list of attempted addresses, so a test can assert that nothing even tried: the
    refusal alone would be invisible where the code under test catches all exceptions.
    """
    attempts: list = []

    def refuse(address):
        attempts.append(address)
        raise OSError(f"network access is blocked in tests (tried {address!r})")

    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)

    def guarded_connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(host))
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    return attempts


@pytest.fixture
def torch_single_thread():
    """Run a test with one torch intra-op thread (no OpenMP fight for the two cores), then restore."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def column_samples(n: int, height: int = 96, width: int = 32, seed: int = 0, prefix: str = "col") -> list[Sample]:
    """``n`` tall images of a column of bright boxes, one per level Th4..L1 with dark gaps, labelled with
    level codes; the mask is Th8–Th11. The column starts at a random height, so position alone does not
    name the levels."""
    from spineseg.vertebrae import region_mask

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = rng.integers(0, 50, size=(height, width)).astype(np.uint8)
        labels = np.zeros((height, width), dtype=np.uint8)
        top = int(rng.integers(2, 10))
        for code in range(4, 14):
            box = slice(top, top + 6), slice(width // 2 - 6, width // 2 + 6)
            labels[box] = code
            image[box] = rng.integers(150, 230)
            top += 8
        samples.append(Sample(id=f"{prefix}{i:03d}", image=image, mask=region_mask(labels), labels=labels))
    return samples


def write_dicom(path: Path, pixels: np.ndarray, monochrome1: bool = False, slope: float = 1.0, intercept: float = 0.0,
                modality: str = "DX") -> None:
    """A 12-bit grayscale DICOM of `pixels` with the given rescale, photometric interpretation and modality."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def running(pid: int) -> bool:
    """A process not gone and not merely a zombie waiting to be reaped (Linux's /proc): the Ctrl-C tests' check
    that no kernel outlived a run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# `spineseg predict --model` in this interpreter, then every spineseg module it loaded
LOADED_BY_PREDICT = """import sys
from spineseg.cli import main
status = main(["predict", "--model", sys.argv[1], "--input", sys.argv[2], "--out", sys.argv[3]])
print(*sorted(name for name in sys.modules if name.startswith("spineseg")))
sys.exit(status)
"""


def assert_no_training_code(modules: list[str]) -> None:
    """A bundle predicts where the study never ran: no training loop, run store, stage, report or deployment."""
    assert "spineseg.study.inference.apply" in modules and "spineseg.study.inference.bundle" in modules
    forbidden = [name for name in modules if name in ("spineseg.train", "spineseg.augment", "spineseg.study.deployment")
                 or name.startswith(("spineseg.study.runs", "spineseg.study.stages", "spineseg.study.report"))]
    assert not forbidden, forbidden
