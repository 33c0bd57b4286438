"""`spineseg predict`'s pipeline with untrained members: what it refuses, what it reports, what a rerun redoes,
and that it feeds each member what the study's loader fed it."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spineseg.errors import ConfigError
from spineseg.models import build_model
from spineseg.predict import Segmenter
from spineseg.study.inference.apply import Ensemble, InferenceOptions, Member, predict_files

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
    import spineseg.study.inference.apply as apply

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
    from spineseg.study.inference.apply import OUTLINE_COLOUR, overlay

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


def test_an_image_between_pils_limit_and_twice_it_is_segmented_without_a_warning(members, tmp_path, monkeypatch):
    inputs = _folder(tmp_path / "in", ["large.png"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 80 x 48 = 3840 pixels: over the limit, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the read
        report = predict_files(members, inputs, tmp_path / "out", CPU, log=lambda line: None)
    assert report.written == ["large"] and not report.failed


@pytest.mark.parametrize("content", [None, b"not a zip"])
def test_a_model_that_is_no_bundle_is_one_error_naming_it(tmp_path, content):
    from spineseg.study.inference.bundle import open_bundle

    path = tmp_path / "x.zip"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"--model {path}( does not exist|: not a bundle)"), open_bundle(path):
        pass


def test_two_stage_without_a_crop_model_says_so_before_any_model_loads(tmp_path):
    from spineseg.study.inference.apply import predict_with
    from spineseg.study.inference.bundle import EnsembleFolders

    found = EnsembleFolders([(tmp_path / "never-read", 0.9)], None, 0.5, "auto", None, "the bundle x.zip")
    with pytest.raises(ConfigError, match="--two-stage: the bundle x.zip has no trained crop model"):
        predict_with(found, tmp_path, tmp_path / "out", CPU, two_stage=True)


def test_options_left_open_take_the_studys_t_and_flipping(tmp_path, monkeypatch):
    """`predict_radiographs(study, …, InferenceOptions())` predicts at the study's T, not at 0.5, and flips each
    image where the study's stage 3 evaluated its members so; what the options give overrides both."""
    from spineseg.study.inference import apply

    seen = {}
    monkeypatch.setattr(apply, "load_ensemble", lambda found, device, *variants: "ensemble")
    monkeypatch.setattr(apply, "predict_files",
                        lambda ensemble, source, out, options, *a: seen.update(t=options.threshold, tta=options.tta))
    found = SimpleNamespace(crop=None, locator=None, threshold=0.3, origin="a study", best_rule=None, members_hflip=True)
    apply.predict_with(found, tmp_path, tmp_path / "out", InferenceOptions(device="cpu"))
    assert seen == {"t": 0.3, "tta": True}
    apply.predict_with(found, tmp_path, tmp_path / "out", InferenceOptions(device="cpu", threshold=0.7, tta=False))
    assert seen == {"t": 0.7, "tta": False}


def _bundle_zip(path, manifest: dict, member: bytes = b"weights") -> None:
    import json
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bundle.json", json.dumps(manifest))
        archive.writestr("members/0-a/model.json", "{}")
        archive.writestr("members/0-a/best.pt", member)


def test_a_damaged_or_odd_bundle_is_one_error_naming_it(tmp_path):
    from spineseg.study.inference.bundle import FORMAT, open_bundle

    manifest = {"format": FORMAT, "members": [{"folder": "members/0-a", "validation_dsc": 0.9}], "crop_model": 3,
                "threshold": 0.5, "precision": "auto", "members_hflip": False}
    odd = tmp_path / "odd.zip"
    _bundle_zip(odd, manifest)
    with pytest.raises(ConfigError, match=f"--model {odd}: bundle.json field crop_model = 3: Input should be a valid string"), \
            open_bundle(odd):
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
    from spineseg.study.inference.apply import load_ensemble
    from spineseg.study.inference.bundle import EnsembleFolders
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


def test_nearest_takes_each_pixel_from_the_mask_pixel_nearest_its_centre():
    from spineseg.study.inference.apply import nearest

    mask = np.random.default_rng(0).random((5, 3)) > 0.5
    assert nearest(mask, (5, 3)) is mask
    assert np.array_equal(nearest(mask, (15, 6)), np.kron(mask, np.ones((3, 2), dtype=bool)))
    assert np.array_equal(nearest(np.kron(mask, np.ones((3, 2), dtype=bool)), (5, 3)), mask)


def _saved(folder, name: str, target: str = "binary", weights: bool = True, **changes):
    """A model folder of an untrained tiny model (`weights` False: model.json alone, as if its weights were lost)."""
    from spineseg.saved_models import ModelDescription
    from spineseg.train import BEST

    description = ModelDescription(name, "MobileNetV2", "unet", target, (64, 32), **{"grid": (128, 64), **changes})
    (folder / name).mkdir(parents=True)
    if weights:
        torch.save(description.build().state_dict(), folder / name / BEST)
    description.save(folder / name)
    return folder / name


# a straight spine on the locator's 64 x 32 grid: C7 at row 2.5, one vertebra every 3 rows, all in column 16.5
PLACED = np.column_stack([2.5 + 3.0 * np.arange(19), np.full(19, 16.5)])


def _prior():
    from spineseg.chain import ChainPrior

    return ChainPrior.fit(PLACED[None], (64, 32))


class PlacesTheChain(torch.nn.Module):
    """A locator's network that sees nothing and puts each vertebra of the chain at `PLACED`, sure of it."""

    def __init__(self):
        from spineseg.objectives import gaussians

        super().__init__()
        self.maps, self.seen = 0.99 * gaussians(PLACED, (64, 32), sigma=1.0)[None], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return self.maps.expand(len(x), -1, -1, -1)


def test_located_outlines_the_four_vertebrae_the_chain_names_and_writes_their_centres(tmp_path, monkeypatch):
    import spineseg.crops as crops
    from spineseg.crops import CropGeometry, CropModel
    from spineseg.locator import Locator
    from spineseg.study.inference.apply import CENTRE_COLUMNS, OUTLINE_COLOUR, ChainLocator
    from spineseg.vertebrae import CHAIN

    calls = []

    def crop_model_says_yes_everywhere(model, images, located, geometry, device):
        calls.append((images.shape, located.shape))
        return np.ones(images.shape, dtype=np.float32)

    monkeypatch.setattr(crops, "refine", crop_model_says_yes_everywhere)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 128), dtype=np.uint8)).save(tmp_path / "in/a.png")
    network = PlacesTheChain()
    locator = ChainLocator(Locator(network, _prior(), hflip=False), (64, 32))
    ensemble = Ensemble([], grid=(128, 64), crop=CropModel(None, CropGeometry((64, 32))), locator=locator)
    out = tmp_path / "out"
    report = predict_files(ensemble, tmp_path / "in", out, CPU, probabilities=True, **QUIET)
    assert report.written == ["a"] and not report.empty
    assert network.seen == [(64, 32)] and calls == [((1, 128, 64), (1, 128, 64))]  # chain and boxes at the grid

    chains = pd.read_csv(out / "chains.csv", keep_default_na=False)
    assert chains["id"].tolist() == ["a"] * 19 and chains["vertebra"].tolist() == list(CHAIN)
    assert np.allclose(chains[["row", "col"]], PLACED * 4) and (chains["outside"] == "").all()  # at 256 x 128: 4 times
    table = pd.read_csv(out / "predictions.csv")
    assert table["rule"].tolist() == ["located"] and table["disagreement"].isna().all()
    th8_to_th11 = chains.set_index("vertebra").loc[["Th8", "Th9", "Th10", "Th11"], ["row", "col"]].to_numpy()
    assert np.allclose(table.loc[0, CENTRE_COLUMNS].to_numpy(float), th8_to_th11.ravel())

    # the pixels nearer to Th8…Th11 than to any other vertebra: halfway to Th7 (grid row 50) and to Th12 (74), all across
    mask = np.asarray(Image.open(out / "masks/a.png")) == 255
    assert mask.shape == (256, 128) and np.array_equal(np.flatnonzero(mask.any(axis=1)), np.arange(100, 148))
    assert mask[100:148].all() and table.loc[0, "area_px"] == 48 * 128
    assert np.array_equal(np.asarray(Image.open(out / "probabilities/a.png")) > 0.5 * 65535, mask)  # at T, the mask
    drawn = np.asarray(Image.open(out / "overlays/a.png"))
    assert (drawn[106, 66] == OUTLINE_COLOUR).all() and not (drawn[112, 66] == OUTLINE_COLOUR).all()  # a dot on Th8 only

    assert predict_files(ensemble, tmp_path / "in", out, CPU, probabilities=True, **QUIET).skipped == ["a"]
    assert predict_files(_constant(-20.0), tmp_path / "in", out, CPU, **QUIET).written == ["a"]  # a rule's mask now
    assert pd.read_csv(out / "chains.csv").empty and "th8_row" not in pd.read_csv(out / "predictions.csv")


def test_located_from_model_folders_needs_no_members_weights(tmp_path):
    from spineseg.names import CENTRES
    from spineseg.study.inference.apply import CENTRE_COLUMNS, load_ensemble, predict_with
    from spineseg.study.inference.bundle import EnsembleFolders
    from spineseg.vertebrae import CHAIN

    torch.manual_seed(0)
    member = _saved(tmp_path, "member", weights=False)
    crop = _saved(tmp_path, "crop", crop={"size": (64, 32)})
    locator = _saved(tmp_path, "locator", CENTRES, coordinates=True, chain_prior=_prior().to_dict())
    found = EnsembleFolders([(member, 0.9)], crop, 0.5, "auto", None, "the bundle x.zip", locator, False)
    loaded = load_ensemble(found, torch.device("cpu"), located=True)
    assert loaded.members == [] and loaded.grid == (128, 64) and loaded.locator.input_size == (64, 32)
    assert loaded.locator.locator.hflip is False and loaded.locator.locator.prior == _prior()

    inputs, out = _folder(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    assert sorted(predict_with(found, inputs, out, CPU, located=True, **QUIET).written) == ["a", "b"]
    table = pd.read_csv(out / "predictions.csv")
    assert set(table["rule"]) == {"located"} and set(CENTRE_COLUMNS) <= set(table)
    chains = pd.read_csv(out / "chains.csv")
    assert chains["id"].tolist() == ["a"] * 19 + ["b"] * 19 and chains["vertebra"].tolist() == list(CHAIN) * 2
    inside = chains[chains["outside"].isna()]  # "" where the chain placed the vertebra; else "above" or "below"
    assert set(chains["outside"].dropna()) <= {"above", "below"} and inside[["row", "col"]].notna().all(axis=None)
    assert inside["row"].between(0, 80).all() and inside["col"].between(0, 48).all()  # at the images' 80 x 48
    for key, row in table.set_index("id").iterrows():
        named = chains[chains["id"] == key].set_index("vertebra").loc[["Th8", "Th9", "Th10", "Th11"], ["row", "col"]]
        assert np.allclose(row[CENTRE_COLUMNS].to_numpy(float), named.to_numpy(float).ravel(), equal_nan=True)
        assert np.asarray(Image.open(out / f"masks/{key}.png")).shape == (80, 48)

    not_a_locator = EnsembleFolders([(member, 0.9)], crop, 0.5, "auto", None, "the bundle x.zip", crop)
    with pytest.raises(ConfigError, match=r"--located: .*crop is not a locator with its chain prior in model.json"):
        load_ensemble(not_a_locator, torch.device("cpu"), located=True)


@pytest.mark.parametrize(("crop", "missing"), [("crop", "no trained locator ("),
                                               (None, "no trained locator and no trained crop model")])
def test_located_without_a_locator_says_what_is_missing_before_any_model_loads(tmp_path, crop, missing):
    from spineseg.study.inference.apply import predict_with
    from spineseg.study.inference.bundle import EnsembleFolders

    found = EnsembleFolders([(tmp_path / "never-read", 0.9)], crop and tmp_path / crop, 0.5, "auto", None, "the bundle x.zip")
    with pytest.raises(ConfigError, match=f"^--located: the bundle x.zip has {re.escape(missing)}"):
        predict_with(found, tmp_path, tmp_path / "out", CPU, located=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "refusal"), [({"two_stage": True}, "--located and --two-stage: "),
                                                    ({"rule": "max"}, "--rule max and --located: ")])
def test_located_refuses_another_variant_or_a_rule(tmp_path, arguments, refusal):
    from spineseg.study.inference.apply import predict_with
    from spineseg.study.inference.bundle import EnsembleFolders

    never = tmp_path / "never-read"
    found = EnsembleFolders([(never, 0.9)], never, 0.5, "auto", "max", "the bundle x.zip", never)
    with pytest.raises(ConfigError, match=f"^{refusal}"):
        predict_with(found, tmp_path, tmp_path / "out", CPU, located=True, **arguments)


def test_a_bundle_of_a_study_where_the_located_variant_won_holds_its_locator(tmp_path, monkeypatch):
    from spineseg.names import CENTRES, LOCATED
    from spineseg.saved_models import ModelDescription
    from spineseg.study import deployment
    from spineseg.study.core.records import Learned
    from spineseg.study.deployment import export_bundle
    from spineseg.study.inference.bundle import EnsembleFolders, open_bundle
    from spineseg.train import BEST

    runs = tmp_path / "runs"
    folders = {name: runs / name for name in ("member", "crop", "locator")}
    for name, folder in folders.items():
        folder.mkdir(parents=True)
        (folder / BEST).write_bytes(name.encode())  # copied, never loaded
    ModelDescription("member", "MobileNetV2", "unet", "binary", (64, 32)).save(folders["member"])
    ModelDescription("crop", "MobileNetV2", "unet", "binary", (64, 32), crop={"size": (64, 32)}).save(folders["crop"])
    ModelDescription("locator", "MobileNetV2", "unet", CENTRES, (64, 32), chain_prior=_prior().to_dict()).save(folders["locator"])
    monkeypatch.setattr(deployment, "study_ensemble", lambda study: EnsembleFolders(
        [(folders["member"], 0.9)], folders["crop"], 0.5, "auto", "max", "the study `tiny`", folders["locator"], False,
        members_hflip=True))
    layout = SimpleNamespace(learned=tmp_path / "learned.json", provenance=tmp_path / "none.json", data_dir=tmp_path / "data",
                             stage_metrics=lambda stage: tmp_path / "none.csv")
    study = SimpleNamespace(name="tiny", layout=layout, cfg=SimpleNamespace(description="A tiny study.",
                                                                            data=SimpleNamespace(source="synthetic"),
                                                                            stage3=SimpleNamespace(image_size=(64, 32))))
    for best_rule in (LOCATED, "soft"):
        Learned(0.5, {}, {}, ["member"], "member", best_rule, {"models": {}, "rules": {}}, two_stage_locator="max").save(layout.learned)
        with open_bundle(export_bundle(study, tmp_path / f"{best_rule}.zip")) as found:
            card = (found.members[0][0].parents[1] / "MODEL_CARD.md").read_text()
            assert found.members_hflip is True and "averaged with its mirror image" in card  # as stage 3 evaluated
            assert "read it at 64 × 32 pixels" in card
            if best_rule == LOCATED:
                assert ModelDescription.load(found.locator_model).chain_prior == _prior().to_dict()
                assert (found.locator_model / BEST).read_bytes() == b"locator" and (found.crop / BEST).read_bytes() == b"crop"
                assert found.locator_hflip is False and found.locator == "max"
                assert "The located variant won on validation: `--located` lets the crop model outline" in card
            else:
                assert found.locator_model is None and found.crop is None and found.locator_hflip is True
                assert "--located" not in card


def test_a_variants_model_folder_is_found_once_its_run_has_finished(tmp_path):
    from spineseg.study.deployment import _trained
    from spineseg.study.runs.store import RunSpec
    from spineseg.train import TrainSettings

    spec = RunSpec("stage3", "MobileNetV2", (64, 64), TrainSettings(batch_size=2, lr=1e-3, max_epochs=1, patience=1,
                                                                            augment=False, seed=0))
    study = SimpleNamespace(name="tiny", layout=SimpleNamespace(store=tmp_path))
    files = spec.files(tmp_path)
    assert _trained(study, None) is None and _trained(study, spec) is None
    files.folder.mkdir(parents=True)
    files.model.write_text("{}")
    assert _trained(study, spec) is None  # not finished
    files.done.write_text("")
    assert _trained(study, spec) == files.folder


@pytest.mark.parametrize(("best", "expected", "said"), [
    ("located", (None, False, True), "the located variant"),
    ("two_stage", (None, True, False), "the two-stage variant behind max"),
    ("staple", ("staple", False, False), "validation-best rule is staple"),
    ("stacking", ("soft", False, False), "learned what predict does not carry: soft voting instead"),
])
def test_without_a_rule_predict_applies_what_stage_4_chose_on_validation(best, expected, said):
    """Issue #35: the model card named the validation-best rule, and predict ran soft voting regardless."""
    from spineseg.study.inference.apply import chosen

    lines = []
    found = SimpleNamespace(best_rule=best, locator="max")
    assert chosen(found, lines.append) == expected
    assert len(lines) == 1 and said in lines[0]


def test_the_predict_command_with_a_bundle_loads_no_training_code(tmp_path):
    """The modules `spineseg predict --model` imports before it reads the bundle (the smoke study checks a real one)."""
    import subprocess
    import sys

    from conftest import LOADED_BY_PREDICT, assert_no_training_code

    (tmp_path / "in").mkdir()
    loaded = subprocess.run([sys.executable, "-c", LOADED_BY_PREDICT, str(tmp_path / "absent.zip"), str(tmp_path / "in"),
                             str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 2 and "absent.zip does not exist" in loaded.stderr
    assert_no_training_code(loaded.stdout.split())
