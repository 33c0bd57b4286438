"""Where the tensors live: the device, its thread count and its mixed precision."""

from __future__ import annotations

import os

import torch

from spineseg.errors import ConfigError

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


def autocast(device: torch.device):
    """fp16 autocast on CUDA (the article's GPU setting); plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
