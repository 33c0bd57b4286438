"""Where the tensors live: the device, its thread count and its mixed precision."""

from __future__ import annotations

import os

import torch

from spineseg.errors import ConfigError
from spineseg.names import PRECISIONS

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes the GPU when there is one; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return torch.device(name)


def configure_threads(threads: int = 0) -> int:
    """Use every core for intra-op work (0 = all); inter-op threads only add contention here."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def resolve_precision(precision: str, device: torch.device) -> str:
    """What ``auto`` means on this device: fp16 on CUDA (the article's GPU setting), fp32 on a CPU.

    bf16 stays opt-in on CPUs: on the AVX-512-BF16 CPU this project was measured on (no AMX), a bf16
    training step was slower than fp32 (`spineseg bench`, section 5), so ``auto`` does not choose it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    resolved = resolve_precision(precision, device)
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=resolved != "fp32")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
