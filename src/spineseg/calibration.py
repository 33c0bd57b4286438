"""Are the probabilities probabilities? Calibration of per-pixel maps, and temperature scaling.

- `calibration_table` and `expected_calibration_error`: pixels binned by predicted probability (15
  equal-width bins); ECE is the pixel-weighted mean gap between each bin's mean probability and its
  share of true foreground (Guo et al. 2017).
- `fit_temperature`: one temperature τ per model, fitted by negative log-likelihood on validation
  pixels; `scale` divides the logits by it. τ > 1 softens an overconfident model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import optimize, special

BINS = 15
_CLIP = 1e-6


def calibration_table(probs, truth, bins: int = BINS) -> pd.DataFrame:
    """Per probability bin: pixels, mean predicted probability, observed foreground share."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    if probs.shape != truth.shape:
        raise ValueError(f"{probs.size} probabilities for {truth.size} truth pixels")
    index = np.minimum((probs * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    confidence = np.bincount(index, weights=probs, minlength=bins) / np.maximum(counts, 1)
    observed = np.bincount(index, weights=truth, minlength=bins) / np.maximum(counts, 1)
    edges = np.linspace(0, 1, bins + 1)
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "pixels": counts,
                         "confidence": np.where(counts > 0, confidence, np.nan),
                         "observed": np.where(counts > 0, observed, np.nan)})


def expected_calibration_error(probs, truth, bins: int = BINS) -> float:
    table = calibration_table(probs, truth, bins)
    used = table["pixels"] > 0
    weights = table.loc[used, "pixels"] / table["pixels"].sum()
    return float((weights * (table.loc[used, "confidence"] - table.loc[used, "observed"]).abs()).sum())


def scale(probs, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by `temperature`."""
    logits = special.logit(np.clip(np.asarray(probs, dtype=np.float64), _CLIP, 1 - _CLIP))
    return special.expit(logits / temperature)


def fit_temperature(probs, truth, max_pixels: int = 400_000, seed: int = 0) -> float:
    """The temperature minimising the negative log-likelihood of `truth` under `scale(probs, τ)`.

    A fixed-seed sample of at most `max_pixels` pixels keeps the fit quick; fit on validation only.
    """
    probs = np.asarray(probs, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    sample = np.random.default_rng(seed).choice(probs.size, size=min(probs.size, max_pixels), replace=False)
    logits, labels = special.logit(np.clip(probs[sample], _CLIP, 1 - _CLIP)), truth[sample]

    def nll(log_temperature: float) -> float:
        z = logits / np.exp(log_temperature)
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    return float(np.exp(optimize.minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))
