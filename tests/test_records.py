"""The study's decisions as typed records: written and read only through `Selection`, `Learned` and `Stage6Choices`."""

import json

import pytest

from spineseg.errors import StageOrderError
from spineseg.study.core.records import Learned, PruningResult, Selection, Stage6Choices

LEARNED = Learned(tuned_threshold=0.45, stacker={"coef": [1.0]}, temperatures={"A": 1.2}, models=["A"], best_model="A",
                  best_rule="two_stage", validation_dsc={"models": {"A": 0.8}, "rules": {"soft": 0.8, "two_stage": 0.85}},
                  two_stage_locator="max")


def test_a_selection_round_trips_and_names_each_encoder_once(tmp_path):
    selection = Selection((("EfficientNetLite0", "levels"), ("MobileNetV2", "binary"), ("EfficientNetLite0", "binary")))
    selection.save(tmp_path / "selection.json")
    assert Selection.load(tmp_path / "selection.json") == selection
    assert selection.encoders == ["EfficientNetLite0", "MobileNetV2"]
    assert json.loads((tmp_path / "selection.json").read_text())["candidates"][0] == {"encoder": "EfficientNetLite0",
                                                                                       "target": "levels"}


def test_learned_round_trips_with_and_without_a_crop_model(tmp_path):
    LEARNED.save(tmp_path / "learned.json")
    assert Learned.load(tmp_path / "learned.json") == LEARNED
    without = Learned(**{**LEARNED.__dict__, "two_stage_locator": None, "best_rule": "soft"})
    without.save(tmp_path / "plain.json")
    assert "two_stage_locator" not in json.loads((tmp_path / "plain.json").read_text())
    assert Learned.load(tmp_path / "plain.json") == without


def test_a_missing_record_names_the_stage_that_writes_it(tmp_path):
    with pytest.raises(StageOrderError, match="selection.json is missing: run stage 2"):
        Selection.load(tmp_path / "selection.json")
    with pytest.raises(StageOrderError, match="learned.json is missing: run stage 4"):
        Learned.load(tmp_path / "learned.json")


def test_a_record_without_a_field_it_needs_names_the_field(tmp_path):
    values = json.loads(json.dumps(LEARNED.__dict__))
    del values["best_rule"]
    (tmp_path / "learned.json").write_text(json.dumps(values))
    with pytest.raises(StageOrderError, match="has no best_rule.*rerun stage 4"):
        Learned.load(tmp_path / "learned.json")
    (tmp_path / "selection.json").write_text(json.dumps({"encoders": ["A"]}))
    with pytest.raises(StageOrderError, match="does not list candidates"):
        Selection.load(tmp_path / "selection.json")


def test_stage6_choices_round_trip_with_their_pruning_results(tmp_path):
    choices = Stage6Choices(("unetplusplus", "MobileNetV2"), {"FPN + InceptionV3": "its strides do not fit"},
                            ("unet", "MobileNetV2"), (PruningResult(0.0, "p = 0.00", 6_600_000, 25.3, 41.0, (256, 256)),
                                                      PruningResult(0.3, "p = 0.30", 4_700_000, 18.0, 33.5, (256, 256))))
    choices.save(tmp_path / "chosen.json")
    assert Stage6Choices.load(tmp_path / "chosen.json") == choices
    without = Stage6Choices(("unet", "None"), {})
    without.save(tmp_path / "plain.json")
    assert Stage6Choices.load(tmp_path / "plain.json") == without


def test_stage6_choices_of_another_version_name_the_stage(tmp_path):
    (tmp_path / "chosen.json").write_text(json.dumps({"best_pair": ["unet", "None"]}))  # no `skipped`
    with pytest.raises(StageOrderError, match="another version.*rerun stage 6"):
        Stage6Choices.load(tmp_path / "chosen.json")
    (tmp_path / "summary.json").write_text(json.dumps({"fraction": 0.0, "group": "unpruned"}))
    with pytest.raises(StageOrderError, match="not a pruning result.*rerun stage 6"):
        PruningResult.load(tmp_path / "summary.json")
