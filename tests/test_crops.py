"""The two-stage variant's geometry: boxes around a region, cutting and pasting, training crops, refinement."""

import numpy as np
import torch
from torch import nn

from spineseg.crops import Box, CropGeometry, CropModel, cut, paste, refine, training_crops
from spineseg.data import Split
from spineseg.predict import Segmenter


def _region(shape=(200, 80), rows=(60, 140), cols=(30, 50)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_a_box_adds_a_vertebra_above_and_below_and_takes_the_crops_aspect():
    box = CropGeometry((64, 32), margin=1.0).box(_region())  # 80 rows = four vertebrae of 20 rows
    assert (box.top, box.height) == (40, 120)  # one vertebra (20 rows) each side
    assert box.width == 60 and box.left == 10  # height / width = 64 / 32, centred on the region
    assert CropGeometry((64, 32)).box(np.zeros((20, 20), dtype=bool)) is None


def vertebrae(shape=(400, 160), top=120, height=18, gap=4, cols=(60, 100)) -> np.ndarray:
    """Th8–Th11 as four separate vertebrae with disc gaps between them, as a label map's mask is."""
    mask = np.zeros(shape, dtype=bool)
    for k in range(4):
        mask[top + k * (height + gap): top + k * (height + gap) + height, cols[0]:cols[1]] = True
    return mask


def test_a_far_away_speck_does_not_change_the_box_but_every_vertebra_of_the_region_counts():
    geometry = CropGeometry((64, 32))
    region = vertebrae()
    speck = region.copy()
    speck[380:383, 5:8] = True  # a 3 × 3 false positive near the image's corner
    assert geometry.box(speck) == geometry.box(region)
    rows = np.nonzero(region.any(axis=1))[0]
    assert geometry.box(region).height == round((rows[-1] + 1 - rows[0]) * 1.5)  # all four, plus a vertebra each side


def test_a_wide_region_widens_the_box_and_keeps_the_aspect():
    box = CropGeometry((64, 64), margin=0.0).box(_region(rows=(60, 80), cols=(0, 80)))
    assert box.width == 80 and box.height == 80


def test_a_shift_moves_the_box_by_vertebrae():
    geometry = CropGeometry((64, 32), margin=1.0)
    assert geometry.box(_region(), shift=1.0).top == geometry.box(_region()).top + 20


def test_cut_pads_past_the_image_and_paste_puts_the_pixels_back():
    image = np.arange(30 * 20, dtype=np.float32).reshape(30, 20)
    box = Box(top=-5, left=10, height=20, width=20)  # above the image and past its right side
    crop = cut(image, box, (20, 20))
    assert np.array_equal(crop[5:, :10], image[:15, 10:])
    assert not crop[:5].any() and not crop[:, 10:].any()
    back = paste(crop, box, image.shape)
    assert np.array_equal(back[:15, 10:], image[:15, 10:])
    assert not back[15:].any() and not back[:, :10].any()


def _split(masks: np.ndarray) -> Split:
    images = np.random.default_rng(0).random(masks.shape, dtype=np.float32)
    ids = tuple(f"img{k}" for k in range(len(masks)))
    return Split("d1", "train", ids, images, masks.astype(np.uint8), None, ids)


def test_training_crops_jitter_around_the_true_region_and_skip_images_without_one():
    masks = np.stack([_region(), _region(rows=(40, 120)), np.zeros((200, 80), dtype=bool)])
    geometry = CropGeometry((64, 32), margin=1.0, jitter=0.5, scale_jitter=0.1, copies=3)
    crops = training_crops(_split(masks), geometry, seed=0)
    assert len(crops) == 6 and crops.images.shape[1:] == (64, 32)
    assert crops.ids[:3] == ("img0#0", "img0#1", "img0#2") and "img2#0" not in crops.ids
    rows = [np.nonzero(m.any(axis=1))[0] for m in crops.masks]
    tops = {int(r.min()) for r in rows}
    assert len(tops) > 1  # jittered: the region does not sit at one place in every crop
    assert all(3 <= r.min() <= 19 and 44 <= r.max() <= 62 for r in rows)  # 10.7 rows of margin, ± half a vertebra
    exact = training_crops(_split(masks), geometry.exact(), seed=0)
    assert len(exact) == 2
    assert all(np.nonzero(m.any(axis=1))[0].min() == 11 for m in exact.masks)  # margin 1 of 4 + 2: 64 / 6


class _Echo(nn.Module):
    """A 'network' whose logit is the image: the crop model then returns sigmoid(crop)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 20 - 10


def test_refine_pastes_the_crop_models_probabilities_into_the_located_box():
    images = np.zeros((2, 200, 80), dtype=np.float32)
    images[:, :, 20:60] = 1.0  # a bright column the height of the image: the 'model' says yes on it
    located = np.stack([_region(), np.zeros((200, 80), dtype=bool)])
    probs = refine(Segmenter(_Echo()), images, located, CropGeometry((64, 32), margin=1.0), torch.device("cpu"))
    yes = probs[0] > 0.5
    box = CropGeometry((64, 32), margin=1.0).box(located[0])
    assert yes[45:155, 25:55].all()  # bright and inside the box
    assert not yes[:box.top].any() and not yes[box.top + box.height:].any()  # bright but outside the box
    assert not probs[1].any()  # nothing located: nothing to refine



def test_a_crop_model_cuts_its_boxes_on_the_stored_grid_and_answers_at_the_masks_size():
    """`predict` locates on the radiograph's own size, the crop model was trained on boxes cut at the grid."""
    images = np.zeros((1, 200, 80), dtype=np.float32)
    images[:, :, 20:60] = 1.0
    located = _region()[None]
    crop = CropModel(Segmenter(_Echo()), CropGeometry((64, 32), margin=1.0))
    same = crop.outline(images, located, torch.device("cpu"))
    assert np.array_equal(same, refine(crop.model, images, located, crop.geometry, torch.device("cpu")))
    large = np.kron(located, np.ones((1, 3, 3), dtype=bool))  # the same mask on a radiograph three times the grid
    outlined = crop.outline(images, large, torch.device("cpu"))
    assert outlined.shape == large.shape
    assert np.abs((outlined[0, ::3, ::3] > 0.5).astype(int) - (same[0] > 0.5)).mean() < 0.01
