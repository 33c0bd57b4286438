"""`spineseg predict`'s pipeline with untrained members: what it refuses, what it reports, what a rerun redoes,
and that it feeds each member what the study's loader fed it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spineseg.errors import ConfigError
from spineseg.models import build_model
from spineseg.predict import Segmenter
from spineseg.study.apply import Ensemble, InferenceOptions, Member, predict_files

pytestmark = pytest.mark.usefixtures("torch_single_thread")
CPU = InferenceOptions(device="cpu")
QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def members() -> Ensemble:
    torch.manual_seed(0)
    return Ensemble([Member("MobileNetV2", Segmenter(build_model("MobileNetV2")).eval(), (64, 64))])


class Constant(torch.nn.Module):
    """A network that sees nothing but its inputs, which it keeps, and says `logit` everywhere."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit, self.seen = logit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.full_like(x[:, :1], self.logit)


def _constant(logit: float, size=(64, 64)) -> Ensemble:
    return Ensemble([Member("constant", Segmenter(Constant(logit)), size)])


def _folder(root, names) -> object:
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in names:
        Image.fromarray(rng.integers(0, 255, (80, 48), dtype=np.uint8)).save(root / name)
    return root


def test_two_files_that_would_share_outputs_are_refused_by_name(members, tmp_path):
    inputs = _folder(tmp_path / "in", ["x.png", "x.jpg"])
    with pytest.raises(ConfigError, match=r"x\.(png|jpg) and .*x\.(png|jpg) would both be written as `x`"):
        predict_files(members, inputs, tmp_path / "out", CPU, **QUIET)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "named"), [({"threshold": 50.0}, "--threshold"), ({"batch_size": 0}, "--batch-size"),
                                                  ({"device": "gpu"}, "--device"), ({"precision": "fp8"}, "--precision")])
def test_bad_options_are_one_error_naming_the_flag(arguments, named):
    with pytest.raises(ConfigError, match=named):
        InferenceOptions(**arguments)


def test_a_bad_rule_is_refused_before_any_image_is_read(members, tmp_path):
    inputs = _folder(tmp_path / "in", ["a.png"])
    with pytest.raises(ConfigError, match="--rule 'vote'"):
        predict_files(members, inputs, tmp_path / "out", CPU, rule="vote", **QUIET)
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_another_rule_or_threshold_redoes_the_images(members, tmp_path):
    inputs, out = _folder(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    at_03 = InferenceOptions(device="cpu", threshold=0.3)
    assert sorted(predict_files(members, inputs, out, CPU, rule="soft", **QUIET).written) == ["a", "b"]
    assert sorted(predict_files(members, inputs, out, CPU, rule="soft", **QUIET).skipped) == ["a", "b"]
    assert sorted(predict_files(members, inputs, out, CPU, rule="max", **QUIET).written) == ["a", "b"]
    assert sorted(predict_files(members, inputs, out, at_03, rule="max", **QUIET).written) == ["a", "b"]
    with_tta = InferenceOptions(device="cpu", threshold=0.3, tta=True)
    assert sorted(predict_files(members, inputs, out, with_tta, rule="max", **QUIET).written) == ["a", "b"]
    table = pd.read_csv(out / "predictions.csv")
    assert set(table["rule"]) == {"max"} and np.allclose(table["threshold"], 0.3) and table["tta"].all()


def test_a_stored_study_image_reaches_the_model_as_the_study_fed_it(tmp_path):
    """The study resizes its stored images with PIL's area-aware bilinear; predict must do the same, not torch's
    bilinear without antialiasing (on an AASCE image the two differed by 0.095 at the 99th percentile)."""
    from conftest import column_samples
    from spineseg.data import load_split, write_dataset

    folder = write_dataset(tmp_path, "d1", column_samples(10, height=192, width=64))
    studied = load_split(folder, "train", (64, 32))
    ensemble = _constant(-20.0, (64, 32))
    ensemble = Ensemble(ensemble.members, grid=(192, 64))
    first = folder / "images" / f"{studied.ids[0]}.png"
    predict_files(ensemble, first, tmp_path / "out", CPU, **QUIET)
    seen = ensemble.members[0].model.net.seen[0][0, 0].numpy()
    assert seen.shape == (64, 32) and np.array_equal(seen, studied.images[0])


def test_an_empty_mask_is_reported_per_image_and_in_the_summary(tmp_path):
    inputs = _folder(tmp_path / "in", ["a.png", "b.png"])
    said = []
    report = predict_files(_constant(-20.0), inputs, tmp_path / "out", CPU, log=said.append)
    assert report.empty == ["a", "b"]
    assert [line for line in said if line.startswith("warning:")] == [
        "warning: a: empty mask (nothing reached T = 0.5); see its overlay",
        "warning: b: empty mask (nothing reached T = 0.5); see its overlay"]
    assert said[-1].startswith("2 written (2 with an empty mask: a, b), 0 skipped")


def test_an_unreadable_file_is_reported_once_with_its_path_once(members, tmp_path):
    inputs = _folder(tmp_path / "in", ["a.png"])
    broken = inputs / "broken.png"
    broken.write_bytes(b"not an image")
    said = []
    report = predict_files(members, inputs, tmp_path / "out", CPU, log=said.append)
    assert report.written == ["a"] and list(report.failed) == [str(broken)]
    lines = [line for line in said if str(broken) in line]
    assert len(lines) == 1 and lines[0].count(str(broken)) == 1 and lines[0].startswith(f"skipped {broken}: ")


def test_outputs_inside_the_input_folder_are_never_read_back(members, tmp_path):
    inputs = _folder(tmp_path / "in", ["a.png"])
    for _ in range(2):
        report = predict_files(members, inputs, inputs / "predicted", CPU, **QUIET)
    assert report.skipped == ["a"] and not report.written
    assert pd.read_csv(inputs / "predicted/predictions.csv")["id"].tolist() == ["a"]


def test_an_out_that_is_a_file_is_refused_before_inference(members, tmp_path):
    inputs = _folder(tmp_path / "in", ["a.png"])
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match="--out .*taken is a file"):
        predict_files(members, inputs, tmp_path / "taken", CPU, **QUIET)


def test_ids_that_pandas_reads_as_missing_stay_ids(members, tmp_path):
    inputs, out = _folder(tmp_path / "in", ["NA.png", "nan.png", "null.png"]), tmp_path / "out"
    assert sorted(predict_files(members, inputs, out, CPU, **QUIET).written) == ["NA", "nan", "null"]
    assert sorted(predict_files(members, inputs, out, CPU, **QUIET).skipped) == ["NA", "nan", "null"]
    assert len(pd.read_csv(out / "predictions.csv", keep_default_na=False)) == 3


def test_an_interrupted_run_resumes_after_the_last_finished_batch(members, tmp_path, monkeypatch):
    import spineseg.study.apply as apply

    inputs, out = _folder(tmp_path / "in", ["a.png", "b.png", "c.png"]), tmp_path / "out"
    real, calls = apply._member_probabilities, []

    def interrupted_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(apply, "_member_probabilities", interrupted_at_the_third)
    one_by_one = InferenceOptions(device="cpu", batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        predict_files(members, inputs, out, one_by_one, **QUIET)
    monkeypatch.undo()
    again = predict_files(members, inputs, out, one_by_one, **QUIET)
    assert again.skipped == ["a", "b"] and again.written == ["c"]


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


def test_an_image_too_large_to_decode_is_one_line_and_the_run_goes_on(members, tmp_path, monkeypatch):
    inputs = _folder(tmp_path / "in", ["huge.png"])
    Image.fromarray(np.full((30, 30), 128, dtype=np.uint8)).save(inputs / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 80 x 48 is over twice the limit, as 180 MP is by default
    said = []
    report = predict_files(members, inputs, tmp_path / "out", CPU, log=said.append)
    huge = str(inputs / "huge.png")
    assert report.written == ["small"] and list(report.failed) == [huge]
    assert report.failed[huge].startswith("DecompressionBombError: ")
    assert [line for line in said if huge in line] == [f"skipped {huge}: {report.failed[huge]}"]


@pytest.mark.parametrize("content", [None, b"not a zip"])
def test_a_model_that_is_no_bundle_is_one_error_naming_it(tmp_path, content):
    from spineseg.study.bundle import open_bundle

    path = tmp_path / "x.zip"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"--model {path}( does not exist|: not a bundle)"), open_bundle(path):
        pass


def test_two_stage_without_a_crop_model_says_so_before_any_model_loads(tmp_path):
    from spineseg.study.apply import predict_with
    from spineseg.study.bundle import EnsembleFolders

    found = EnsembleFolders([(tmp_path / "never-read", 0.9)], None, 0.5, "auto", None, "the bundle x.zip")
    with pytest.raises(ConfigError, match="--two-stage: the bundle x.zip has no trained crop model"):
        predict_with(found, tmp_path, tmp_path / "out", CPU, two_stage=True)


def test_options_without_a_threshold_take_the_studys_t(tmp_path, monkeypatch):
    """`predict_radiographs(study, …, InferenceOptions(tta=True))` predicts at the study's T, not at 0.5."""
    from spineseg.study import apply

    seen = {}
    monkeypatch.setattr(apply, "load_ensemble", lambda found, device, two_stage: "ensemble")
    monkeypatch.setattr(apply, "predict_files", lambda ensemble, source, out, options, *a: seen.update(t=options.threshold))
    found = SimpleNamespace(crop=None, locator=None, threshold=0.3, origin="a study")
    apply.predict_with(found, tmp_path, tmp_path / "out", InferenceOptions(device="cpu", tta=True))
    assert seen["t"] == 0.3
    apply.predict_with(found, tmp_path, tmp_path / "out", InferenceOptions(device="cpu", threshold=0.7))
    assert seen["t"] == 0.7


def _bundle_zip(path, manifest: dict, member: bytes = b"weights") -> None:
    import json
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bundle.json", json.dumps(manifest))
        archive.writestr("members/0-a/best.pt", member)


def test_a_damaged_or_odd_bundle_is_one_error_naming_it(tmp_path):
    from spineseg.study.bundle import FORMAT, open_bundle

    manifest = {"format": FORMAT, "members": [{"folder": "members/0-a", "validation_dsc": 0.9}], "crop_model": 3,
                "threshold": 0.5, "precision": "auto"}
    odd = tmp_path / "odd.zip"
    _bundle_zip(odd, manifest)
    with pytest.raises(ConfigError, match=f"--model {odd}: 3 is not a folder inside the bundle"), open_bundle(odd):
        pass
    empty_crop = tmp_path / "empty_crop.zip"
    _bundle_zip(empty_crop, {**manifest, "crop_model": ""})
    with open_bundle(empty_crop) as found:
        assert found.crop is None
    damaged = tmp_path / "damaged.zip"
    _bundle_zip(damaged, {**manifest, "crop_model": None}, member=b"x" * 4000)
    data = bytearray(damaged.read_bytes())
    at = data.index(b"x" * 100)
    data[at:at + 100] = b"y" * 100  # the member's bytes no longer match its CRC
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"--model {damaged}: the zip is damaged"), open_bundle(damaged):
        pass


def test_a_crop_model_trained_on_another_grid_than_its_members_is_refused_at_load(tmp_path):
    from spineseg.crops import CropGeometry
    from spineseg.saved_models import ModelDescription
    from spineseg.study.apply import load_ensemble
    from spineseg.study.bundle import EnsembleFolders
    from spineseg.train import BEST

    def saved(name: str, **changes) -> object:
        description = ModelDescription(name, "MobileNetV2", "unet", "binary", (64, 32), **{"grid": (128, 64), **changes})
        folder = tmp_path / name
        folder.mkdir()
        torch.save(description.build().state_dict(), folder / BEST)
        description.save(folder)
        return folder

    member = saved("member")
    found = EnsembleFolders([(member, 0.9)], saved("crop", crop=CropGeometry((64, 32))), 0.5, "auto", "max", "the bundle x.zip")
    assert load_ensemble(found, torch.device("cpu"), two_stage=True).crop is not None
    (tmp_path / "crop").rename(tmp_path / "old")
    found = EnsembleFolders([(member, 0.9)], saved("crop", crop=CropGeometry((64, 32)), grid=(256, 128)), 0.5, "auto",
                            "max", "the bundle x.zip")
    with pytest.raises(ConfigError, match=r"crop model of the bundle x.zip was trained on images stored at \(256, 128\), "
                                          r"its members at \(128, 64\)"):
        load_ensemble(found, torch.device("cpu"), two_stage=True)


def test_predicting_with_a_run_that_predates_model_json_reads_it_and_writes_nothing(tmp_path):
    from spineseg.errors import StageOrderError
    from spineseg.study.bundle import _finished
    from spineseg.study.store import RunSpec
    from spineseg.train import TrainSettings

    spec = RunSpec("stage3", "MobileNetV2", (64, 64), TrainSettings(batch_size=2, lr=1e-3, max_epochs=1, patience=1,
                                                                            augment=False, seed=0))
    study = SimpleNamespace(name="old", layout=SimpleNamespace(store=tmp_path))
    files = spec.files(tmp_path)
    files.done.parent.mkdir(parents=True)
    files.done.write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(StageOrderError, match=r"no model.json.*--profile old --stages 3` once; it trains nothing"):
        _finished(study, spec)
    assert sorted(tmp_path.rglob("*")) == before
    files.model.write_text("{}")
    assert _finished(study, spec) == files.folder


def test_nearest_takes_each_pixel_from_the_mask_pixel_nearest_its_centre():
    from spineseg.study.apply import nearest

    mask = np.random.default_rng(0).random((5, 3)) > 0.5
    assert nearest(mask, (5, 3)) is mask
    assert np.array_equal(nearest(mask, (15, 6)), np.kron(mask, np.ones((3, 2), dtype=bool)))
    assert np.array_equal(nearest(np.kron(mask, np.ones((3, 2), dtype=bool)), (5, 3)), mask)
