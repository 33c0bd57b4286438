"""The article's five rules on torch tensors, on the device that holds the probabilities.

On a GPU the members' maps never leave it: max, min, soft voting and union are one reduction, and
shape averaging uses an exact Euclidean distance transform written as two separable min-plus passes
(Saito and Toriwaki 1994) — O(H·W·(H+W)) work, a handful of milliseconds on a GPU for a
vertebra-sized bounding box. `spineseg.ensemble.combine` (numpy and scipy) stays the reference: the
tests check that both give the same masks.
"""

from __future__ import annotations

import torch

from spineseg.ensemble import TIE_TOLERANCE

_CHUNK_ELEMENTS = 2**24  # bounds the memory of one min-plus pass


def squared_distance(targets: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance from every pixel to the nearest True pixel of each [..., H, W] map.

    Exact: integer squared distances are exact in float32 up to 2**24. A map without any True pixel
    gets (H + W)**2 everywhere (farther than any distance in the image).
    """
    height, width = targets.shape[-2:]
    far = float((height + width) ** 2)
    cost = torch.where(targets, 0.0, far).to(torch.float32)
    cost = _min_plus(cost.transpose(-1, -2)).transpose(-1, -2)  # along columns
    return _min_plus(cost).clamp(max=far)  # then along rows


def _min_plus(cost: torch.Tensor) -> torch.Tensor:
    """out[..., j] = min_l cost[..., l] + (j - l)**2 over the last axis."""
    n = cost.shape[-1]
    positions = torch.arange(n, device=cost.device, dtype=torch.float32)
    steps = (positions[:, None] - positions[None, :]) ** 2
    rows = cost.reshape(-1, n)  # a copy where `cost` is a transposed view: written to `out`, never back
    out = torch.empty_like(rows)
    chunk = max(1, _CHUNK_ELEMENTS // (n * n))
    for start in range(0, len(rows), chunk):
        out[start:start + chunk] = (rows[start:start + chunk, None, :] + steps).amin(dim=-1)
    return out.reshape(cost.shape)


def shape_average(masks: torch.Tensor) -> torch.Tensor:
    """Shape averaging of [M, H, W] masks (eq. 15–17), as `spineseg.ensemble.combine(..., "shape")` does it."""
    union, intersection = masks.any(dim=0), masks.all(dim=0)
    if torch.equal(union, intersection):
        return intersection
    height, width = union.shape
    rows, cols = torch.nonzero(union, as_tuple=True)
    top, left = max(int(rows.min()) - 1, 0), max(int(cols.min()) - 1, 0)
    box = (slice(top, int(rows.max()) + 2), slice(left, int(cols.max()) + 2))
    crops = masks[:, box[0], box[1]]
    # float64 square roots of exact integers: the same numbers as the numpy version, ties included
    inside = squared_distance(~crops).double().sqrt()
    outside = squared_distance(crops).double().sqrt()
    votes = torch.where(crops, inside, -outside)
    empty, full = ~masks.flatten(1).any(dim=1), masks.flatten(1).all(dim=1)
    votes[empty], votes[full] = -float(height + width), float(height + width)
    decided = votes.sort(dim=0).values.sum(dim=0) > TIE_TOLERANCE  # sorted: independent of the members' order
    result = intersection.clone()
    result[box[0], box[1]] = torch.where(union[box[0], box[1]] & ~intersection[box[0], box[1]], decided,
                                         intersection[box[0], box[1]])
    return result


def combine(probs: torch.Tensor, method: str, threshold: float = 0.5) -> torch.Tensor:
    """The article's rules on [M, N, H, W] probabilities → [N, H, W] bool masks, on their device."""
    if method == "max":
        return probs.amax(dim=0) > threshold
    if method == "min":
        return probs.amin(dim=0) > threshold
    if method == "soft":
        return probs.float().mean(dim=0) > threshold
    if method == "union":
        return (probs > threshold).any(dim=0)
    if method == "shape":
        masks = probs > threshold
        return torch.stack([shape_average(masks[:, image]) for image in range(masks.shape[1])])
    raise ValueError(f"no torch version of rule {method!r}; the article's are max, min, soft, union, shape")
