"""`spineseg predict`'s pipeline with an untrained member: what it refuses, and what a rerun redoes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spineseg.errors import ConfigError
from spineseg.models import build_model
from spineseg.predict import Segmenter
from spineseg.study.apply import Member, predict_files

pytestmark = pytest.mark.usefixtures("torch_single_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def members() -> list[Member]:
    torch.manual_seed(0)
    return [Member("MobileNetV2", Segmenter(build_model("MobileNetV2")).eval(), (64, 64))]


def _folder(root, names) -> object:
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in names:
        Image.fromarray(rng.integers(0, 255, (80, 48), dtype=np.uint8)).save(root / name)
    return root


def test_two_files_that_would_share_outputs_are_refused_by_name(members, tmp_path):
    inputs = _folder(tmp_path / "in", ["x.png", "x.jpg"])
    with pytest.raises(ConfigError, match=r"x\.(png|jpg) and .*x\.(png|jpg) would both be written as `x`"):
        predict_files(members, inputs, tmp_path / "out", CPU, log=lambda message: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "named"), [({"threshold": 50.0}, "--threshold"), ({"batch_size": 0}, "--batch-size"),
                                                  ({"rule": "vote"}, "--rule")])
def test_bad_arguments_are_one_error_naming_the_flag(members, tmp_path, arguments, named):
    inputs = _folder(tmp_path / "in", ["a.png"])
    with pytest.raises(ConfigError, match=named):
        predict_files(members, inputs, tmp_path / "out", CPU, log=lambda message: None, **arguments)


def test_a_rerun_with_another_rule_or_threshold_redoes_the_images(members, tmp_path):
    inputs, out = _folder(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    quiet = {"log": lambda message: None}
    assert sorted(predict_files(members, inputs, out, CPU, rule="soft", **quiet).written) == ["a", "b"]
    assert sorted(predict_files(members, inputs, out, CPU, rule="soft", **quiet).skipped) == ["a", "b"]
    assert sorted(predict_files(members, inputs, out, CPU, rule="max", **quiet).written) == ["a", "b"]
    assert sorted(predict_files(members, inputs, out, CPU, rule="max", threshold=0.3, **quiet).written) == ["a", "b"]
    assert sorted(predict_files(members, inputs, out, CPU, rule="max", threshold=0.3, tta=True, **quiet).written) == ["a", "b"]
    table = pd.read_csv(out / "predictions.csv")
    assert set(table["rule"]) == {"max"} and np.allclose(table["threshold"], 0.3) and table["tta"].all()


def test_an_overlay_outlines_the_mask_and_says_what_made_it():
    from spineseg.study.apply import OUTLINE_COLOUR, overlay

    image = np.full((240, 160), 0.5, dtype=np.float32)
    mask = np.zeros((240, 160), dtype=bool)
    mask[100:200, 60:120] = True
    drawn = overlay(image, mask, "max+crop, T = 0.4")
    assert drawn.shape == (240, 160, 3) and drawn.dtype == np.uint8
    assert (drawn[100, 60:120] == OUTLINE_COLOUR).all() and (drawn[100:200, 119] == OUTLINE_COLOUR).all()  # the edge
    inside = drawn[150, 90]
    assert not (inside == OUTLINE_COLOUR).all() and inside[0] > inside[2]  # tinted, not filled
    assert (drawn[220, 140] == 127).all()  # untouched outside the mask
    text = drawn[:30].astype(int)  # the rule and T, top left, yellow on black
    assert ((text[..., 0] > 200) & (text[..., 2] < 100)).sum() > 50 and (text == 0).all(axis=2).sum() > 50
    assert (overlay(image, mask, "soft, T = 0.5")[:30] != drawn[:30]).any()  # the text is what was asked
