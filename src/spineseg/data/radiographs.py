"""Reading new radiographs to segment: PNG, JPEG and DICOM, as grayscale in [0, 1].

DICOM pixel data get the modality rescale (slope and intercept) and, for MONOCHROME1 (bone dark),
an inversion, so bone is bright as in the training images; the result is scaled by its own range.
PNG and JPEG read as the dataset loader reads them (16-bit PNGs by the bits they use). A DICOM whose
modality is not a projection radiograph (a CT slice, an MR image, ...) is refused unless asked for.

What a model then sees of it is `spineseg.data.dataset.model_input`, the study loader's own resize.

Memory is bounded: values are float32, never float64 at the image's size, and an image of more than
`WORKING_PIXELS` (16.8 MP) that is far larger than the model needs (`REDUCED_MARGIN`) is read at a size
a whole number of times smaller (`load_radiograph`): a JPEG is decoded there (PIL's draft mode, 1/2 to 1/8),
a PNG is reduced right after decoding, with no float copy at its own size; a DICOM is decoded and scaled
as float32 at its own size (its pixel data go first), then reduced. Ordinary images are read
at their own size, exactly as the study's loader reads them. An image of more pixels than PIL's
decompression-bomb limit (`pixel_limit`: 179 MP by default) is refused before it is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spineseg.data.dataset import HIGH_BIT_MODES, bits_used, open_image, read_image
from spineseg.errors import DatasetError

PROJECTION_MODALITIES = ("CR", "DX", "RG")  # computed, digital and film radiography
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES
WORKING_PIXELS = 4096 * 4096  # an image with more is read at a reduced size, where the model allows it
REDUCED_MARGIN = 4  # ... and only so far that it stays at least this many times the size the model needs, both sides


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


@dataclass(frozen=True)
class Radiograph:
    """A radiograph as read for a model: its pixels, and the size of the image in the file.

    `pixels` has the image's own size unless it was read at a reduced size (see `load_radiograph`); then it is
    the whole image, `shape` / `pixels.shape` times smaller. A mask for it is made at `shape`."""

    pixels: np.ndarray  # float32 [h, w] in [0, 1]
    shape: tuple[int, int]  # (height, width) of the image in the file

    @property
    def reduced(self) -> bool:
        return self.pixels.shape != self.shape


def load_radiograph(path: Path, any_modality: bool = False, needed: tuple[int, int] | None = None) -> Radiograph:
    """One radiograph, float32 [H, W] in [0, 1]; a clear `DatasetError` when it cannot be read, and a DICOM of
    another modality than `PROJECTION_MODALITIES` refused unless `any_modality`. Read at a reduced size when it
    has more than `WORKING_PIXELS` pixels and `needed`, the largest (height, width) the model resizes it to, is
    far smaller (`reduction`). Beyond `pixel_limit` it is refused before decoding: PIL's `DecompressionBombError`
    for a PNG or JPEG, a `DatasetError` for a DICOM."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path, any_modality, needed)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_picture(path, needed)
    raise DatasetError(f"{path}: not a PNG, JPEG or DICOM file")


def pixel_limit() -> float:
    """The most pixels an image may have: twice `PIL.Image.MAX_IMAGE_PIXELS`, where PIL raises its
    `DecompressionBombError` (178,956,970 by default; infinite where PIL's check is switched off)."""
    return math.inf if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def reduction(shape: tuple[int, int], needed: tuple[int, int] | None) -> int:
    """The whole number each side of an image of `shape` is divided by when it is read: the least that brings it
    to `WORKING_PIXELS` or fewer, but no more than keeps it `REDUCED_MARGIN` times `needed` in both sides; 1 (read
    as it is) for an image within `WORKING_PIXELS`, or without a `needed` size."""
    height, width = shape
    if needed is None or height * width <= WORKING_PIXELS:
        return 1
    least = math.ceil(math.sqrt(height * width / WORKING_PIXELS))
    most = min(height // (REDUCED_MARGIN * needed[0]), width // (REDUCED_MARGIN * needed[1]))
    return max(1, min(least, most))


def _whole(img: Image.Image, scale: float, shape: tuple[int, int], factor: int) -> np.ndarray:
    """`img`, the image of `shape` decoded `scale` times smaller (its last row and column partly outside the image,
    where a side is no multiple of it), as float32 values at exactly `factor` times smaller than `shape`."""
    height, width = shape
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    box = (0.0, 0.0, width / scale, height / scale)
    if img.size != size or box != (0.0, 0.0, *img.size):
        img = img.resize(size, Image.BILINEAR, box=box)  # area-aware, as `model_input` resizes
    return np.asarray(img, dtype=np.float32)


def _read_picture(path: Path, needed: tuple[int, int] | None) -> Radiograph:
    with open_image(path, decode=False) as img:
        shape = img.size[::-1]
        factor = reduction(shape, needed)
        if factor > 1:
            try:
                return Radiograph(_reduced_picture(img, shape, factor), shape)
            except (OSError, SyntaxError, ValueError) as exc:
                raise DatasetError(f"unreadable image file {path} ({exc})") from None
    return Radiograph(read_image(path, dtype=np.float32), shape)  # as the study's loader reads it


def _reduced_picture(img: Image.Image, shape: tuple[int, int], factor: int) -> np.ndarray:
    """A PNG or JPEG as `read_image` reads it, but `factor` times smaller: a JPEG decoded at the largest of
    1/2, 1/4, 1/8 at most that small, then (every format) reduced by the whole factor left, by box averages of
    8-bit (or, high bit depths, 32-bit integer) values; only then float32, resized to exactly 1/`factor`."""
    drafted = img.draft("L", (math.ceil(shape[1] / factor), math.ceil(shape[0] / factor))) if img.format == "JPEG" else None
    scale = round(shape[1] / drafted[1][2]) if drafted else 1  # the draft's 1, 2, 4 or 8: (mode, box of the image in its pixels)
    img.load()
    if img.mode in HIGH_BIT_MODES:
        top = 2 ** bits_used(img.getextrema()[1]) - 1
        img = img.convert("I")
    else:
        top = 255
        img = img.convert("L")
    if factor // scale > 1:
        img, scale = img.reduce(factor // scale), scale * (factor // scale)
    values = np.asarray(img, dtype=np.float32)
    values /= top
    np.clip(values, 0.0, 1.0, out=values)
    return _whole(Image.fromarray(values, mode="F"), scale, shape, factor)


DICOM_PROBLEMS = (AttributeError, ValueError, RuntimeError, OSError, NotImplementedError)


def _unreadable(path: Path, exc: Exception) -> DatasetError:
    return DatasetError(f"{path}: unreadable DICOM ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def _read_dicom(path: Path, any_modality: bool, needed: tuple[int, int] | None) -> Radiograph:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, *DICOM_PROBLEMS) as exc:
        raise _unreadable(path, exc) from None
    modality = str(getattr(dataset, "Modality", "") or "none")
    if not any_modality and modality not in PROJECTION_MODALITIES:  # refused before its pixels are decoded
        raise DatasetError(f"{path}: DICOM modality {modality}, not a projection radiograph "
                           f"({', '.join(PROJECTION_MODALITIES)}); --any-modality reads it anyway")
    rows, columns, frames = (int(getattr(dataset, name, None) or 1) for name in ("Rows", "Columns", "NumberOfFrames"))
    samples = int(getattr(dataset, "SamplesPerPixel", None) or 1)
    if frames > 1:  # a cine or a stack: which frame is the radiograph is not for us to guess
        raise DatasetError(f"{path}: a DICOM of {frames} frames; export the one radiograph as a single-frame file")
    if samples not in (1, 3):
        raise DatasetError(f"{path}: {samples} samples per pixel; a radiograph has 1 (grayscale) or 3 (RGB)")
    if rows * columns * frames > pixel_limit():  # as PIL refuses a PNG or JPEG, before decoding
        raise DatasetError(f"{path}: {columns} x {rows} pixels{f' x {frames} frames' if frames > 1 else ''} "
                           f"({rows * columns * frames / 1e6:.3g} MP), over the limit of {pixel_limit() / 1e6:.3g} MP "
                           f"(PIL's decompression-bomb limit, which PNGs and JPEGs have too); refused before decoding")
    try:
        if "ModalityLUTSequence" in dataset:  # a table, not a line: applied as pydicom applies it
            pixels = np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float32)
        else:  # after the min-max scaling below, of a linear rescale only its slope's sign is left (pydicom's is float64)
            pixels = dataset.pixel_array.astype(np.float32)
            if float(getattr(dataset, "RescaleSlope", 1) or 1) < 0:
                np.negative(pixels, out=pixels)
    except DICOM_PROBLEMS as exc:
        raise _unreadable(path, exc) from None
    photometric = getattr(dataset, "PhotometricInterpretation", "")
    del dataset  # and the decoded pixel data it holds
    if not pixels.flags.writeable:
        pixels = pixels.copy()  # it is normalised in place
    if samples == 3:  # colour by the header, not by a last axis that happens to be 3 or 4 long
        pixels = pixels.mean(axis=-1, dtype=np.float32)
    if pixels.ndim != 2:
        raise DatasetError(f"{path}: expected one 2-D image, got pixel data of shape {pixels.shape}")
    if photometric == "MONOCHROME1":
        np.subtract(pixels.max(), pixels, out=pixels)
    low, high = pixels.min(), pixels.max()
    if high > low:
        pixels -= low
        pixels /= high - low
    else:
        pixels[:] = 0.0
    shape = pixels.shape
    factor = reduction(shape, needed)
    if factor > 1:
        pixels = _whole(Image.fromarray(pixels, mode="F").reduce(factor), factor, shape, factor)
    return Radiograph(pixels, shape)
