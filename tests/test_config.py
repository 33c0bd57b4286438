"""Profiles: merging, overrides and one clear error for each kind of mistake."""

from pathlib import Path

import pytest
import yaml

from spineseg.errors import ConfigError
from spineseg.study.core.artifacts import NOTEBOOKS
from spineseg.study.core.config import Profile, load_profile, parse_override
from spineseg.study.runner import parse_stages

PARAMS = Path(__file__).resolve().parents[1] / "params"


@pytest.mark.parametrize("name", ["smoke", "quick", "paper", "aasce"])
def test_shipped_profiles_validate(name):
    cfg = load_profile(PARAMS / f"{name}.yaml")
    assert isinstance(cfg, Profile) and cfg.description


def test_paper_profile_has_the_papers_hyperparameters():
    cfg = load_profile(PARAMS / "paper.yaml")
    s1, s2, s3 = cfg.stage1, cfg.stage2, cfg.stage3
    assert (s1.encoder, s1.repeats, s1.image_size, s1.batch_size, s1.lr, s1.patience, s1.max_epochs) == (
        "VGG16", 50, (256, 256), 4, 1e-4, 10, 100)
    assert len(s2.encoders) == 20 and "None" in s2.encoders and "EfficientNetB6" in s2.encoders
    assert (s2.repeats, s2.max_epochs, s2.patience, s2.top_k, s2.min_val_dsc, s2.pretrained) == (
        10, 300, 25, 10, 0.915, "imagenet")
    assert (s3.image_size, s3.lr) == ((512, 512), 1e-5)
    assert cfg.stage4.threshold == 0.5
    # the paper profile spells out nothing but the defaults
    assert cfg.model_dump(exclude={"description"}) == Profile().model_dump(exclude={"description"})


def _write(tmp_path, content: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_overrides_apply_with_types(tmp_path):
    path = _write(tmp_path, {"stage2": {"repeats": 2}})
    cfg = load_profile(path, dict([parse_override("stage2.repeats=3"), parse_override("stage3.lr=1e-3"),
                                   parse_override("stage2.encoders=[resnet34, mobilenetv2]")]))
    assert cfg.stage2.repeats == 3
    assert cfg.stage3.lr == pytest.approx(1e-3)
    assert cfg.stage2.encoders == ["ResNet34", "MobileNetV2"]  # canonical names


@pytest.mark.parametrize("content, fragment", [
    ({"stage2": {"repeat": 3}}, "unknown key stage2.repeat; known: repeats, image_size"),
    ({"stage9": {}}, "unknown key stage9; known: description, device"),
    ({"stage2": {"repeats": "three"}}, "stage2.repeats = 'three': Input should be a valid integer"),
    ({"stage1": {"lr": True}}, "stage1.lr = True: Input should be a valid number"),
    ({"stage2": {"encoders": ["ResNet35"]}}, "stage2.encoders.0 = 'ResNet35': unknown encoder 'ResNet35'"),
    ({"stage2": {"repeats": 0}}, "stage2.repeats = 0: Input should be greater than or equal to 1"),
    ({"stage3": {"image_size": 100}}, "stage3.image_size = 100: each side must be a multiple of 32"),
    ({"stage4": {"threshold": 1.5}}, "stage4.threshold = 1.5"),
    ({"stage4": {"methods": ["mean"]}}, "stage4.methods.0 = 'mean': Input should be 'max', 'min'"),
    ({"data": {"source": "web"}}, "data.source = 'web'"),
    ({"threads": -1}, "threads = -1: Input should be greater than or equal to 0"),
    ({"device": "tpu"}, "device = 'tpu': must be auto, cpu, cuda or cuda:<index>"),
    ({"stage2": {"architecture": "segformer9"}}, "stage2.architecture = 'segformer9': unknown architecture"),
    ({"analysis": {"dpi": 0}}, "analysis.dpi = 0"),
    ({"stage4": {"methods": []}}, "stage4.methods = []: List should have at least 1 item"),
    ({"stage2": {"encoders": ["ResNet34", "resnet34"]}}, "stage2.encoders = ['ResNet34', 'resnet34']: lists ['ResNet34'] more than once"),
    ({"stage4": {"timing_warmup": -1}}, "stage4.timing_warmup = -1"),
    ({"data": {"source": "folder"}}, "source: folder needs d1"),
    ({"two_stage": {"coordinates": True}}, "coordinates is not available for the crop model"),
    ({"two_stage": {"image_size": [100, 64]}}, "two_stage.image_size = [100, 64]: each side must be a multiple of 32"),
    ({"two_stage": {"margin": -1}}, "two_stage.margin = -1"),
    ({"data": {"later_batch": 0.2}}, "later_batch splits the AASCE training radiographs by acquisition date; it needs source: aasce"),
    ({"data": {"source": "aasce", "aasce_src": "x", "later_batch": 1}}, "data.later_batch = 1: Input should be less than 1"),
    ({"locator": {"repeats": 2}}, "the locator is trained once"),
    ({"locator": {"crop_height": 64}}, "crop_height is not available for the locator"),
    ({"locator": {"augmentation": "wild"}}, "locator.augmentation = 'wild'"),
    ({"locator": {"lr_schedule": "step"}}, "locator.lr_schedule = 'step'"),
    ({"stage4": {"choose_by": "hd95"}}, "stage4.choose_by = 'hd95'"),
])
def test_bad_profiles_name_the_key_and_file(tmp_path, content, fragment):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_bad_override_is_reported_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_profile(_write(tmp_path, {}), dict([parse_override("stage2.repeats=lots")]))
    assert str(info.value).startswith("--set stage2.repeats='lots': stage2.repeats = 'lots': Input should be a valid integer")
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("stage2.repeats")


def test_missing_or_invalid_profile_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(bad)


def test_a_key_given_twice_in_a_profile_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("stage2:\n  repeats: 2\n  lr: 1.0e-3\n  repeats: 5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: line 4: key 'repeats' is given twice"):
        load_profile(path)


def test_parse_stages():
    assert parse_stages(None) == list(range(len(NOTEBOOKS)))
    assert parse_stages("2,3") == [2, 3]
    assert parse_stages("1-3,5") == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="do not exist"):
        parse_stages("7")
    with pytest.raises(ValueError, match="use numbers"):
        parse_stages("two")
    with pytest.raises(ConfigError, match="runs backwards; write 1-3"):
        parse_stages("3-1")
    with pytest.raises(ConfigError, match="use numbers"):
        parse_stages("0-")


def test_sizes_may_be_tall(tmp_path):
    cfg = load_profile(_write(tmp_path, {"data": {"source": "aasce", "aasce_src": "x", "size": [512, 192]},
                                         "stage2": {"image_size": [256, 96], "crop_height": 128}}))
    assert cfg.data.size == (512, 192) and cfg.stage2.image_size == (256, 96) and cfg.stage3.image_size == (512, 512)
    with pytest.raises(ConfigError, match=r"stage2.image_size = \[256, 100\]: each side must be a multiple of 32"):
        load_profile(_write(tmp_path, {"stage2": {"image_size": [256, 100]}}))
    with pytest.raises(ConfigError, match="crop_height 288 must be a multiple of 32 and at most the image height 256"):
        load_profile(_write(tmp_path, {"stage2": {"image_size": [256, 96], "crop_height": 288}}))
    with pytest.raises(ConfigError, match="the synthetic radiographs are square"):
        load_profile(_write(tmp_path, {"data": {"size": [512, 192]}}))


def test_targets_are_checked(tmp_path):
    assert load_profile(_write(tmp_path, {"stage2": {"targets": ["binary", "levels"]}})).stage2.targets == ["binary", "levels"]
    with pytest.raises(ConfigError, match="stage2.targets.0 = 'instances'"):
        load_profile(_write(tmp_path, {"stage2": {"targets": ["instances"]}}))


def test_weights_per_encoder_and_scratch_twins(tmp_path):
    stage2 = {"encoders": ["None", "MobileNetV2", "efficientnetlite0"], "pretrained": "none",
              "encoder_weights": {"EfficientNetLite0": "imagenet"}, "scratch_twins": ["EfficientNetLite0"]}
    s2 = load_profile(_write(tmp_path, {"stage2": stage2})).stage2
    assert [s2.weights_of(e) for e in s2.encoders] == ["none", "none", "imagenet"]
    assert Profile().stage2.weights_of("None") == "none"  # the encoder-less U-Net has no ImageNet weights
    for change, fragment in [({"scratch_twins": ["MobileNetV2"]}, "already train from scratch"),
                             ({"scratch_twins": ["ResNet34"]}, "not in stage2.encoders"),
                             ({"encoder_weights": {"ResNet34": "imagenet"}}, "not in stage2.encoders"),
                             ({"encoder_weights": {"EfficientNetLite0": "ImageNet"}}, "encoder_weights")]:
        with pytest.raises(ConfigError, match=fragment):
            load_profile(_write(tmp_path, {"stage2": {**stage2, **change}}))


def _integer_keys(schema: dict, node: dict | None = None, prefix: str = "") -> list[str]:
    """Every integer setting of the schema, as dotted keys (optional ones too)."""
    node = schema if node is None else node
    keys = []
    for name, prop in node.get("properties", {}).items():
        if "$ref" in prop:
            keys += _integer_keys(schema, schema["$defs"][prop["$ref"].split("/")[-1]], f"{prefix}{name}.")
        elif "integer" in {prop.get("type"), *(option.get("type") for option in prop.get("anyOf", []))}:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_integer_setting_has_an_upper_bound_that_the_error_names(tmp_path):
    keys = _integer_keys(Profile.model_json_schema())
    assert {"stage1.repeats", "stage2.batch_size", "data.d1_count", "analysis.n_boot", "executor.slurm.jobs"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError) as info:
            load_profile(_write(tmp_path, {}), {key: 10**10})
        message = str(info.value)
        assert message.startswith(f"--set {key}=10000000000: {key} = 10000000000: ") and len(message) < 200, message
        assert "less than or equal to" in message or key == "executor.slurm.gpus", message
    with pytest.raises(ConfigError, match=r"stage2.image_size = 100000: each side must be at most 8192 pixels"):
        load_profile(_write(tmp_path, {"stage2": {"image_size": 100000}}))


def test_a_yaml_merge_key_shares_settings_and_keys_given_twice_are_still_refused(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("stage1: &training\n  repeats: 2\n  max_epochs: 3\nstage3:\n  <<: *training\n  repeats: 1\n")
    cfg = load_profile(path)
    assert (cfg.stage1.repeats, cfg.stage1.max_epochs, cfg.stage3.repeats, cfg.stage3.max_epochs) == (2, 3, 1, 3)
    path.write_text("stage1: &training\n  repeats: 2\nstage3:\n  <<: *training\n  repeats: 1\n  repeats: 4\n")
    with pytest.raises(ConfigError, match="line 6: key 'repeats' is given twice"):
        load_profile(path)


def test_a_profile_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: Radiographies du thorax, série B\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 39 is 0xe9\); save it as UTF-8"):
        load_profile(path)


def test_an_alias_bomb_gives_a_short_message(tmp_path):
    lines = ["stage2:", "  encoders:", "    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    - &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 6)]  # 9⁶ lols, 3.7 MB written out
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert "stage2.encoders.0 = ['lol', 'lol', 'lol', 'lol', ...]: Input should be a valid string" in message
    assert message.endswith("and 1 more") and len(message) < 1200
