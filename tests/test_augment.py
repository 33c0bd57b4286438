"""The paper's augmentation: image/mask alignment, the 30 % pass-through, rotation, scale and
intensity ranges, seeding, and the [0, 1] intensity guarantee of ``augment_batch``."""

from __future__ import annotations

import numpy as np
import pytest

from spineseg.augment import augment_batch, paper_augmentation

# The paper's ranges, written out here (not imported) so a changed constant fails the tests.
ROTATION_DEG = 10.0
SCALE = (0.8, 1.2)
BRIGHTNESS = 20 / 255
MULTIPLY = (0.7, 1.3)

SIZE = 64
DRAWS = 300


def _draws(image: np.ndarray, mask: np.ndarray, seed: int = 0, n: int = DRAWS):
    """``n`` augmentations of one pair from one seeded pipeline, with a flag: was it left as is?"""
    transform = paper_augmentation(seed=seed)
    for _ in range(n):
        out = transform(image=image, mask=mask)
        unchanged = np.array_equal(out["image"], image) and np.array_equal(out["mask"], mask)
        yield out["image"], out["mask"], unchanged


def _l_shape() -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric bright L on a dark background, away from the border; the mask is the L."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[18:44, 20:28] = 1
    mask[36:44, 20:42] = 1
    image = np.where(mask == 1, 0.9, 0.1).astype(np.float32)
    return image, mask


def _principal_angle(mask: np.ndarray) -> float:
    """Angle in degrees (−90, 90] of the main axis of the mask's pixels, 0 = horizontal."""
    ys, xs = np.nonzero(mask)
    _, vectors = np.linalg.eigh(np.cov(np.stack([xs, ys]).astype(float)))
    axis = vectors[:, -1]
    return float((np.degrees(np.arctan2(axis[1], axis[0])) + 90) % 180 - 90)


def test_image_and_mask_stay_aligned():
    image, mask = _l_shape()
    ious, changed = [], 0
    for out_image, out_mask, unchanged in _draws(image, mask, seed=1, n=200):
        assert out_mask.dtype == mask.dtype
        assert set(np.unique(out_mask)) <= {0, 1}
        if unchanged:
            continue
        changed += 1
        bright = out_image > 0.4
        inter = np.logical_and(bright, out_mask == 1).sum()
        union = np.logical_or(bright, out_mask == 1).sum()
        ious.append(inter / union)
    assert changed > 100
    assert min(ious) > 0.8, f"worst image/mask IoU {min(ious):.3f}"
    assert np.mean(ious) > 0.9


def test_augment_batch_keeps_each_pair_aligned():
    # the code path training uses: one draw per pair, shared by its image and mask
    image, mask = _l_shape()
    images, masks = np.stack([image] * 40), np.stack([mask] * 40)
    out_images, out_masks = augment_batch(paper_augmentation(seed=11), images, masks)
    for out_image, out_mask in zip(out_images, out_masks):
        bright = out_image > 0.4
        iou = np.logical_and(bright, out_mask == 1).sum() / np.logical_or(bright, out_mask == 1).sum()
        assert iou > 0.8
    assert sum(not np.array_equal(m, mask) for m in out_masks) > 20


def test_geometry_actually_moves_the_mask():
    # guards the alignment test against a pipeline that never moves anything
    image, mask = _l_shape()
    moved = [not np.array_equal(m, mask) for _, m, unchanged in _draws(image, mask, seed=2, n=50) if not unchanged]
    assert moved and all(moved)


def test_about_thirty_percent_pass_unchanged():
    image, mask = _l_shape()
    flags = [unchanged for _, _, unchanged in _draws(image, mask, seed=3)]
    fraction = float(np.mean(flags))
    assert 0.22 <= fraction <= 0.38, fraction


def test_rotation_stays_within_ten_degrees():
    bar = np.zeros((SIZE, SIZE), dtype=np.uint8)
    bar[31:34, 12:52] = 1  # a thin horizontal bar through the centre
    assert abs(_principal_angle(bar)) < 1e-6
    angles = [_principal_angle(m) for _, m, unchanged in _draws(bar.astype(np.float32), bar, seed=4) if not unchanged]
    assert len(angles) > 150
    assert max(abs(a) for a in angles) <= ROTATION_DEG + 1.5
    # and it does rotate, both ways, most of the range
    assert min(angles) < -0.6 * ROTATION_DEG and max(angles) > 0.6 * ROTATION_DEG


def test_scale_stays_within_range():
    square = np.zeros((SIZE, SIZE), dtype=np.uint8)
    square[24:40, 24:40] = 1  # 16 × 16 in the middle: still inside after a 1.2 zoom and a 10 % shift
    ratios = [m.sum() / square.sum() for _, m, unchanged in _draws(square.astype(np.float32), square, seed=5)
              if not unchanged]
    low, high = SCALE[0] ** 2, SCALE[1] ** 2
    assert min(ratios) >= low - 0.06 and max(ratios) <= high + 0.08, (min(ratios), max(ratios))
    assert min(ratios) < 0.8 and max(ratios) > 1.2  # the zoom is really applied


def test_brightness_and_multiply_bounds_at_the_centre():
    flat = np.full((SIZE, SIZE), 0.5, dtype=np.float32)
    empty = np.zeros((SIZE, SIZE), dtype=np.uint8)
    centre = [img[SIZE // 2, SIZE // 2] for img, _, unchanged in _draws(flat, empty, seed=6) if not unchanged]
    # brightness is added first, then the multiplier: (0.5 ± 20/255) × [0.7, 1.3]
    eps = 1e-4
    lowest = (0.5 - BRIGHTNESS) * MULTIPLY[0]
    highest = (0.5 + BRIGHTNESS) * MULTIPLY[1]
    assert min(centre) >= lowest - eps and max(centre) <= highest + eps, (min(centre), max(centre))
    # the intensity change spans most of its range
    assert min(centre) < 0.5 * 0.8 and max(centre) > 0.5 * 1.2


def test_same_seed_same_output_other_seed_other_output():
    image, mask = _l_shape()
    first = [(i.copy(), m.copy()) for i, m, _ in _draws(image, mask, seed=7, n=20)]
    again = [(i, m) for i, m, _ in _draws(image, mask, seed=7, n=20)]
    other = [(i, m) for i, m, _ in _draws(image, mask, seed=8, n=20)]
    for (a_img, a_mask), (b_img, b_mask) in zip(first, again):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)
    assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_reseeding_replays_an_epoch():
    # train.fit reseeds the same pipeline every epoch; the same seed must replay the same draws
    image, mask = _l_shape()
    batch_i, batch_m = np.stack([image] * 6), np.stack([mask] * 6)
    transform = paper_augmentation()
    transform.set_random_seed(42)
    first = augment_batch(transform, batch_i, batch_m)
    augment_batch(transform, batch_i, batch_m)  # move the generator on
    transform.set_random_seed(42)
    replay = augment_batch(transform, batch_i, batch_m)
    np.testing.assert_array_equal(first[0], replay[0])
    np.testing.assert_array_equal(first[1], replay[1])


def test_augment_batch_keeps_intensities_in_unit_range_and_shapes():
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(0.9, 0.1, size=(12, SIZE, SIZE)), 0, 1).astype(np.float32)
    images[:, :8] = 0.0  # dark rows too: brightness can push them below 0
    masks = (rng.random((12, SIZE, SIZE)) > 0.5).astype(np.uint8)
    out_images, out_masks = augment_batch(paper_augmentation(seed=9), images, masks)
    assert out_images.shape == images.shape and out_images.dtype == np.float32
    assert out_masks.shape == masks.shape and out_masks.dtype == np.uint8
    assert out_images.min() >= 0.0 and out_images.max() <= 1.0
    assert set(np.unique(out_masks)) <= {0, 1}
    # inputs are not modified in place
    assert images[:, :8].max() == 0.0
    # bright images multiplied by up to 1.3 hit the ceiling: the clip is doing work
    assert (out_images == 1.0).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_augment_batch_is_per_sample(seed):
    # each image in a batch gets its own draw, not one shared transform
    image, mask = _l_shape()
    out_images, _ = augment_batch(paper_augmentation(seed=seed), np.stack([image] * 8), np.stack([mask] * 8))
    distinct = {out.tobytes() for out in out_images}
    assert len(distinct) >= 4
