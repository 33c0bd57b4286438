"""The paper's augmentation set (albumentations), applied to float images in [0, 1].

30 % of samples pass unchanged; the other 70 % get every transform with a random strength.
Geometry is one affine warp shared by image (bilinear) and mask (nearest), so they stay aligned.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from spineseg.vertebrae import N_LEVELS

ROTATION_DEG = 10.0
SCALE = (0.8, 1.2)
SHIFT_FRACTION = 0.1
BRIGHTNESS = 20 / 255  # additive, in units of the [0, 1] intensity range
MULTIPLY = (0.7, 1.3)
BLUR_SIGMA = (0.0, 0.4)
UNCHANGED_FRACTION = 0.3


def paper_augmentation(seed: int | None = None) -> A.Compose:
    """The augmentation pipeline of the paper, seeded for reproducible epochs."""
    return A.Compose(
        [
            A.Sequential(
                [
                    A.Affine(
                        rotate=(-ROTATION_DEG, ROTATION_DEG),
                        scale=SCALE,
                        keep_ratio=True,  # one zoom factor for both axes
                        translate_percent=(-SHIFT_FRACTION, SHIFT_FRACTION),
                        interpolation=cv2.INTER_LINEAR,
                        mask_interpolation=cv2.INTER_NEAREST,
                        border_mode=cv2.BORDER_CONSTANT,
                        fill=0,
                        fill_mask=0,
                        p=1.0,
                    ),
                    A.RandomBrightnessContrast(brightness_limit=(-BRIGHTNESS, BRIGHTNESS), contrast_limit=(0, 0),
                                               brightness_by_max=True, p=1.0),
                    A.MultiplicativeNoise(multiplier=MULTIPLY, per_channel=False, elementwise=False, p=1.0),
                    A.GaussianBlur(sigma_limit=BLUR_SIGMA, blur_limit=(3, 3), p=1.0),
                ],
                p=1.0 - UNCHANGED_FRACTION,
            )
        ],
        seed=seed,
    )


def anatomy_augmentation(seed: int | None = None) -> A.Compose:
    """For the locator: the spine moved further than the article's (scale 0.75–1.25, ±12 % up and down), mirrored
    (a mirror keeps every level), and exposures the article's brightness shift does not reach (gamma 0.6–1.7,
    contrast ±35 %, noise): where a vertebra sits in the image, or how bright it is, must not say which it is."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-ROTATION_DEG, ROTATION_DEG), scale=(0.75, 1.25), keep_ratio=True,
                     translate_percent={"x": (-0.05, 0.05), "y": (-0.12, 0.12)}, interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8),
            A.RandomGamma(gamma_limit=(60, 170), p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.35, p=0.7),
            A.GaussianBlur(sigma_limit=(0.1, 1.0), blur_limit=(3, 5), p=0.2),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
        ],
        seed=seed,
    )


AUGMENTATIONS = {"paper": paper_augmentation, "anatomy": anatomy_augmentation}


KEEP_FRACTION = 0.5  # a level-aware target keeps at least this share of every level it shows
KEEP_TRIES = 4


def augment_batch(transform: A.Compose, images: np.ndarray, masks: np.ndarray,
                  keep_levels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Augment a batch [B, H, W] of float images and their masks (or level maps); intensities stay in [0, 1].

    With ``keep_levels`` an augmentation that pushes most of a level out of the image (the first or
    last vertebra, typically) is drawn again, and after a few tries the sample stays as it is: a
    level-aware model must never learn that the column starts one vertebra lower than it does.
    """
    out_images = np.empty_like(images)
    out_masks = np.empty_like(masks)
    for i in range(len(images)):
        for _ in range(KEEP_TRIES if keep_levels else 1):
            result = transform(image=images[i], mask=masks[i])
            if not keep_levels or _levels_kept(masks[i], result["mask"]):
                break
        else:
            result = {"image": images[i], "mask": masks[i]}
        out_images[i] = result["image"]  # albumentations clips float images to [0, 1]
        out_masks[i] = result["mask"]
    return out_images, out_masks


def _levels_kept(before: np.ndarray, after: np.ndarray) -> bool:
    counts_before = np.bincount(before.ravel(), minlength=256)[1:N_LEVELS + 1]
    counts_after = np.bincount(after.ravel(), minlength=256)[1:N_LEVELS + 1]
    return bool((counts_after >= KEEP_FRACTION * counts_before).all())
