"""A model folder that describes itself: model.json beside best.pt is all that loading needs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from spineseg.crops import CropGeometry
from spineseg.errors import ModelError
from spineseg.predict import predict
from spineseg.saved_models import MODEL_FILE, ModelDescription, load_model
from spineseg.train import BEST

pytestmark = pytest.mark.usefixtures("torch_single_thread")
CPU = torch.device("cpu")


def _saved(folder, **changes) -> tuple[ModelDescription, torch.nn.Module]:
    values = {"name": "MobileNetV2 (levels)", "encoder": "MobileNetV2", "architecture": "unet", "target": "levels",
              "input_size": (64, 32), "coordinates": True, "grid": (128, 64), "metrics": {"best_val_dsc": 0.7}}
    description = ModelDescription(**{**values, **changes})
    torch.manual_seed(0)
    model = description.build().eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / BEST)
    description.save(folder)
    return description, model


def test_a_model_folder_loads_with_nothing_else_and_predicts_as_the_model_did(tmp_path):
    description, model = _saved(tmp_path / "run")
    loaded_description, loaded = load_model(tmp_path / "run", CPU)
    assert loaded_description == description
    images = np.random.default_rng(0).random((2, 64, 32), dtype=np.float32)
    assert np.array_equal(predict(model, images, CPU).region, predict(loaded, images, CPU).region)
    written = json.loads((tmp_path / "run" / MODEL_FILE).read_text())
    assert written["in_channels"] == 3 and written["output_channels"]["8"] == "Th8" and len(written["output_channels"]) == 18
    assert written["region_channels"] == [8, 9, 10, 11] and "PIL" in written["pixels"]


def test_a_crop_models_geometry_and_an_efficientnet_lite_survive_the_round_trip(tmp_path):
    geometry = CropGeometry((64, 32), margin=0.5)
    description, model = _saved(tmp_path / "crop", encoder="EfficientNetLite0", target="binary", coordinates=False,
                                crop=geometry)
    loaded_description, loaded = load_model(tmp_path / "crop", CPU)
    assert loaded_description.crop == geometry and loaded_description.classes == {0: "Th8–Th11"}
    images = np.random.default_rng(1).random((1, 64, 32), dtype=np.float32)
    # the Lite encoder's input scaling lives in the rebuilt network, not in the weights
    assert np.array_equal(predict(model, images, CPU).region, predict(loaded, images, CPU).region)


def test_a_folder_without_model_json_or_of_another_format_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(ModelError, match=f"{tmp_path / MODEL_FILE} is missing"):
        load_model(tmp_path, CPU)
    (tmp_path / MODEL_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelError, match="format 'something-else'"):
        load_model(tmp_path, CPU)


@pytest.mark.parametrize("crop, fragment", [({"margin": 1.0}, "crop.size = {'margin': 1.0}: Field required"),
                                            ("box", "crop = 'box': Input should be a valid dictionary")])
def test_a_model_json_with_a_malformed_crop_is_one_error(tmp_path, crop, fragment):
    _saved(tmp_path)
    values = json.loads((tmp_path / MODEL_FILE).read_text())
    (tmp_path / MODEL_FILE).write_text(json.dumps({**values, "crop": crop}))
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / MODEL_FILE}: {fragment}")):
        load_model(tmp_path, CPU)


class Payload:
    """What a crafted weights file could carry: an object, whose unpickling could run code."""


def test_a_crafted_weights_file_is_refused_in_one_line_without_torchs_advice(tmp_path):
    _saved(tmp_path / "run")
    torch.save({"net.weight": Payload()}, tmp_path / "run" / BEST)
    with pytest.raises(ModelError) as refused:
        load_model(tmp_path / "run", CPU)
    message = str(refused.value)
    assert str(tmp_path / "run" / BEST) in message and "refused" in message
    assert "weights_only" not in message and "\n" not in message


def test_weights_of_another_network_are_one_error_naming_the_file(tmp_path):
    _saved(tmp_path / "run")
    _saved(tmp_path / "other", coordinates=False)
    (tmp_path / "run" / BEST).write_bytes((tmp_path / "other" / BEST).read_bytes())
    with pytest.raises(ModelError, match="does not fit this network"):
        load_model(tmp_path / "run", CPU)
