"""Inference cost, as in the paper's "Computational complexity": time per 512² image and peak memory.

Times are means over repeated batch-1 forward passes after warm-up, under ``torch.inference_mode``.
Peak memory is CUDA's max allocated on a GPU and the process's peak resident set size on a CPU
(which includes everything the process held before, so it is an upper bound there).
"""

from __future__ import annotations

import resource
import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from spineseg.ensemble import METHODS, combine
from spineseg.models import build_model, parameter_count
from spineseg.runs import RunSpec, run_folder


def load_trained(store, spec: RunSpec, device: torch.device) -> nn.Module:
    """A finished run's model with its best weights, ready for inference."""
    model = build_model(spec.encoder, spec.architecture, "none")
    weights = run_folder(store, spec) / "best.pt"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def mean_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeats


@torch.inference_mode()
def ensemble_forward(models: Sequence[nn.Module], image: torch.Tensor) -> np.ndarray:
    """Every model's probability map for one batch, stacked [M, B, H, W] on the CPU."""
    return np.stack([torch.sigmoid(m(image).float())[:, 0].cpu().numpy() for m in models])


def timing_table(names: Sequence[str], models: Sequence[nn.Module], device: torch.device, size: int = 512,
                 repeats: int = 10, warmup: int = 2, threshold: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """ms per image for each model alone and for the whole ensemble (forwards + the paper's five rules)."""
    image = torch.from_numpy(np.random.default_rng(seed).random((1, 1, size, size), dtype=np.float32)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for name, model in zip(names, models):
        seconds = mean_seconds(lambda: ensemble_forward([model], image), device, repeats, warmup)
        rows.append({"what": name, "models": 1, "params_millions": parameter_count(model) / 1e6,
                     "ms_per_image": 1000 * seconds})

    def whole_ensemble():
        probs = ensemble_forward(models, image)
        return [combine(probs, method, threshold) for method in METHODS]

    seconds = mean_seconds(whole_ensemble, device, repeats, warmup)
    rows.append({"what": "Ensemble (forwards + 5 rules)", "models": len(models),
                 "params_millions": sum(r["params_millions"] for r in rows), "ms_per_image": 1000 * seconds})
    table = pd.DataFrame(rows)
    table["peak_memory_mb"] = peak_memory_mb(device)
    table["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    table["image_size"] = size
    return table
