"""Gradient-sensitivity filter pruning (as Dastgir et al. 2025 prune LinkNet-152), done structurally.

A filter's sensitivity is the sum, over one pass of the given images, of |∂L/∂W ⊙ W| over its weights
(torch-pruning's Taylor importance, summed over the filters that must go together); in every prunable
convolution the fraction p of filters with the lowest sensitivity is removed, and torch-pruning rewires
the layers that depend on them, so the network really gets smaller. Fine-tuning afterwards is the
caller's (`spineseg.train.fit` at a reduced learning rate). The output layer is never pruned.

A pruned network cannot load into its original architecture as it stands: `save` writes the plain
state dict plus the integer shape attributes of every layer (channels, features, groups), and `load`
reshapes a freshly built network to them before loading, so the file loads with ``weights_only=True``
(torch-pruning's own state dict pickles whole modules and does not).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch_pruning as tp

from spineseg.predict import Segmenter, as_batch


def accumulate_sensitivity(model: Segmenter, images: np.ndarray, targets: np.ndarray, device: torch.device,
                           batch_size: int = 4) -> None:
    """Leave in every parameter's .grad the gradient of the summed loss over `images` (BatchNorm frozen)."""
    model.to(device).eval()
    model.zero_grad(set_to_none=True)
    for start in range(0, len(images), batch_size):
        x = as_batch(images[start:start + batch_size], device)
        y = torch.from_numpy(np.array(targets[start:start + batch_size])).to(device)
        (model.objective.loss(model.logits(x), y) * len(x)).backward()


def _output_layers(model: Segmenter) -> list[torch.nn.Module]:
    head = getattr(model.net, "segmentation_head", None) or getattr(model.net, "head", None)
    return [head] if head is not None else []


def prune(model: Segmenter, fraction: float, images: np.ndarray, targets: np.ndarray, device: torch.device,
          batch_size: int = 4) -> Segmenter:
    """Remove the fraction `fraction` of the least sensitive filters of every prunable convolution, in place."""
    if not 0 <= fraction < 1:
        raise ValueError(f"pruning fraction must lie in [0, 1), got {fraction}")
    if fraction == 0:
        return model
    accumulate_sensitivity(model, images, targets, device, batch_size)
    channels = 3 if model.coordinates else 1
    example = torch.rand(1, channels, *images.shape[1:], device=device)
    pruner = tp.pruner.MetaPruner(model.net, example, tp.importance.TaylorImportance(), pruning_ratio=fraction,
                                  ignored_layers=_output_layers(model))
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")


def _shape_attributes(net: torch.nn.Module) -> dict[str, dict[str, int]]:
    return {name: {attr: getattr(module, attr) for attr in _SHAPE_ATTRIBUTES if isinstance(getattr(module, attr, None), int)}
            for name, module in net.named_modules()}


def save(model: Segmenter, path: str | os.PathLike) -> int:
    """Write a (pruned) network; returns the file's size in bytes."""
    torch.save({"state_dict": model.net.state_dict(), "shapes": _shape_attributes(model.net)}, path)
    return os.path.getsize(path)


def load(model: Segmenter, path: str | os.PathLike) -> Segmenter:
    """Restore a pruned network saved by `save` into a freshly built model of the original architecture."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved["state_dict"]
    modules = dict(model.net.named_modules())
    for name, attributes in saved["shapes"].items():
        for attr, value in attributes.items():
            setattr(modules[name], attr, value)
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        current = getattr(module, leaf)
        if isinstance(current, torch.nn.Parameter):
            setattr(module, leaf, torch.nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad))
        elif isinstance(current, torch.Tensor):
            module.register_buffer(leaf, torch.empty_like(tensor))
    model.net.load_state_dict(state)
    return model
