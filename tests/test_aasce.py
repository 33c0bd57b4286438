from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from matplotlib.figure import Figure
from matplotlib.path import Path as Outline
from PIL import Image
from scipy import ndimage

from spineseg.data.aasce import CSV_TOLERANCE_PX, DROPPED, SUMMARY, acquisition_order, convert, patient_of, sample_id
from spineseg.data.dataset import DatasetError, read_manifest
from spineseg.data.twins import TWIN_THRESHOLD
from spineseg.study.report.figures import label_overlays
from spineseg.vertebrae import CODES, IGNORE

REAL_SRC = Path(__file__).resolve().parents[1].parent / "shared" / "aasce" / "boostnet_labeldata"
WIDTH, HEIGHT = 200, 400  # synthetic source size: x and y scale differently on the way to a square


def stacked_landmarks() -> np.ndarray:
    """68 × 2 (x, y) corners, TL TR BL BR per vertebra: axis-aligned boxes x 80..120, y 32+20k..48+20k."""
    corners = []
    for k in range(17):
        top, bottom = 32 + 20 * k, 48 + 20 * k
        corners += [(80, top), (120, top), (80, bottom), (120, bottom)]
    return np.array(corners, dtype=np.uint16)


def write_split(src: Path, split: str, entries: list[tuple[str, np.ndarray]], pixels: np.ndarray | None = None) -> Path:
    """A boostnet_labeldata tree in the distribution's format: jpg, landmarks.csv, filenames.csv, .jpg.mat."""
    image_dir, label_dir = src / "data" / split, src / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (filename, points) in enumerate(entries):
        noise = np.random.default_rng(index).integers(0, 80, (HEIGHT, WIDTH), dtype=np.uint8)  # each its own radiograph
        Image.fromarray(noise if pixels is None else pixels).save(image_dir / filename, format="JPEG", quality=95)
        scipy.io.savemat(str(label_dir / f"{filename}.mat"), {"p2": np.asarray(points, dtype=float)})
        rows.append(np.concatenate([points[:, 0] / WIDTH, points[:, 1] / HEIGHT]))
    np.savetxt(label_dir / "landmarks.csv", np.array(rows), fmt="%.5g", delimiter=",")
    (label_dir / "filenames.csv").write_text("".join(f"{name}\n" for name, _ in entries))
    return src


def load_png(folder: Path, relative: str) -> np.ndarray:
    return np.asarray(Image.open(folder / relative))


NAME = "sunhl-1th-02-Jan-2017-162 A AP.jpg"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    points = stacked_landmarks()
    return write_split(tmp_path / "boostnet_labeldata", "training",
                       [(NAME, points), ("sunhl-1th-02-Jan-2017-162 B AP.jpg", points),
                        ("sunhl-1th-03-Jan-2017-163 A AP.jpg", points)])


# --- patient and id rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("filename, patient", [
    ("sunhl-1th-02-Jan-2017-162 A AP.jpg", "sunhl-1th-162"),
    ("sunhl-1th-02-Jan-2017-162 B AP.jpg", "sunhl-1th-162"),
    ("sunhl-1th-03-Jan-2017-165 A AP.jpg", "sunhl-1th-165"),  # same case filed on the next day
    ("sunhl-1th-04-Jan-2017-165 C AP.jpg", "sunhl-1th-165"),
    ("sunhl-1th-21-Nov-2016-138 D AP2.jpg", "sunhl-1th-138"),
    ("sunhl-1th-22-Nov-2016-142 A AP (2).jpg", "sunhl-1th-142"),
    ("sunhl-1th-01-Mar-2017-310 a ap.jpg", "sunhl-1th-310"),  # test-split style, lower case
    ("sunhl-1th-01-Mar-2017-310 C AP.jpg", "sunhl-1th-310"),
    ("data/training/sunhl-1th-11-Jan-2017-254 P AP.jpg", "sunhl-1th-254"),
    ("sunhl-1th-02-Jan-2017-1620 A AP.jpg", "sunhl-1th-1620"),
    ("sunhl-1th-20-Jul-2016-coronal6.jpg", "sunhl-1th-20-Jul-2016-coronal6"),  # no case number: own patient
    ("sunhl-1th-20-Jul-2016-coronal16.jpg", "sunhl-1th-20-Jul-2016-coronal16"),
])
def test_patient_of(filename: str, patient: str) -> None:
    assert patient_of(filename) == patient


def test_sample_id_is_a_safe_name() -> None:
    assert sample_id(NAME) == "sunhl-1th-02-Jan-2017-162_A_AP"
    assert sample_id("sunhl-1th-22-Nov-2016-142 A AP (2).jpg") == "sunhl-1th-22-Nov-2016-142_A_AP_2"
    assert sample_id("sunhl-1th-22-Nov-2016-142 A AP (2).jpg") != sample_id("sunhl-1th-22-Nov-2016-142 A AP.jpg")


# --- geometry -----------------------------------------------------------------------------------------

def test_every_level_is_drawn_with_its_code_and_the_mask_is_th8_to_th11(src: Path, tmp_path: Path) -> None:
    size = 100  # x scales by 0.5, y by 0.25: box k covers rows 8+5k .. 11+5k, columns 40 .. 59
    folder = convert(src, tmp_path / "out", size=size)["training"]
    row = read_manifest(folder).set_index("id").loc[sample_id(NAME)]
    labels, mask = load_png(folder, row["labels"]), load_png(folder, row["mask"])
    expected = np.zeros((size, size), dtype=np.uint8)
    for k in range(17):  # Th1 = 1 … Th12 = 12, L1 = 13 … L5 = 17
        expected[8 + 5 * k: 12 + 5 * k, 40:60] = k + 1
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(mask, np.where((expected >= 8) & (expected <= 11), 255, 0))
    assert "flags" not in read_manifest(folder).columns  # nothing to flag


def test_tall_sizes_keep_the_aspect(src: Path, tmp_path: Path) -> None:
    folder = convert(src, tmp_path / "out", size=(96, 48))["training"]  # the source is 400 x 200
    labels = load_png(folder, read_manifest(folder)["labels"][0])
    assert labels.shape == (96, 48)
    rows, cols = np.nonzero(labels == CODES["Th8"])
    # Th8's box: source rows 172..188 and columns 80..120, scaled by 0.24 both ways
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (41, 45, 19, 29)


@pytest.mark.parametrize("level, index, moved_to", [("Th1", 0, 380), ("L5", 16, 10)])
def test_an_end_level_out_of_order_is_flagged_and_kept_out_of_supervision(tmp_path: Path, level, index, moved_to) -> None:
    points = stacked_landmarks().astype(float)
    points[4 * index: 4 * index + 4, 1] += moved_to - points[4 * index: 4 * index + 4, 1].min()
    src = write_split(tmp_path / "src", "training", [(NAME, points)])
    folder = convert(src, tmp_path / "out", size=100)["training"]
    manifest = read_manifest(folder)
    assert manifest["flags"][0] == f"{level} landmarks out of top-to-bottom order: kept out of the level labels"
    labels, mask = load_png(folder, manifest["labels"][0]), load_png(folder, manifest["mask"][0])
    assert not (labels == CODES[level]).any()
    unknown = np.nonzero((labels == IGNORE).any(axis=1))[0]
    if level == "Th1":  # above Th2's top edge (row 13) nothing is known
        assert (unknown.min(), unknown.max()) == (0, 12)
    else:  # below L4's bottom edge (row 92)
        assert (unknown.min(), unknown.max()) == (88, 99)
    assert ((mask > 0) == np.isin(labels, [8, 9, 10, 11])).all() and (mask > 0).sum() == 4 * 4 * 20


def test_tilted_quadrilaterals_follow_their_corners(tmp_path: Path) -> None:
    points = stacked_landmarks().astype(float)
    rng = np.random.default_rng(1)
    points[28:44] += rng.integers(-6, 7, (16, 2))  # Th8..Th11 become irregular quadrilaterals
    src = write_split(tmp_path / "src", "training", [(NAME, points)])
    size = 64
    folder = convert(src, tmp_path / "out", size=size)["training"]
    labels = load_png(folder, read_manifest(folder)["labels"][0])

    scaled = points * [size / WIDTH, size / HEIGHT]
    rows, cols = np.mgrid[:size, :size]
    centres = np.column_stack([cols.ravel() + 0.5, rows.ravel() + 0.5])
    for k in range(7, 11):
        tl, tr, bl, br = scaled[4 * k: 4 * k + 4]
        inside = Outline([tl, tr, br, bl]).contains_points(centres).reshape(size, size)
        assert np.array_equal(labels == k + 1, inside), f"level code {k + 1}"


def test_image_and_mask_are_resized_together(tmp_path: Path) -> None:
    pixels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    pixels[192:208, 80:120] = 255  # Th9's box, drawn into the image itself
    src = write_split(tmp_path / "src", "training", [(NAME, stacked_landmarks())], pixels=pixels)
    folder = convert(src, tmp_path / "out", size=100)["training"]
    row = read_manifest(folder).iloc[0]
    image, labels = load_png(folder, row["image"]), load_png(folder, row["labels"])
    assert image.shape == (100, 100)
    rows, cols = np.nonzero(image > 128)
    th9_rows, th9_cols = np.nonzero(labels == CODES["Th9"])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (th9_rows.min(), th9_rows.max(), th9_cols.min(), th9_cols.max())


# --- splits and datasets ------------------------------------------------------------------------------

def test_patient_never_crosses_a_split(tmp_path: Path) -> None:
    points = stacked_landmarks()
    names = ["sunhl-1th-02-Jan-2017-162 A AP.jpg", "sunhl-1th-02-Jan-2017-162 B AP.jpg",
             "sunhl-1th-03-Jan-2017-165 A AP.jpg", "sunhl-1th-04-Jan-2017-165 B AP.jpg",
             "sunhl-1th-04-Jan-2017-165 C AP.jpg", "sunhl-1th-05-Jan-2017-170 A AP.jpg",
             "sunhl-1th-21-Nov-2016-138 D AP.jpg", "sunhl-1th-21-Nov-2016-138 D AP2.jpg",
             "sunhl-1th-20-Jul-2016-coronal1.jpg", "sunhl-1th-20-Jul-2016-coronal2.jpg"]
    src = write_split(tmp_path / "src", "training", [(name, points) for name in names])
    for seed in range(4):
        folder = convert(src, tmp_path / f"out{seed}", size=32, seed=seed)["training"]
        manifest = read_manifest(folder)
        assert manifest["patient"].nunique() == 6
        assert (manifest.groupby("patient")["split"].nunique() == 1).all()
        assert set(manifest["source"]) == {f"data/training/{name}" for name in names}


def test_test_split_becomes_a_test_only_dataset(tmp_path: Path) -> None:
    src = write_split(tmp_path / "src", "test", [("sunhl-1th-01-Mar-2017-310 a ap.jpg", stacked_landmarks()),
                                                 ("sunhl-1th-01-Mar-2017-311 M AP.jpg", stacked_landmarks())])
    written = convert(src, tmp_path / "out", size=32)
    assert list(written) == ["test"] and written["test"].name == "aasce_test"
    assert set(read_manifest(written["test"])["split"]) == {"test"}


def test_limit_keeps_the_first_images(src: Path, tmp_path: Path) -> None:
    folder = convert(src, tmp_path / "out", size=32, limit=2)["training"]
    assert list(read_manifest(folder)["id"]) == ["sunhl-1th-02-Jan-2017-162_A_AP", "sunhl-1th-02-Jan-2017-162_B_AP"]


# --- consistency checks -------------------------------------------------------------------------------

def edit_csv_x(src: Path, row: int, pixels: float) -> None:
    path = src / "labels" / "training" / "landmarks.csv"
    table = np.loadtxt(path, delimiter=",", ndmin=2)
    table[row, 0] += pixels / WIDTH
    np.savetxt(path, table, fmt="%.8g", delimiter=",")


def test_small_csv_rounding_is_tolerated(src: Path, tmp_path: Path) -> None:
    edit_csv_x(src, 1, CSV_TOLERANCE_PX / 2)
    convert(src, tmp_path / "out", size=32)


def test_csv_and_mat_disagreement_drops_that_image_naming_the_gap(src: Path, tmp_path: Path) -> None:
    edit_csv_x(src, 1, 5.0)
    folder = convert(src, tmp_path / "out", size=32)["training"]
    dropped = pd.read_csv(folder / DROPPED)
    assert list(dropped["source"]) == ["sunhl-1th-02-Jan-2017-162 B AP.jpg"]
    assert "landmarks.csv row 2 and sunhl-1th-02-Jan-2017-162 B AP.jpg.mat disagree by up to 5.0 px" in dropped["reason"][0]
    assert len(read_manifest(folder)) == 2


@pytest.mark.parametrize("damage, reason", [
    (lambda src: (src / "labels/training" / f"{NAME}.mat").unlink(), r"missing landmark file .*162 A AP\.jpg\.mat"),
    (lambda src: (src / "data/training" / NAME).unlink(), r"missing image .*162 A AP\.jpg"),
    (lambda src: (src / "data/training" / NAME).write_bytes(b"not a jpeg"), r"unreadable image .*162 A AP\.jpg"),
    (lambda src: scipy.io.savemat(str(src / "labels/training" / f"{NAME}.mat"), {"pts": stacked_landmarks()}), r"162 A AP\.jpg\.mat: no 'p2'"),
    (lambda src: (src / "labels/training" / f"{NAME}.mat").write_bytes(b""), r"unreadable landmark file .*162 A AP\.jpg\.mat"),
    (lambda src: scipy.io.savemat(str(src / "labels/training" / f"{NAME}.mat"), {"p2": np.array(["corner"] * 68)}),
     r"162 A AP\.jpg\.mat: 'p2' is <U6 of shape \(68,\)"),
])
def test_one_broken_record_drops_that_image_not_the_dataset(src: Path, tmp_path: Path, damage, reason: str) -> None:
    damage(src)
    folder = convert(src, tmp_path / "out", size=32)["training"]
    dropped = pd.read_csv(folder / DROPPED)
    assert list(dropped["source"]) == [NAME] and re.search(reason, dropped["reason"][0])
    assert len(read_manifest(folder)) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda src: (src / "labels/training/filenames.csv").write_text(f"{NAME}\n"), r"filenames\.csv lists 1 images but .*landmarks\.csv has 3 rows"),
    (lambda src: (src / "labels/training/filenames.csv").write_bytes(b"\xff\xfe" + NAME.encode("utf-16-le")), r"filenames\.csv: not UTF-8 text"),
])
def test_a_broken_index_of_the_split_names_the_file(src: Path, tmp_path: Path, damage, message: str) -> None:
    damage(src)
    with pytest.raises(DatasetError, match=message):
        convert(src, tmp_path / "out", size=32)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_corners_far_outside_the_image_are_an_annotation_error(tmp_path: Path) -> None:
    points = stacked_landmarks().astype(float)
    points[4 * 8:4 * 9, 0] = 5 * WIDTH  # Th9's corners at five times the image's width
    manifest, dropped, _ = convert_one_bad_image(tmp_path, points)
    assert list(dropped["source"]) == [NAME] and "Th9 landmarks outside the 200×400 image" in dropped["reason"][0]
    points = stacked_landmarks().astype(float)
    points[0:4, 1] -= 0.05 * HEIGHT + 32  # Th1 overhangs the top by 5 %: the real data overhang by up to 2.5 %
    points[-4:, 0] = 5 * WIDTH  # L5 far outside: flagged, kept out of the labels, the image kept
    manifest, dropped, _ = convert_one_bad_image(tmp_path / "again", points)
    assert dropped.empty and "L5 landmarks outside the 200×400 image" in manifest.set_index("id")["flags"][sample_id(NAME)]


OTHER = "sunhl-1th-03-Jan-2017-163 A AP.jpg"


def convert_one_bad_image(tmp_path: Path, points: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Convert NAME with `points` beside a good OTHER: (manifest, dropped report, printed summary)."""
    src = write_split(tmp_path / "src", "training", [(NAME, points), (OTHER, stacked_landmarks())])
    folder = convert(src, tmp_path / "out", size=100)["training"]
    return read_manifest(folder), pd.read_csv(folder / DROPPED), (tmp_path / "out" / SUMMARY).read_text()


def test_corners_out_of_order_inside_the_region_drop_that_image_with_its_reason(tmp_path: Path, capsys) -> None:
    points = stacked_landmarks()
    points[[32, 33]] = points[[33, 32]]  # Th9: top-left and top-right swapped
    manifest, dropped, summary = convert_one_bad_image(tmp_path, points)
    assert list(manifest["id"]) == [sample_id(OTHER)]
    assert dropped.to_dict("records") == [{"source": NAME, "reason": "Th9 landmarks degenerate or corners out of order "
                                                                      "(area 0.0 px² walking TL, TR, BR, BL)"}]
    assert "1 converted (0 with a level flagged and kept out of the labels), 1 dropped" in summary
    assert summary in capsys.readouterr().out


def test_a_region_level_out_of_order_drops_the_image(tmp_path: Path) -> None:
    points = stacked_landmarks().astype(float)
    points[36:40, 1] -= 250  # Th10 drawn at the top of the radiograph (overhanging it by less than OUTSIDE_TOLERANCE)
    manifest, dropped, _ = convert_one_bad_image(tmp_path, points)
    assert list(manifest["id"]) == [sample_id(OTHER)]
    assert list(dropped["reason"]) == ["Th10 landmarks out of top-to-bottom order"]


@pytest.mark.parametrize("levels, rows", [
    (("L4",), {15: -290}),  # L4 at the top of the radiograph, as in the public test split: only L4 is blamed
    (("L4", "L5"), {15: +20, 16: -20}),  # two neighbours swapped: either could be wrong
    (("Th1", "Th2"), {0: +20, 1: -20}),
    (("L2",), {13: +45}),  # an inner level below its lower neighbour
])
def test_any_level_out_of_order_outside_the_region_is_flagged_and_unknown(tmp_path: Path, levels, rows) -> None:
    points = stacked_landmarks().astype(float)
    for index, pixels in rows.items():
        points[4 * index: 4 * index + 4, 1] += pixels
    manifest, dropped, summary = convert_one_bad_image(tmp_path, points)
    row = manifest.set_index("id").loc[sample_id(NAME)]
    assert row["flags"] == "; ".join(f"{level} landmarks out of top-to-bottom order: kept out of the level labels"
                                     for level in levels)
    labels = load_png(tmp_path / "out" / "aasce_train", row["labels"])
    assert not np.isin(labels, [CODES[level] for level in levels]).any() and (labels == IGNORE).any()
    assert (load_png(tmp_path / "out" / "aasce_train", row["mask"]) > 0).sum() == 4 * 4 * 20  # Th8–Th11 intact
    assert dropped.empty and "2 converted (1 with a level flagged and kept out of the labels), 0 dropped" in summary


def test_missing_landmarks_are_flagged_outside_the_region_and_drop_the_image_inside(tmp_path: Path) -> None:
    points = stacked_landmarks().astype(float)
    points[0:2] = np.nan  # two corners of Th1
    manifest, dropped, _ = convert_one_bad_image(tmp_path, points)
    assert manifest.set_index("id").loc[sample_id(NAME), "flags"] == "Th1 landmarks not finite: kept out of the level labels"
    points[30] = np.nan  # a corner of Th8
    manifest, dropped, _ = convert_one_bad_image(tmp_path / "again", points)
    assert list(dropped["reason"]) == ["Th8 landmarks not finite"] and sample_id(NAME) not in set(manifest["id"])


def test_a_split_with_every_image_dropped_says_why(tmp_path: Path) -> None:
    points = stacked_landmarks().astype(float)
    points[30] = np.nan
    src = write_split(tmp_path / "src", "training", [(NAME, points)])
    with pytest.raises(DatasetError, match=r"every image of AASCE split\(s\) \['training'\] was dropped.*Th8 landmarks not finite"):
        convert(src, tmp_path / "out", size=32)


# --- radiographs filed twice -------------------------------------------------------------------------

def radiograph(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A smooth random image, structure at every scale like a radiograph (a noise image's crop would blur to grey)."""
    rng = np.random.default_rng(seed)
    field = sum(ndimage.zoom(rng.normal(size=(height // s, width // s)), s, order=1)[:height, :width] for s in (4, 10, 25))
    return np.clip(100 + 40 * field, 0, 255).astype(np.uint8)


def test_one_radiograph_filed_under_two_case_numbers_is_one_patient_in_one_split(tmp_path: Path) -> None:
    twin_a, twin_b = "sunhl-1th-26-Jul-2016-78 B AP.jpg", "sunhl-1th-22-Nov-2016-153 B AP.jpg"
    src = tmp_path / "src"
    names = [twin_a, twin_b] + [f"sunhl-1th-0{k}-Jan-2017-20{k} A AP.jpg" for k in range(1, 9)]
    # the second filing frames the radiograph 12 px lower and 6 px further right, with its own landmarks
    framed = stacked_landmarks() + np.array([6, 12], dtype=np.uint16)
    write_split(src, "training", [(name, framed if name == twin_b else stacked_landmarks()) for name in names])
    base = radiograph(0)
    moved = np.pad(base, ((12, 0), (6, 0)), mode="edge")[:HEIGHT, :WIDTH]
    Image.fromarray(base).save(src / "data/training" / twin_a, format="JPEG", quality=95)
    Image.fromarray(moved).save(src / "data/training" / twin_b, format="JPEG", quality=80)
    for k, name in enumerate(names[2:], start=2):
        Image.fromarray(radiograph(k)).save(src / "data/training" / name, format="JPEG", quality=95)
    for seed in range(4):
        manifest = read_manifest(convert(src, tmp_path / f"out{seed}", size=(128, 64), seed=seed)["training"]).set_index("id")
        twins = manifest.loc[[sample_id(twin_a), sample_id(twin_b)]]
        assert set(twins["patient"]) == {"sunhl-1th-153+sunhl-1th-78"} and twins["split"].nunique() == 1
        partner, score = twins.loc[sample_id(twin_a), "twins"].split(" r=")
        assert partner == sample_id(twin_b) and TWIN_THRESHOLD <= float(score) < 1
        assert manifest["patient"].nunique() == 9  # the eight unrelated radiographs stay their own patients
        assert (manifest.drop(index=twins.index)["twins"] == "").all()
    assert "2 images in 1 groups of cases joined" in (tmp_path / "out0" / SUMMARY).read_text()


def test_no_split_found_names_the_source(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / "nothing")):
        convert(tmp_path / "nothing", tmp_path / "out")


# --- overlay figure -----------------------------------------------------------------------------------

def test_label_overlays_from_a_converted_folder(src: Path, tmp_path: Path) -> None:
    folder = convert(src, tmp_path / "out", size=64)["training"]
    fig = label_overlays(folder, n=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 4  # whole image and zoom, for each of 2 images


def test_label_overlays_need_instance_labels(src: Path, tmp_path: Path) -> None:
    folder = convert(src, tmp_path / "out", size=64)["training"]
    manifest = read_manifest(folder)
    manifest.drop(columns="labels").to_csv(folder / "manifest.csv", index=False)
    with pytest.raises(DatasetError, match="no instance labels"):
        label_overlays(folder)


# --- real data ----------------------------------------------------------------------------------------

@pytest.fixture
def real_src() -> Path:
    if not (REAL_SRC / "data" / "training").is_dir():
        pytest.skip(f"AASCE training split not found at {REAL_SRC}")
    return REAL_SRC


def test_real_names_give_unique_ids_and_case_patients(real_src: Path) -> None:
    names = pd.read_csv(real_src / "labels/training/filenames.csv", header=None, dtype=str)[0]
    assert names.map(sample_id).is_unique
    fallbacks = [name for name in names if patient_of(name) == Path(name).stem]
    assert all("coronal" in name for name in fallbacks), fallbacks  # every other name carries a case number
    assert patient_of("sunhl-1th-03-Jan-2017-165 A AP.jpg") == patient_of("sunhl-1th-04-Jan-2017-165 B AP.jpg")


def test_real_conversion_gives_plausible_masks(real_src: Path, tmp_path: Path) -> None:
    size = 256
    folder = convert(real_src, tmp_path / "out", splits=("training",), size=size, limit=5)["training"]
    manifest = read_manifest(folder)
    assert len(manifest) == 5
    assert (manifest.groupby("patient")["split"].nunique() == 1).all()
    for row in manifest.itertuples():
        image, labels = load_png(folder, row.image), load_png(folder, row.labels)
        assert image.shape == labels.shape == (size, size) and image.std() > 10
        assert {8, 9, 10, 11} <= set(np.unique(labels)) <= set(range(18)) | {IGNORE}
        rows, cols = np.nonzero(np.isin(labels, [8, 9, 10, 11]))
        assert 0.005 < rows.size / labels.size < 0.1, row.id  # 1–7 % over all 481 images
        assert 0.15 < cols.mean() / size < 0.85, row.id  # spine in the central columns
        assert 0.3 < rows.mean() / size < 0.6, row.id  # mid-thoracic: a little above the middle
        centres = [np.nonzero(labels == code)[0].mean() for code in range(1, 18) if (labels == code).any()]
        assert centres == sorted(centres), row.id
    label_overlays(folder, n=2)


# --- the output folder -----------------------------------------------------------------------------

def test_a_non_empty_output_folder_is_refused_unless_forced(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(DatasetError, match=f"{out} is not empty.*--force"):
        convert(src, out, size=32)
    assert (out / "mine.txt").read_text() == "a user's file"
    with pytest.raises(DatasetError, match="holds mine.txt, which no spineseg conversion wrote"):
        convert(src, out, size=32, force=True)  # --force replaces datasets, never a user's file
    assert (out / "mine.txt").read_text() == "a user's file"
    (out / "mine.txt").unlink()
    convert(src, out, size=32)
    folders = convert(src, out, size=32, force=True)  # a folder of its own datasets and summary: replaced
    assert read_manifest(folders["training"]).shape[0] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize("out_of", [lambda src: src, lambda src: src.parent, lambda src: src / "converted"],
                         ids=["the source", "its parent", "inside it"])
def test_an_output_folder_overlapping_the_source_is_refused_even_with_force(src: Path, out_of, capsys) -> None:
    from spineseg.cli import main

    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    out = out_of(src)
    assert main(["data", "aasce", "--src", str(src), "--out", str(out), "--force", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the output folder {out}" in err and f"the source {src}" in err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # not a file lost, none added


def test_a_truncated_source_image_is_dropped_and_a_broken_index_stops_before_anything_changes(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = convert(src, out, size=32)["training"]
    image = src / "data" / "training" / "sunhl-1th-03-Jan-2017-163 A AP.jpg"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    again = convert(src, out, size=32, force=True)["training"]
    assert len(read_manifest(again)) == 2
    assert "unreadable image" in pd.read_csv(again / DROPPED).set_index("source")["reason"][image.name]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (src / "labels/training/landmarks.csv").write_text("1,2,3\n")
    with pytest.raises(DatasetError, match="landmarks.csv: expected 136 columns"):
        convert(src, out, size=32, force=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert read_manifest(first).shape[0] == 2


def test_real_annotations_flag_the_levels_out_of_order_or_degenerate(real_src: Path) -> None:
    from collections import Counter

    from spineseg.data import aasce

    read = aasce._read_split(real_src, "training", None, (512, 192))
    untrusted = Counter(tuple(aasce.LEVELS[k] for k in r.untrusted) for r in read.records if r.untrusted)
    # 21 images with L5 drawn at the top or a degenerate L5, one degenerate L4; where two neighbours sit
    # at one height (three L4/L5 pairs, Th1 a little below Th2) either could be wrong, and both are kept out
    assert untrusted == {("L5",): 21, ("L4", "L5"): 3, ("L4",): 1, ("Th1", "Th2"): 1} and read.dropped == []


# --- the later batch --------------------------------------------------------------------------------

@pytest.mark.parametrize("filename, order", [
    ("sunhl-1th-02-Jan-2017-162 A AP.jpg", ("2017-01-02", 162)),
    ("sunhl-1th-11-Jan-2017-254 P AP.jpg", ("2017-01-11", 254)),
    ("sunhl-1th-20-Jul-2016-coronal6.jpg", ("2016-07-20", -1)),  # dated, no case number: first on its day
    ("sunhl-1th-31-Feb-2017-7 A AP.jpg", ("", -1)),  # no such day: no date
    ("scan.jpg", ("", -1)),
])
def test_acquisition_order_reads_the_day_and_case_from_the_name(filename, order) -> None:
    assert acquisition_order(filename) == order


def test_the_later_batch_holds_out_the_latest_patient_groups_whole_and_splits_the_rest_afresh(tmp_path: Path, capsys) -> None:
    points = stacked_landmarks()
    days = ["02-Jan-2017", "03-Jan-2017", "04-Jan-2017", "05-Jan-2017", "09-Jan-2017", "10-Jan-2017"]
    entries = [(f"sunhl-1th-{day}-{100 + k} {view} AP.jpg", points)
               for k, day in enumerate(days) for view in ("A", "B")]
    entries.append(("sunhl-1th-12-Jan-2017-100 C AP.jpg", points))  # case 100 again, a week later: its group is late
    src = write_split(tmp_path / "boostnet_labeldata", "training", entries)
    out = convert(src, tmp_path / "out", size=32, later_batch=0.3)
    later, earlier = read_manifest(out["later"]), read_manifest(out["training"])
    assert (later["split"] == "test").all() and set(earlier["split"]) <= {"train", "val", "test"}
    assert len(later) >= 0.3 * len(entries) and set(later["patient"]).isdisjoint(earlier["patient"])
    # the latest groups: case 100 (its last image on 12 Jan) and 105 (10 Jan), then 104 (9 Jan)
    assert set(later["patient"]) == {"sunhl-1th-100", "sunhl-1th-105"}
    assert all((out["later"] / relative).is_file() for relative in later["image"])
    assert not any((out["training"] / relative).exists() for relative in later["image"])
    assert "later batch -> aasce_later: the latest 5 training images (2 patient groups, acquired 2017-01-02 to 2017-01-12)" \
        in capsys.readouterr().out


def test_a_later_batch_that_would_take_every_image_is_refused(tmp_path: Path) -> None:
    src = write_split(tmp_path / "boostnet_labeldata", "training", [(NAME, stacked_landmarks())])
    with pytest.raises(DatasetError, match="leaves no images to train on"):
        convert(src, tmp_path / "out", size=32, later_batch=0.5)
    assert not (tmp_path / "out").exists()
