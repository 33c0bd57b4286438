"""Two-stage segmentation: locate Th8–Th11 on the whole radiograph, then segment a crop around it.

A whole-radiograph model sees the four vertebrae at a fraction of the resolution it is given; a
second model that sees only a box around the located region (a vertebra or so of margin above and
below, the crop model's aspect ratio) outlines them at several times that resolution. The crop
model is trained on boxes around the true region, jittered by a fraction of a vertebra so that it
learns to follow an imperfect locator; at inference its probabilities are pasted back into the
radiograph, zero outside the box. Boxes may reach past the image: the crop is zero-padded there.
A box frames the located region's main piece, not every located pixel: one false-positive speck far
from the spine would otherwise stretch the box (and shrink the crop's detail) several times.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage

from spineseg.data import Split
from spineseg.predict import Segmenter, as_batch, resample
from spineseg.vertebrae import REGION_CODES

VERTEBRAE_IN_REGION = len(REGION_CODES)


@dataclass(frozen=True)
class Box:
    """A crop in image pixels; it may extend past the image."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class CropGeometry:
    """How a located region becomes a crop box."""

    size: tuple[int, int]  # (height, width) the crop model sees
    margin: float = 1.0  # vertebrae added above and below the region (a region is four vertebrae)
    jitter: float = 0.4  # training only: the largest shift, in vertebrae, of a box off the true region
    scale_jitter: float = 0.1  # training only: the largest relative change of a box's size
    copies: int = 2  # training only: jittered crops of each image

    def exact(self) -> CropGeometry:
        """The same boxes without jitter, one per image: how validation crops are cut."""
        return replace(self, jitter=0.0, scale_jitter=0.0, copies=1)

    def box(self, mask: np.ndarray, shift: float = 0.0, scale: float = 1.0) -> Box | None:
        """The box around a region mask's main piece [H, W] (None when the mask is empty), of the crop's aspect ratio."""
        rows, cols = np.nonzero(main_region(mask))
        if rows.size == 0:
            return None
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        vertebra = (bottom - top) / VERTEBRAE_IN_REGION
        height = (bottom - top + 2 * self.margin * vertebra) * scale
        width = max((right - left) * (1 + self.margin / VERTEBRAE_IN_REGION * 2) * scale,
                    height * self.size[1] / self.size[0])
        height = max(height, width * self.size[0] / self.size[1])
        centre_row, centre_col = (top + bottom) / 2 + shift * vertebra, (left + right) / 2
        return Box(int(round(centre_row - height / 2)), int(round(centre_col - width / 2)),
                   max(int(round(height)), 1), max(int(round(width)), 1))

    def jittered_box(self, mask: np.ndarray, rng: np.random.Generator) -> Box | None:
        """A training box: the true region's, shifted and scaled at random."""
        shift = rng.uniform(-self.jitter, self.jitter)
        scale = 1.0 + rng.uniform(-self.scale_jitter, self.scale_jitter)
        return self.box(mask, shift, scale)


def main_region(mask: np.ndarray) -> np.ndarray:
    """The located region without far-away false positives: its largest connected piece and the pieces
    chained to it by gaps shorter than that piece is tall.

    Th8–Th11 is four vertebrae with disc gaps between them, so the largest piece may be one vertebra;
    the gaps are far shorter than a vertebra, so the other three join it, while a speck a region away
    does not.
    """
    mask = np.asarray(mask, dtype=bool)
    pieces, count = ndimage.label(mask)
    if count <= 1:
        return mask
    largest = np.argmax(ndimage.sum_labels(mask, pieces, range(1, count + 1))) + 1
    rows = np.nonzero((pieces == largest).any(axis=1))[0]
    bridged, _ = ndimage.label(ndimage.maximum_filter(mask, size=rows[-1] - rows[0] + 1))
    return mask & (bridged == bridged[pieces == largest][0])


def _padded_slices(box: Box, shape: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where the box meets the image: the same pixels as slices of the image and of the box."""
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.height, shape[0]), min(box.left + box.width, shape[1])
    if bottom <= top or right <= left:
        return (slice(0, 0), slice(0, 0)), (slice(0, 0), slice(0, 0))
    image = (slice(top, bottom), slice(left, right))
    inside = (slice(top - box.top, bottom - box.top), slice(left - box.left, right - box.left))
    return image, inside


def cut(image: np.ndarray, box: Box, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """The box's pixels of image [H, W] (zero past the image), resized to `size`."""
    canvas = np.zeros((box.height, box.width), dtype=np.float32)
    image_part, box_part = _padded_slices(box, image.shape)
    canvas[box_part] = image[image_part]
    return resample(canvas[None], size, nearest)[0]


def paste(crop: np.ndarray, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """A crop's map put back at the box's place in an image of `shape`, zero elsewhere."""
    full = np.zeros(shape, dtype=np.float32)
    image_part, box_part = _padded_slices(box, shape)
    full[image_part] = resample(np.asarray(crop, dtype=np.float32)[None], (box.height, box.width))[0][box_part]
    return full


def training_crops(split: Split, geometry: CropGeometry, seed: int) -> Split:
    """`geometry.copies` jittered crops of each image around its true region (images without one are left out)."""
    rng = np.random.default_rng(seed)
    ids, images, masks, patients = [], [], [], []
    for index, mask in enumerate(split.masks):
        for copy in range(geometry.copies):
            box = geometry.jittered_box(mask, rng)
            if box is None:
                break
            ids.append(f"{split.ids[index]}#{copy}")
            images.append(cut(split.images[index], box, geometry.size))
            masks.append(cut(mask, box, geometry.size, nearest=True) > 0.5)
            patients.append(split.patients[index] if split.patients else split.ids[index])
    if not ids:
        raise ValueError(f"{split.dataset}/{split.split} has no image with a Th8–Th11 region to crop around")
    return Split(split.dataset, f"{split.split}-crops", tuple(ids), np.stack(images).astype(np.float32),
                 np.stack(masks).astype(np.uint8), None, tuple(patients))


@torch.inference_mode()
def refine(model: Segmenter, images: np.ndarray, located: np.ndarray, geometry: CropGeometry,
           device: torch.device, batch_size: int = 8) -> np.ndarray:
    """Th8–Th11 probabilities [N, H, W] from the crop model, in boxes around the located masks [N, H, W].

    An image where nothing was located keeps an all-zero map: there is no box to look in.
    """
    model.eval()
    refined = np.zeros(images.shape, dtype=np.float32)
    boxes = [geometry.box(mask) for mask in located]
    todo = [k for k, box in enumerate(boxes) if box is not None]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        crops = np.stack([cut(images[k], boxes[k], geometry.size) for k in chunk])
        probs = model.region(as_batch(crops, device)).float().cpu().numpy()
        for k, prob in zip(chunk, probs):
            refined[k] = paste(prob, boxes[k], images.shape[1:])
    return refined


@dataclass(frozen=True)
class CropModel:
    """A trained crop model with the geometry of its boxes: the second stage wherever it runs (study or `predict`)."""

    model: Segmenter
    geometry: CropGeometry

    def outline(self, images: np.ndarray, located: np.ndarray, device: torch.device) -> np.ndarray:
        """The crop model's probabilities [N, H, W] in boxes around the located masks [N, H, W].

        `images` [N, h, w] may be stored at another size than the masks (the grid the crop model's
        training boxes were cut from): the boxes are cut there, the result comes back at the masks' size.
        """
        where = resample(np.asarray(located, dtype=np.float32), images.shape[1:], nearest=True) > 0.5
        probs = refine(self.model, images, where, self.geometry, device)
        return np.clip(resample(probs, np.shape(located)[1:]), 0.0, 1.0)
