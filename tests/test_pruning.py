"""Gradient-sensitivity pruning really makes a network smaller, and a pruned network saves and loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rectangle_samples
from spineseg import pruning
from spineseg.models import build_model
from spineseg.predict import Segmenter

pytestmark = pytest.mark.usefixtures("torch_single_thread")
CPU = torch.device("cpu")


def _data(n: int = 8, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    samples = rectangle_samples(n, size=size)
    return np.stack([s.image for s in samples]).astype(np.float32) / 255, np.stack([s.mask for s in samples]).astype(np.uint8)


def _model(encoder: str = "ResNet34") -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(build_model(encoder))


@pytest.mark.parametrize("encoder", ["ResNet34", "MobileNetV2"])
def test_pruning_half_the_filters_shrinks_the_network_and_its_file(encoder, tmp_path):
    images, masks = _data()
    full = _model(encoder)
    full_params, full_bytes = pruning.parameters(full), pruning.save(full, tmp_path / "full.pt")
    pruned = pruning.prune(_model(encoder), 0.5, images, masks, CPU)
    pruned_params, pruned_bytes = pruning.parameters(pruned), pruning.save(pruned, tmp_path / "pruned.pt")
    assert pruned_params < 0.5 * full_params and pruned_bytes < 0.5 * full_bytes
    out = pruned.eval()(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    # the saved network loads into a freshly built one of the original architecture
    restored = pruning.load(_model(encoder), tmp_path / "pruned.pt").eval()
    assert pruning.parameters(restored) == pruned_params
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(restored(x), pruned(x))


def _surviving_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of `before` the rows of `after` are (torch-pruning keeps the survivors in order)."""
    return [int(torch.argmin(((before - row) ** 2).flatten(1).sum(1))) for row in after]


def test_the_least_sensitive_filters_go_first():
    images, masks = _data()
    model = _model()
    pruning.accumulate_sensitivity(model, images, masks, CPU)
    stem, block = model.net.encoder.conv1, model.net.encoder.layer1[0]
    # a filter's sensitivity: its own weights, its BatchNorm, and the next convolution's weights that read it
    score = ((block.conv1.weight.grad * block.conv1.weight).abs().sum(dim=(1, 2, 3))
             + (block.bn1.weight.grad * block.bn1.weight).abs() + (block.bn1.bias.grad * block.bn1.bias).abs()
             + (block.conv2.weight.grad * block.conv2.weight).abs().sum(dim=(0, 2, 3)))
    stem_before, conv_before = stem.weight.detach().clone(), block.conv1.weight.detach().clone()
    pruned = pruning.prune(model, 0.25, images, masks, CPU)
    # the stem reads the one-channel image, so its rows compare directly; they name the channels block.conv1 still reads
    inputs_kept = _surviving_rows(stem_before, pruned.net.encoder.conv1.weight.detach())
    kept = _surviving_rows(conv_before[:, inputs_kept], pruned.net.encoder.layer1[0].conv1.weight.detach())
    assert len(kept) == len(set(kept)) < len(conv_before)
    removed = sorted(set(range(len(conv_before))) - set(kept))
    assert score[kept].mean() > score[removed].mean()
    assert int(torch.argmax(score)) in kept


def test_no_pruning_changes_nothing_and_a_bad_fraction_is_refused():
    images, masks = _data()
    model = _model()
    before = pruning.parameters(model)
    assert pruning.parameters(pruning.prune(model, 0.0, images, masks, CPU)) == before
    with pytest.raises(ValueError, match="pruning fraction"):
        pruning.prune(model, 1.0, images, masks, CPU)
