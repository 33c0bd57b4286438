"""The encoder registry as data: the article's backbone names → segmentation-models-pytorch encoders.

Torch-free on purpose: validating a profile and `spineseg --help` read these tables without loading
torch. `spineseg.models` builds the networks from them.
"""

from __future__ import annotations

from types import MappingProxyType

from spineseg.errors import ModelError

# Paper name → smp encoder name (None: the encoder-less U-Net of `spineseg.models`).
ENCODERS = MappingProxyType({
    "None": None,
    "VGG16": "vgg16",
    "ResNet34": "resnet34",
    "ResNet50": "resnet50",
    "ResNet152": "resnet152",
    # timm's `seresnet34` has no pretrained weights at all; `legacy_seresnet34` is the ImageNet one
    "SEResNet34": "tu-legacy_seresnet34",
    "SEResNet50": "se_resnet50",
    "SEResNet152": "se_resnet152",
    "ResNeXt50": "resnext50_32x4d",
    "SEResNeXt50": "se_resnext50_32x4d",
    "DenseNet121": "densenet121",
    "InceptionV3": "tu-inception_v3",
    "InceptionResNetV2": "inceptionresnetv2",
    "MobileNetV2": "mobilenet_v2",
    **{f"EfficientNetB{i}": f"efficientnet-b{i}" for i in range(7)},
})
# The article's twenty backbones, in its table order (VGG16 is stage 1's).
PAPER_ENCODERS = tuple(name for name in ENCODERS if name != "VGG16")

# smp architecture names (keys of smp.create_model) this project offers, with their printed names.
ARCHITECTURES = MappingProxyType({
    "unet": "U-Net",
    "unetplusplus": "U-Net++",
    "linknet": "LinkNet",
    "fpn": "FPN",
    "pspnet": "PSPNet",
})

# Encoder weights: none (from scratch) or ImageNet. The encoder-less U-Net has only "none".
PRETRAINED = ("none", "imagenet")


def canonical_encoder(name: str) -> str:
    """Resolve a paper encoder name case-insensitively; unknown names list the known ones."""
    lookup = {key.lower(): key for key in ENCODERS}
    key = lookup.get(str(name).lower())
    if key is None:
        raise ModelError(f"unknown encoder {name!r}; known encoders: {', '.join(ENCODERS)}")
    return key


def canonical_architecture(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return key


def has_imagenet_weights(encoder: str) -> bool:
    """Every encoder of the table has ImageNet weights except the encoder-less U-Net."""
    return ENCODERS[canonical_encoder(encoder)] is not None
