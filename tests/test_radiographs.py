"""Reading new radiographs: DICOMs of another modality are refused unless asked for; huge images are read at a
reduced size, and beyond PIL's decompression-bomb limit refused before they are decoded."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_dicom
from spineseg.data import radiographs
from spineseg.data.dataset import read_image
from spineseg.data.radiographs import load_radiograph, reduction
from spineseg.errors import DatasetError


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_dicom_that_is_not_a_projection_radiograph_is_refused_unless_asked_for(tmp_path, modality):
    pixels = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32)
    write_dicom(tmp_path / "slice.dcm", pixels, modality=modality)
    with pytest.raises(DatasetError, match=f"slice.dcm: DICOM modality {modality}, not a projection radiograph.*--any-modality"):
        load_radiograph(tmp_path / "slice.dcm")
    assert load_radiograph(tmp_path / "slice.dcm", any_modality=True).pixels.shape == (64, 32)


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_projection_radiographs_read(tmp_path, modality):
    write_dicom(tmp_path / "xray.dcm", np.arange(64 * 32, dtype=np.uint16).reshape(64, 32), modality=modality)
    image = load_radiograph(tmp_path / "xray.dcm").pixels
    assert image.min() == 0.0 and image.max() == 1.0


def test_a_radiograph_reads_as_float32_at_its_own_size(tmp_path):
    Image.fromarray(np.arange(80 * 48, dtype=np.uint16).reshape(80, 48)).save(tmp_path / "x.png")
    write_dicom(tmp_path / "x.dcm", np.arange(80 * 48, dtype=np.uint16).reshape(80, 48))
    for name in ("x.png", "x.dcm"):
        image = load_radiograph(tmp_path / name).pixels
        assert image.dtype == np.float32 and image.shape == (80, 48)  # float64 was twice the memory


def test_the_reduction_is_a_whole_number_only_for_huge_images_far_larger_than_the_model_needs():
    assert radiographs.WORKING_PIXELS == 4096 * 4096 and radiographs.REDUCED_MARGIN == 4
    assert reduction((12000, 4000), (512, 192)) == 2  # 48 MP: 12 MP read
    assert reduction((12000, 4000), None) == 1
    assert reduction((4000, 4000), (64, 64)) == 1  # 16 MP: read as it is, however small the model
    assert reduction((20000, 9000), (512, 192)) == 4  # 180 MP: 11 MP read
    assert reduction((20000, 9000), (2048, 1024)) == 2  # at least 4 times what the model needs, both sides
    assert reduction((20000, 9000), (4096, 1024)) == 1


def _huge(path: Path, bits: int = 8) -> np.ndarray:
    """A 1003 x 517 radiograph-like image (smooth bands, noise, one sharp bright block) saved at `path`."""
    rng = np.random.default_rng(0)
    y, x = np.linspace(0, 1, 1003)[:, None], np.linspace(0, 1, 517)[None]
    values = (120 + 80 * np.sin(12 * y) * np.cos(5 * x) + rng.normal(0, 12, (1003, 517))).clip(0, 255)
    values[300:500, 150:350] = 240
    values = (values * 16).astype(np.uint16) if bits == 16 else values.astype(np.uint8)
    Image.fromarray(values).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return values


@pytest.mark.parametrize(("name", "bits", "mode"), [("x.jpg", 8, "L"), ("x.jpg", 8, "RGB"), ("x.png", 8, "L"), ("x.png", 16, "I;16")])
def test_a_huge_image_is_read_at_a_reduced_size_and_gives_nearly_the_same_model_input(tmp_path, monkeypatch, name, bits, mode):
    """Within `WORKING_PIXELS` (here lowered so that 1003 x 517 is huge) nothing changes; beyond it the image is read
    3 times smaller (a JPEG decoded at 1/2 by PIL's draft mode), and what the model sees differs by under 1 %."""
    from PIL import JpegImagePlugin

    from spineseg.data.dataset import model_input

    values = _huge(tmp_path / name, bits)
    if mode == "RGB":
        Image.fromarray(values).convert("RGB").save(tmp_path / name, quality=90)
    grid = (64, 32)
    assert load_radiograph(tmp_path / name, needed=grid).pixels.shape == (1003, 517)  # 0.5 MP: as it is
    monkeypatch.setattr(radiographs, "WORKING_PIXELS", 100_000)
    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda img, *args: drafts.append(real_draft(img, *args)) or drafts[-1])
    read = load_radiograph(tmp_path / name, needed=grid)
    assert read.reduced and read.shape == (1003, 517) and read.pixels.shape == (334, 172) and read.pixels.dtype == np.float32
    assert [box for _, box in drafts] == ([(0, 0, 517 / 2, 1003 / 2)] if name.endswith(".jpg") else [])
    difference = np.abs(model_input(read.pixels, grid) - model_input(read_image(tmp_path / name), grid))
    assert difference.mean() < 0.002 and difference.max() < 0.01
    assert load_radiograph(tmp_path / name, needed=(128, 64)).pixels.shape == (1003, 517)  # not 4 x (128, 64) once reduced


def test_a_huge_dicom_is_reduced_after_decoding_and_one_over_the_limit_is_refused_before(tmp_path, monkeypatch):
    pixels = _huge(tmp_path / "x.png", bits=16)
    write_dicom(tmp_path / "x.dcm", pixels >> 4)
    monkeypatch.setattr(radiographs, "WORKING_PIXELS", 100_000)
    read = load_radiograph(tmp_path / "x.dcm", needed=(64, 32))
    assert read.shape == (1003, 517) and read.pixels.shape == (334, 172) and read.pixels.dtype == np.float32
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # 1003 x 517 is over twice that, where PIL refuses
    with pytest.raises(DatasetError, match=r"x\.dcm: 517 x 1003 pixels \(0\.519 MP\), over the limit of 0\.4 MP .*refused before decoding"):
        load_radiograph(tmp_path / "x.dcm")


def test_predict_writes_a_huge_images_mask_at_its_size_its_overlay_reduced_and_skips_one_over_the_limit(tmp_path, monkeypatch):
    import pandas as pd
    import torch

    from spineseg.predict import Segmenter
    from spineseg.study.inference.apply import Ensemble, InferenceOptions, Member, predict_files

    class Bright(torch.nn.Module):  # says yes where the image is brighter than its background ever is
        def forward(self, x):
            return (x[:, :1] - 0.88) * 200

    inputs = tmp_path / "in"
    inputs.mkdir()
    _huge(inputs / "huge.png")
    write_dicom(inputs / "over.dcm", np.zeros((1003, 517), dtype=np.uint16))
    Image.fromarray(np.full((40, 30), 90, dtype=np.uint8)).save(inputs / "small.png")
    monkeypatch.setattr(radiographs, "WORKING_PIXELS", 100_000)
    monkeypatch.setattr(radiographs, "pixel_limit", lambda: 500_000.0)  # refuses over.dcm; a PNG that size is PIL's to refuse, at its own limit
    said = []
    ensemble = Ensemble([Member("bright", Segmenter(Bright()), (64, 32))])
    report = predict_files(ensemble, inputs, tmp_path / "out", InferenceOptions(device="cpu", batch_size=1),
                           probabilities=True, log=said.append)
    over = str(inputs / "over.dcm")
    assert sorted(report.written) == ["huge", "small"] and list(report.failed) == [over]
    assert [line for line in said if over in line] == [f"skipped {over}: 517 x 1003 pixels (0.519 MP), over the limit of 0.5 MP "
                                                      f"(PIL's decompression-bomb limit, which PNGs and JPEGs have too); refused before decoding"]
    mask, drawn = (np.asarray(Image.open(tmp_path / "out" / folder / "huge.png")) for folder in ("masks", "overlays"))
    assert mask.shape == (1003, 517) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert drawn.shape == (334, 172, 3)  # the overlay at the size the image was read
    row = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("id").loc["huge"]
    assert (row["height"], row["width"]) == (1003, 517)
    # the block [300:500, 150:350] of the file, found at the reduced size and placed back at the file's
    assert np.allclose([row["top"], row["left"], row["bottom"], row["right"]], [300, 150, 500, 350], atol=20)
    assert row["area_px"] == (mask == 255).sum() and abs(row["area_px"] / 200**2 - 1) < 0.25
    probability = np.asarray(Image.open(tmp_path / "out/probabilities/huge.png"))
    assert probability.shape == (1003, 517) and probability[400, 250] > 60000 and probability[50, 50] < 1000


def test_a_dicoms_linear_rescale_leaves_only_its_slopes_sign_and_reads_as_float32(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 4096, (40, 30)).astype(np.uint16)
    write_dicom(tmp_path / "plain.dcm", pixels)
    write_dicom(tmp_path / "scaled.dcm", pixels, slope=2.5, intercept=-1024.0)
    write_dicom(tmp_path / "negative.dcm", pixels, slope=-1.0, intercept=4095.0)
    plain, scaled, negative = (load_radiograph(tmp_path / f"{name}.dcm").pixels for name in ("plain", "scaled", "negative"))
    assert plain.dtype == scaled.dtype == negative.dtype == np.float32
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    assert np.allclose(plain, expected, atol=1e-6) and np.allclose(scaled, expected, atol=1e-6)
    assert np.allclose(negative, 1 - expected, atol=1e-6)  # reversed, as pydicom's rescale reverses it
