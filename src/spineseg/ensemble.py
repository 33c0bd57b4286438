"""Combining the probability maps of several segmentation models into one mask.

The five rules of the paper (eq. 8–17) are `names.RULES`; `names.EXTRA_RULES` are rules the paper does
not test, kept beside them so that every rule goes through the same validation and the same tables.
Note that "max" and "union" always give the same mask: max_k P_k > T exactly when some P_k > T.
The paper lists them as separate rules, so both stay, and the tables can show that they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage, optimize, special

from spineseg.metrics import dice

# The thresholds T that are tuned over, plotted and offered on sliders.
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
STAPLE_CUTOFF = 0.5
STAPLE_MAX_ITERATIONS = 100  # expectation-maximisation steps per image
# Sums of signed distances and STAPLE probabilities can miss an exact tie by one rounding error,
# whose sign depends on the order of the models; scores this close to the cutoff count as ties
# (background), so that the result does not depend on that order.
TIE_TOLERANCE = 1e-9
LOGIT_CLIP = 1e-6


def combine(probs, method: str, threshold: float = 0.5, weights=None) -> np.ndarray:
    """Combine the probabilities of M models, `[M, H, W]` or `[M, N, H, W]`, into a bool mask.

    Every rule first compares probabilities (or a pooled probability) with `threshold`. Rules:

    - ``max``, ``min``, ``soft``: max / min / mean over models > threshold (eq. 8–13).
    - ``union``: any model's P_k > threshold (eq. 14); always equal to ``max``.
    - ``shape``: shape averaging (eq. 15–17). Each mask S_k = P_k > threshold becomes the signed
      distance D_k = DT(S_k) - DT(not S_k) (Euclidean, in pixels: positive inside, negative
      outside); foreground where sum_k D_k > 0, so exact ties are background. An empty mask has
      no distance to speak of; it counts as -(H + W) everywhere (more than any distance in the
      image, so it votes background everywhere as strongly as possible), and a full mask as
      +(H + W). One empty model thus pulls the result hard towards background. A single model
      gives back its own mask, empty or full ones included.
    - ``geometric``: geometric mean of the probabilities > threshold, compared in log space; a
      probability of exactly 0 makes the mean 0 (log 0 = -inf gives no NaN), so it never passes.
    - ``majority``: strictly more than half of the masks P_k > threshold; a tie is background.
    - ``weighted``: sum_k w_k P_k / sum_k w_k > threshold, for non-negative `weights` (one per
      model, for example its validation DSC). `weights` is required here and refused elsewhere.
    - ``staple``: STAPLE (SimpleITK) over the masks P_k > threshold, per image. STAPLE returns
      the probability that a pixel is truly foreground, which is cut at 0.5 (`STAPLE_CUTOFF`),
      not at `threshold`: `threshold` only binarises the inputs. When all masks are identical
      (all empty, for example, where STAPLE's estimates are 0/0), that mask is the result.

    The rules are symmetric in the models; a permutation can only change a pixel whose pooled
    score is within rounding error of the threshold.
    """
    probs = _checked_probs(probs)
    threshold = _checked_threshold(threshold)
    if method not in _RULES:
        raise ValueError(f"unknown ensemble method {method!r}; known: {', '.join(_RULES)}")
    if method == "weighted":
        weights = _checked_weights(weights, n_models=len(probs))
    elif weights is not None:
        raise ValueError(f"weights apply only to method 'weighted', not to {method!r}")
    single_image = probs.ndim == 3
    stack = probs[:, None] if single_image else probs
    mask = _RULES[method](stack, threshold, weights)
    return mask[0] if single_image else mask


def _max(probs, threshold, weights):
    return probs.max(axis=0) > threshold


def _min(probs, threshold, weights):
    return probs.min(axis=0) > threshold


def _soft(probs, threshold, weights):
    return probs.mean(axis=0) > threshold


def _union(probs, threshold, weights):
    return (probs > threshold).any(axis=0)


def _geometric(probs, threshold, weights):
    with np.errstate(divide="ignore"):
        return np.log(probs).mean(axis=0) > np.log(threshold)


def _majority(probs, threshold, weights):
    return 2 * (probs > threshold).sum(axis=0) > len(probs)


def _weighted(probs, threshold, weights):
    weights = weights.astype(probs.dtype)  # float32 maps stay float32, as in soft voting
    return np.tensordot(weights, probs, axes=1) / weights.sum() > threshold


def _per_image(combine_masks: Callable[[np.ndarray], np.ndarray]):
    """A rule that binarises the models' maps and combines the `[M, H, W]` masks of each image."""
    def rule(probs, threshold, weights):
        masks = probs > threshold
        return np.stack([combine_masks(masks[:, image]) for image in range(masks.shape[1])])
    return rule


def _shape_average(masks: np.ndarray) -> np.ndarray:
    """Shape averaging of `[M, H, W]` masks for one image.

    Where all models agree, every D_k has the same sign, so only the pixels where they disagree
    need distances. And the distance transforms can be restricted to the bounding box of the
    union grown by one pixel: from inside that box, the nearest pixel of any mask is in the box,
    and so is the nearest pixel outside it (the grown rim is background for every model).
    """
    union, intersection = masks.any(axis=0), masks.all(axis=0)
    disputed = union & ~intersection
    if not disputed.any():
        return intersection
    height, width = union.shape
    rows, cols = np.nonzero(union)
    box = (slice(max(rows.min() - 1, 0), rows.max() + 2), slice(max(cols.min() - 1, 0), cols.max() + 2))
    disputed_rows, disputed_cols = np.nonzero(disputed[box])
    votes = np.empty((len(masks), len(disputed_rows)))
    for k, mask in enumerate(masks):
        if not mask.any() or mask.all():
            votes[k] = height + width if mask.all() else -(height + width)
            continue
        mask = mask[box]
        inside = mask[disputed_rows, disputed_cols]
        # Nearest background pixel for pixels inside the mask, nearest mask pixel outside it.
        nearest_background = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
        nearest_mask = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
        nearest = np.where(inside, nearest_background[:, disputed_rows, disputed_cols],
                           nearest_mask[:, disputed_rows, disputed_cols])
        distance = np.sqrt((nearest[0] - disputed_rows) ** 2 + (nearest[1] - disputed_cols) ** 2)  # exact integers, then one rounding
        votes[k] = np.where(inside, distance, -distance)
    # Sorting first makes the sum independent of the order of the models.
    decided = np.sort(votes, axis=0).sum(axis=0) > TIE_TOLERANCE
    result = intersection.copy()
    result[box][disputed_rows, disputed_cols] = decided
    return result


def _staple(masks: np.ndarray) -> np.ndarray:
    # Without any disagreement STAPLE's estimates are 0/0 (NaN for all-empty or all-full masks).
    if (masks == masks[0]).all():
        return masks[0].copy()
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1)
    # SimpleITK's default is no limit; on real maps at a low T the estimates can creep on for minutes per image
    staple.SetMaximumIterations(STAPLE_MAX_ITERATIONS)
    truth = staple.Execute([sitk.GetImageFromArray(mask.astype(np.uint8)) for mask in masks])
    return sitk.GetArrayFromImage(truth) > STAPLE_CUTOFF + TIE_TOLERANCE


_RULES: dict[str, Callable[[np.ndarray, float, np.ndarray | None], np.ndarray]] = {
    "max": _max,
    "min": _min,
    "soft": _soft,
    "union": _union,
    "shape": _per_image(_shape_average),
    "geometric": _geometric,
    "majority": _majority,
    "weighted": _weighted,
    "staple": _per_image(_staple),
}


def tune_threshold(probs, targets, method: str = "soft", grid=THRESHOLD_GRID,
                   weights=None) -> tuple[float, pd.DataFrame]:
    """The threshold of `grid` with the best mean per-image DSC, and the table (threshold, mean_dsc).

    Ties go to the threshold closest to 0.5 (then the lower one), so that a flat optimum does not
    drift to an edge of the grid. Tune on validation predictions, never on the test set.
    """
    probs, targets = _checked_probs_and_targets(probs, targets)
    grid = [_checked_threshold(value) for value in np.asarray(grid, dtype=float).ravel()]
    if not grid:
        raise ValueError("grid of thresholds is empty")
    table = pd.DataFrame({
        "threshold": grid,
        "mean_dsc": [dice(combine(probs, method, t, weights), targets).mean() for t in grid],
    })
    best = min(zip(-table["mean_dsc"], np.abs(table["threshold"] - 0.5), table["threshold"]))
    return float(best[2]), table


def leave_one_out(probs, targets, names: Sequence[str], method: str = "soft", threshold: float = 0.5,
                  weights=None) -> pd.DataFrame:
    """Mean per-image DSC of the ensemble without each model in turn.

    Columns ``removed, mean_dsc, delta_dsc``; the first row (``removed="(none)"``) is the full
    ensemble, and a positive delta means the ensemble is better without that model.
    """
    probs, targets = _checked_probs_and_targets(probs, targets)
    names = list(names)
    if len(names) != len(probs):
        raise ValueError(f"{len(names)} names for {len(probs)} models")
    if len(probs) < 2:
        raise ValueError("leave-one-out needs at least 2 models")
    weights = None if weights is None else _checked_weights(weights, n_models=len(probs))
    full = dice(combine(probs, method, threshold, weights), targets).mean()
    rows = [("(none)", full)]
    for k, name in enumerate(names):
        kept = np.arange(len(probs)) != k
        kept_weights = None if weights is None else weights[kept]
        rows.append((name, dice(combine(probs[kept], method, threshold, kept_weights), targets).mean()))
    table = pd.DataFrame(rows, columns=["removed", "mean_dsc"])
    table["delta_dsc"] = table["mean_dsc"] - full
    return table


@dataclass(frozen=True, eq=False)
class Stacker:
    """Logistic regression of the truth on the logits of the M models' probabilities, per pixel."""

    coef_: np.ndarray
    intercept_: float

    def predict_mask(self, probs) -> np.ndarray:
        """Foreground where the stacker's probability passes one half: its own decision rule, not the ensembles' T."""
        return self.predict_proba(probs) > 0.5

    def predict_proba(self, probs) -> np.ndarray:
        """Probability of foreground, `[H, W]` or `[N, H, W]`, from the M models' `probs`."""
        probs = _checked_probs(probs)
        if len(probs) != len(self.coef_):
            raise ValueError(f"stacker was fitted on {len(self.coef_)} models, got {len(probs)}")
        return special.expit(self.intercept_ + np.tensordot(self.coef_, _logit_features(probs), axes=1))

    def to_dict(self) -> dict:
        return {"coef": [float(c) for c in self.coef_], "intercept": float(self.intercept_)}

    @classmethod
    def from_dict(cls, data: dict) -> Stacker:
        return cls(coef_=np.asarray(data["coef"], dtype=float), intercept_=float(data["intercept"]))


def fit_stacker(probs, targets, max_pixels: int = 200_000, l2: float = 1e-4, seed: int = 0) -> Stacker:
    """Fit a `Stacker` on `probs [M, N, H, W]` and `targets [N, H, W]`.

    Train it on validation predictions only: on the training images the models are overconfident,
    and on the test images the fit would leak the answer. A fixed-seed sample of at most
    `max_pixels` pixels keeps the fit fast; `l2` (on the coefficients, not the intercept) keeps
    them finite when the classes are separable.
    """
    probs, targets = _checked_probs_and_targets(probs, targets)
    n_pixels = targets.size
    rng = np.random.default_rng(seed)
    sample = rng.choice(n_pixels, size=min(n_pixels, max_pixels), replace=False)
    features = _logit_features(probs.reshape(len(probs), -1)[:, sample]).T
    truth = targets.reshape(-1)[sample].astype(float)

    def loss_and_gradient(params):
        coef, intercept = params[:-1], params[-1]
        logits = features @ coef + intercept
        loss = np.mean(np.logaddexp(0.0, logits) - truth * logits) + 0.5 * l2 * coef @ coef
        residual = (special.expit(logits) - truth) / len(truth)
        return loss, np.append(features.T @ residual + l2 * coef, residual.sum())

    fit = optimize.minimize(loss_and_gradient, np.zeros(len(probs) + 1), jac=True, method="L-BFGS-B",
                            options={"maxiter": 500})
    return Stacker(coef_=fit.x[:-1], intercept_=float(fit.x[-1]))


def _logit_features(probs: np.ndarray) -> np.ndarray:
    return special.logit(np.clip(probs, LOGIT_CLIP, 1 - LOGIT_CLIP))


def _checked_probs(probs) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.dtype.kind not in "biuf":
        raise ValueError(f"probabilities must be numeric, got dtype {probs.dtype}")
    if probs.dtype.kind != "f":
        probs = probs.astype(np.float64)
    elif probs.dtype.itemsize < 4:
        probs = probs.astype(np.float32)  # a float16 mean near T flips pixels; cached maps are float16
    if probs.ndim not in (3, 4):
        raise ValueError(f"probabilities must be [M, H, W] (one image) or [M, N, H, W] (N images) of M models, "
                         f"got shape {probs.shape}")
    if len(probs) == 0:
        raise ValueError("no models to combine (M = 0)")
    if probs.ndim == 4 and probs.shape[1] == 0:
        raise ValueError("no images to combine (N = 0)")
    if 0 in probs.shape[-2:]:
        raise ValueError(f"images of size {probs.shape[-2:]} have no pixels")
    if np.isnan(probs).any():
        raise ValueError("probabilities contain NaN")
    if probs.size and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(f"probabilities must lie in [0, 1], got [{probs.min()}, {probs.max()}]")
    return probs


def _checked_threshold(threshold) -> float:
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0 <= threshold <= 1:  # also refuses NaN
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    return threshold


def _checked_weights(weights, n_models: int) -> np.ndarray:
    if weights is None:
        raise ValueError("method 'weighted' needs weights, one per model (e.g. validation DSC)")
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (n_models,):
        raise ValueError(f"need one weight per model ({n_models}), got shape {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() == 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    return weights


def _checked_probs_and_targets(probs, targets) -> tuple[np.ndarray, np.ndarray]:
    probs = _checked_probs(probs)
    if probs.ndim != 4:
        raise ValueError(f"probabilities must be [M, N, H, W] here, got shape {probs.shape}")
    targets = np.asarray(targets)
    if targets.shape != probs.shape[1:]:
        raise ValueError(f"targets must be [N, H, W] = {probs.shape[1:]}, got {targets.shape}")
    if targets.dtype != bool and not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be binary (bool or 0/1)")
    return probs, targets.astype(bool)


def disagreement(probs, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """How much the members disagree: the per-pixel standard deviation of their probabilities, and per
    image its mean over the pixels any member calls foreground (0 where none does).

    `probs` is [M, H, W] or [M, N, H, W]; returns the map(s) and the score(s) with the image axis kept.
    """
    probs = _checked_probs(probs)
    stack = probs[:, None] if probs.ndim == 3 else probs
    spread = stack.std(axis=0)
    union = (stack > _checked_threshold(threshold)).any(axis=0)
    counted = union.sum(axis=(1, 2))
    scores = np.where(counted > 0, (spread * union).sum(axis=(1, 2)) / np.maximum(counted, 1), 0.0)
    return (spread[0], scores[0]) if probs.ndim == 3 else (spread, scores)
