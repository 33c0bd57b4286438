"""Every shipped profile builds every model it names, and weights can come from files the profile names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_rectangles
from spineseg.encoders import PACKAGED_IMAGENET
from spineseg.errors import ConfigError
from spineseg.models import build_model
from spineseg.study.core.session import StudyData, open_study
from spineseg.study.runs.store import starting_model
from spineseg.study.stages.stage0_data import prepare_data
from spineseg.study.stages.stage1_augmentation import stage1_specs
from spineseg.study.stages.stage2_selection import stage2_specs

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (ROOT / "params").glob("*.yaml"))
pytestmark = pytest.mark.usefixtures("block_network", "torch_single_thread")


def _distinct_models() -> list[tuple[str, str, str]]:
    seen = {}
    for profile in PROFILES:
        study = open_study(profile, project_dir=ROOT)
        data = StudyData(Path("unused"), fingerprint="x")
        for spec in (*stage1_specs(study, data)[:1], *stage2_specs(study, data)):
            seen.setdefault((spec.encoder, spec.architecture), (profile, spec.pretrained))
    return [(profile, encoder, architecture) for (encoder, architecture), (profile, _) in sorted(seen.items())]


@pytest.mark.parametrize("profile, encoder, architecture", _distinct_models())
def test_every_model_of_every_shipped_profile_builds_and_runs(profile, encoder, architecture):
    model = build_model(encoder, architecture, pretrained="none").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 96, 96))
    assert out.shape == (1, 1, 96, 96), (profile, encoder)


def test_the_plain_unet_trains_from_scratch_beside_imagenet_encoders_in_paper():
    study = open_study("paper", project_dir=ROOT)
    specs = {spec.encoder: spec for spec in stage2_specs(study, StudyData(Path("unused"), fingerprint="x"))}
    assert specs["None"].pretrained == "none"
    assert {spec.pretrained for name, spec in specs.items() if name != "None"} == {"imagenet"}


def test_weights_path_per_encoder_through_a_profile(tmp_path):
    write_rectangles(tmp_path / "data", "d1", 20)
    torch.manual_seed(11)
    reference = build_model("MobileNetV2").encoder.state_dict()
    torch.save(reference, tmp_path / "mobilenet_encoder.pt")
    (tmp_path / "params").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params/mine.yaml").write_text(yaml.safe_dump({
        "threads": 1, "data": {"source": "folder", "d1": "data/d1"},
        "stage2": {"encoders": ["MobileNetV2", "ResNet34"], "pretrained": "imagenet", "repeats": 1, "image_size": 64,
                   "weights_path": {"mobilenetv2": "mobilenet_encoder.pt"}}}))
    study = open_study("mine", project_dir=tmp_path)
    specs = {spec.encoder: spec for spec in stage2_specs(study, prepare_data(study))}
    assert specs["MobileNetV2"].weights_path == str(tmp_path / "mobilenet_encoder.pt")
    assert specs["ResNet34"].weights_path is None
    model = starting_model(specs["MobileNetV2"], study.layout.store)
    assert all(torch.equal(model.net.encoder.state_dict()[k], v) for k, v in reference.items())
    (tmp_path / "mobilenet_encoder.pt").unlink()
    with pytest.raises(ConfigError, match=r"stage2.weights_path for MobileNetV2: .*mobilenet_encoder.pt does not exist"):
        stage2_specs(study, prepare_data(study))


@pytest.mark.parametrize("profile", ["smoke", "quick", "aasce"])
def test_the_cpu_profiles_ask_imagenet_only_of_what_installs_offline(profile, block_network, tmp_path, monkeypatch):
    """Their ensembles are of pre-trained networks, and every ImageNet weight they ask for is on disk: the
    models build with the network refused and empty hub caches."""
    for cache in ("HF_HOME", "HF_HUB_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(cache, str(tmp_path / cache))
    study = open_study(profile, project_dir=ROOT)
    specs = stage2_specs(study, StudyData(Path("unused"), fingerprint="x"))
    pretrained = {spec.encoder for spec in specs if spec.pretrained == "imagenet"}
    assert pretrained and pretrained <= set(PACKAGED_IMAGENET)
    for encoder in pretrained:
        build_model(encoder, pretrained="imagenet", in_channels=3 if study.cfg.stage2.coordinates else 1)
    assert not block_network  # nothing even tried to connect
