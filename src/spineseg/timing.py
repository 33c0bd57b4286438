"""Inference cost, as in the article's "Computational complexity": time per image and peak memory.

Times are means over repeated calls after warm-up (torch.utils.benchmark, which synchronises the
GPU). Peak memory is CUDA's max allocated on a GPU and the process's peak resident set size on a
CPU (which includes everything the process held before, so it is an upper bound there).
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from spineseg.ensemble import combine
from spineseg.names import RULES
from spineseg.predict import ensemble_forward


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def mean_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Mean wall time of `fn()` over `repeats` calls, after `warmup` calls, on every torch thread."""
    # torch.utils.benchmark pulls in the C++ extension builder, which warns about a missing CUDA toolkit.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(repeats).mean


def ensemble_step(models: Sequence[nn.Module], image: torch.Tensor, threshold: float = 0.5,
                  rules: Sequence[str] = RULES) -> Callable[[], list[np.ndarray]]:
    """What the article times as the ensemble: every model's forward pass, then every rule's mask."""

    def step() -> list[np.ndarray]:
        probs = ensemble_forward(models, image)
        return [combine(probs, rule, threshold) for rule in rules]

    return step
