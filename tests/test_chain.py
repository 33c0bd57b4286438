"""The locator's chain: its targets from label maps, its prior, its decoding, and the `Centres` objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spineseg.chain import (
    EXTRAPOLATED_STEP,
    Chain,
    ChainPrior,
    chain_centres,
    chain_targets,
    decode,
    located_levels,
)
from spineseg.identification import centre_errors, vertebra_centres
from spineseg.objectives import Centres, gaussians, objective
from spineseg.vertebrae import CHAIN, CHAIN_CODES, CODES, IGNORE, N_LEVELS, REGION_CODES


def spine(top: int = 14, height: int = 6, gap: int = 3, rows: int = 200, cols: int = 40, first: int = 1,
          last: int = N_LEVELS) -> np.ndarray:
    """Vertebrae `first`…`last` stacked from row `top`, tilting a little to the right as they go down."""
    labels = np.zeros((rows, cols), dtype=np.uint8)
    for k, code in enumerate(range(first, last + 1)):
        start = top + k * (height + gap)
        left = 12 + k // 4
        labels[max(start, 0):max(start + height, 0), left:left + 10] = code
    return labels


def maps_at(centres: np.ndarray, shape: tuple[int, int], sigma: float = 1.0, outside: float = 1e-4) -> np.ndarray:
    """Heatmaps [L, H, W] peaked at (row, column) centres; NaN centres put (almost) all mass outside."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    maps = np.zeros((len(centres), *shape))
    for k, centre in enumerate(centres):
        if np.isfinite(centre).all():
            bump = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))
            maps[k] = (1 - outside) * bump / bump.sum()
        else:
            maps[k] = outside / maps[k].size
    return maps


def training_prior() -> ChainPrior:
    maps = [spine(top=t, height=h) for t, h in ((10, 6), (14, 6), (18, 5), (12, 7))]
    return ChainPrior.fit(np.stack([chain_centres(m) for m in maps]), maps[0].shape)


def test_the_chain_runs_c7_to_s1_and_extrapolates_the_ends_the_labels_lack():
    assert CHAIN[0] == "C7" and CHAIN[-1] == "S1" and len(CHAIN_CODES) == N_LEVELS + 2
    labels = spine()
    centres = chain_centres(labels)
    levels = vertebra_centres(labels)
    np.testing.assert_allclose(centres[1:-1], levels)
    np.testing.assert_allclose(centres[0], levels[0] - EXTRAPOLATED_STEP[0] * (levels[1] - levels[0]))
    np.testing.assert_allclose(centres[-1], levels[-1] + EXTRAPOLATED_STEP[1] * (levels[-1] - levels[-2]))
    shown = labels.copy()
    shown[2:6, 12:22] = CODES["C7"]  # a label map that shows C7 gives its own centre
    np.testing.assert_allclose(chain_centres(shown)[0], [4.0, 17.0])


def test_targets_say_outside_only_beyond_the_first_and_last_vertebra_inside_and_never_where_a_level_is_unknown():
    cut = spine(top=-20)  # T1 and T2 pushed above the image (and C7 with them)
    centres, outside = chain_targets(cut)
    assert outside[:3].all() and not outside[3:].any()
    assert np.isnan(centres[:3]).all() and np.isfinite(centres[3:]).all()
    unknown = cut.copy()
    unknown[-6:] = IGNORE  # an untrusted level somewhere: what is missing may be that level
    assert not chain_targets(unknown)[1].any()


def test_the_prior_is_a_density_of_steps_downwards_and_round_trips():
    prior = training_prior()
    assert len(prior.log_step) == len(CHAIN_CODES) - 1
    assert ChainPrior.from_dict(prior.to_dict()) == prior
    upper = np.array([[0.2, 0.4]])
    typical = np.array([[0.2 + np.exp(prior.log_step[5]), 0.4 + prior.side_step[5]]])
    above = np.array([[0.19, 0.4]])
    assert prior.step_score(5, upper, typical)[0, 0] > prior.step_score(5, upper, typical * [1.3, 1])[0, 0]
    assert prior.step_score(5, upper, above)[0, 0] == -np.inf  # never upwards, never the same place twice
    with pytest.raises(ValueError, match="steps"):
        ChainPrior.from_dict({key: value[:3] for key, value in prior.to_dict().items()})


def test_a_column_that_stops_above_the_sacrum_learns_the_missing_steps_from_its_nearest():
    maps = [spine(top=t, last=15) for t in (10, 14)]  # Th1…L3, as the synthetic radiographs
    prior = ChainPrior.fit(np.stack([chain_centres(m) for m in maps]), maps[0].shape)
    assert prior.log_step[-1] == prior.log_step[-4] and np.isfinite(prior.log_step).all()


def test_decoding_clean_maps_gives_every_centre():
    labels = spine()
    truth = chain_centres(labels)
    chain = decode(maps_at(truth, labels.shape), training_prior())
    np.testing.assert_allclose(chain.centres, truth, atol=0.6)
    assert chain.outside == ("",) * len(CHAIN_CODES)
    assert (centre_errors(chain.region_centres(), vertebra_centres(labels)) == 0).all()


def test_the_chain_overrules_a_map_that_fires_on_its_neighbour():
    labels = spine()
    truth = chain_centres(labels)
    maps = maps_at(truth, labels.shape)
    th9 = CHAIN_CODES.index(CODES["Th9"])
    wrong = maps_at(truth[[th9 + 1]], labels.shape)[0]  # Th9's map: mostly on Th10, a little on Th9
    maps[th9] = 0.8 * wrong + 0.2 * maps[th9]
    assert abs(np.unravel_index(maps[th9].argmax(), labels.shape)[0] + 0.5 - truth[th9 + 1, 0]) <= 1  # its own peak is wrong
    chain = decode(maps, training_prior())
    assert (centre_errors(chain.region_centres(), vertebra_centres(labels)) == 0).all()


def test_vertebrae_beyond_the_image_are_decoded_outside_and_the_count_holds():
    labels = spine(top=-20)  # C7, T1 and T2 above the image
    truth = chain_centres(labels)
    visible = np.where(((truth[:, 0] >= 0) & (truth[:, 0] < labels.shape[0]))[:, None], truth, np.nan)
    chain = decode(maps_at(visible, labels.shape), training_prior())
    assert chain.outside[:3] == ("above",) * 3 and chain.outside[3] == ""
    assert (centre_errors(chain.region_centres(), vertebra_centres(labels)) == 0).all()


def test_located_levels_give_each_pixel_near_the_spine_its_nearest_vertebra():
    labels = spine()
    truth = chain_centres(labels)
    chain = Chain(truth, ("",) * len(truth), np.zeros(len(truth)), 0.0)
    located = located_levels(chain, labels.shape)
    on = labels > 0
    assert (located[on] == labels[on]).mean() > 0.99
    assert located[:, :3].max() == 0  # far to the left of the spine: nothing
    assert (located_levels(chain, labels.shape, beside=False) > 0).all()
    region = np.isin(located, REGION_CODES)
    assert np.isin(labels[region], [0, *REGION_CODES]).all()


def test_the_centres_objective_trains_toward_the_centres_and_outside():
    task = objective("centres")
    assert isinstance(task, Centres) and task.classes == 2 * len(CHAIN_CODES) and not task.keeps_levels_in_view
    labels = torch.from_numpy(spine(top=-20, rows=100)[None])  # the top of the chain above, the bottom below
    centres, outside = chain_targets(labels[0].numpy())
    inside = np.isfinite(centres).all(axis=1)
    assert outside.any() and inside.any()
    right = torch.full((1, task.classes, 100, 40), -30.0)
    right[0, np.nonzero(inside)[0]] = gaussians(centres[inside], (100, 40), task.sigma).clamp(min=1e-12).log()
    right[0, len(CHAIN_CODES) + np.nonzero(outside)[0]] = 30.0
    wrong = torch.zeros_like(right)
    assert task.loss(right, labels) < task.loss(wrong, labels)
    probs = task.probabilities(right)
    assert probs.shape == (1, len(CHAIN_CODES), 100, 40)
    assert probs[0, np.nonzero(outside)[0]].sum(dim=(1, 2)).max() < 1e-6  # outside: no mass in the image
    bumps = gaussians(np.array([[10.5, 5.5]]), (20, 10), 1.5)  # the centre of pixel (10, 5)
    assert float(bumps.sum()) == pytest.approx(1.0) and bumps[0].argmax() == 10 * 10 + 5
