"""Reading new radiographs to segment: PNG, JPEG and DICOM, as grayscale in [0, 1].

DICOM pixel data get the modality rescale (slope and intercept) and, for MONOCHROME1 (bone dark),
an inversion, so bone is bright as in the training images; the result is scaled by its own range.
PNG and JPEG read as the dataset loader reads them (16-bit PNGs by the bits they use).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spineseg.data.dataset import read_image
from spineseg.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES


def find_radiographs(source: str | Path) -> list[Path]:
    """A file, or every PNG, JPEG and DICOM file below a folder (sorted)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DatasetError(f"input {source} does not exist")
    found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not found:
        raise DatasetError(f"no PNG, JPEG or DICOM files under {source}")
    return found


def read_radiograph(path: Path) -> np.ndarray:
    """One radiograph as float64 [H, W] in [0, 1]; a clear `DatasetError` when it cannot be read."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image(path)
    raise DatasetError(f"{path}: not a PNG, JPEG or DICOM file")


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_rescale

    try:
        dataset = pydicom.dcmread(path)
        pixels = np.asarray(apply_rescale(dataset.pixel_array, dataset), dtype=np.float64)
    except (InvalidDicomError, AttributeError, ValueError, RuntimeError, OSError, NotImplementedError) as exc:
        raise DatasetError(f"{path}: unreadable DICOM ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    if pixels.ndim != 2:
        raise DatasetError(f"{path}: expected one 2-D image, got pixel data of shape {pixels.shape}")
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    low, high = pixels.min(), pixels.max()
    return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
