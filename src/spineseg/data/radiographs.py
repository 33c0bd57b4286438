"""Reading new radiographs to segment: PNG, JPEG and DICOM, as grayscale in [0, 1].

DICOM pixel data get the modality rescale (slope and intercept) and, for MONOCHROME1 (bone dark),
an inversion, so bone is bright as in the training images; the result is scaled by its own range.
PNG and JPEG read as the dataset loader reads them (16-bit PNGs by the bits they use). A DICOM whose
modality is not a projection radiograph (a CT slice, an MR image, ...) is refused unless asked for.

What a model then sees of it is `spineseg.data.dataset.model_input`, the study loader's own resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spineseg.data.dataset import read_image
from spineseg.errors import DatasetError

PROJECTION_MODALITIES = ("CR", "DX", "RG")  # computed, digital and film radiography
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


def read_radiograph(path: Path, any_modality: bool = False) -> np.ndarray:
    """One radiograph as float64 [H, W] in [0, 1]; a clear `DatasetError` when it cannot be read.

    A DICOM of another modality than `PROJECTION_MODALITIES` is refused unless `any_modality`."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path, any_modality)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image(path)
    raise DatasetError(f"{path}: not a PNG, JPEG or DICOM file")


DICOM_PROBLEMS = (AttributeError, ValueError, RuntimeError, OSError, NotImplementedError)


def _unreadable(path: Path, exc: Exception) -> DatasetError:
    return DatasetError(f"{path}: unreadable DICOM ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def _read_dicom(path: Path, any_modality: bool) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_rescale

    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, *DICOM_PROBLEMS) as exc:
        raise _unreadable(path, exc) from None
    modality = str(getattr(dataset, "Modality", "") or "none")
    if not any_modality and modality not in PROJECTION_MODALITIES:  # refused before its pixels are decoded
        raise DatasetError(f"{path}: DICOM modality {modality}, not a projection radiograph "
                           f"({', '.join(PROJECTION_MODALITIES)}); --any-modality reads it anyway")
    try:
        pixels = np.asarray(apply_rescale(dataset.pixel_array, dataset), dtype=np.float64)
    except DICOM_PROBLEMS as exc:
        raise _unreadable(path, exc) from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    if pixels.ndim != 2:
        raise DatasetError(f"{path}: expected one 2-D image, got pixel data of shape {pixels.shape}")
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    low, high = pixels.min(), pixels.max()
    return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
