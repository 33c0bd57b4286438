"""Calibration measures and temperature scaling on constructed probabilities."""

import numpy as np
import pytest

from spineseg.calibration import calibration_table, expected_calibration_error, fit_temperature, scale


def _calibrated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.random(n)
    return probs, rng.random(n) < probs  # each pixel is foreground with its stated probability


def test_a_calibrated_map_has_near_zero_ece_and_an_overconfident_one_does_not():
    probs, truth = _calibrated(200_000)
    assert expected_calibration_error(probs, truth) < 0.01
    overconfident = scale(probs, 0.3)  # logits tripled
    assert expected_calibration_error(overconfident, truth) > 0.1
    table = calibration_table(probs, truth)
    assert len(table) == 15 and table["pixels"].sum() == probs.size
    assert np.allclose(table["confidence"], table["observed"], atol=0.02)


def test_temperature_scaling_recovers_the_temperature_and_repairs_calibration():
    probs, truth = _calibrated(200_000, seed=1)
    overconfident = scale(probs, 0.4)
    temperature = fit_temperature(overconfident, truth)
    assert temperature == pytest.approx(1 / 0.4, rel=0.05)  # undoes the sharpening
    repaired = scale(overconfident, temperature)
    assert expected_calibration_error(repaired, truth) < expected_calibration_error(overconfident, truth) / 5
    assert fit_temperature(probs, truth) == pytest.approx(1.0, rel=0.05)
