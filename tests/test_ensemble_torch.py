"""The torch rules equal the numpy reference, the distance transform equals scipy's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from spineseg import ensemble, ensemble_torch
from spineseg.names import RULES


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(bool, st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))))
def test_squared_distance_is_scipys(maps):
    ours = ensemble_torch.squared_distance(torch.from_numpy(maps)).numpy()
    for mask, distances in zip(maps, ours):
        if mask.any():
            np.testing.assert_allclose(np.sqrt(distances), ndimage.distance_transform_edt(~mask), atol=1e-6)
        else:
            assert (distances == sum(mask.shape) ** 2).all()


def _blobs(rng: np.random.Generator, n_models: int, size: int = 48) -> np.ndarray:
    """Member maps of one spine-like blob each, shifted and blurred differently."""
    base = np.zeros((size, size))
    base[10:38, 18:30] = 1
    maps = [np.clip(ndimage.gaussian_filter(np.roll(base, rng.integers(-3, 4, 2), (0, 1)), 2) + rng.normal(0, 0.05, base.shape), 0, 1)
            for _ in range(n_models)]
    return np.stack(maps)[:, None]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rule", RULES)
def test_every_article_rule_equals_the_numpy_reference(seed, rule):
    probs = _blobs(np.random.default_rng(seed), n_models=3 + seed % 3)
    if seed == 5:
        probs[1] = 0.0  # an empty member: shape averaging's special case
    expected = ensemble.combine(probs, rule, 0.5)
    got = ensemble_torch.combine(torch.from_numpy(probs).float(), rule, 0.5).numpy()
    np.testing.assert_array_equal(got, expected)


def test_a_rule_without_a_torch_version_says_so():
    with pytest.raises(ValueError, match="no torch version of rule 'staple'"):
        ensemble_torch.combine(torch.zeros(2, 1, 4, 4), "staple")
