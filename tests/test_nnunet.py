"""`spineseg data nnunet`: a study's split as an nnU-Net v2 raw dataset that nnU-Net trains on as it is."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_rectangles
from spineseg.data import DatasetError, read_manifest
from spineseg.data.nnunet import export_nnunet


def test_dataset_one_trains_in_its_own_split_and_both_test_sets_are_kept_apart(tmp_path):
    d1 = write_rectangles(tmp_path / "data", "d1", 20)
    d2 = write_rectangles(tmp_path / "data", "d2", 4, seed=3, test_only=True)
    folder = export_nnunet(d1, tmp_path / "raw", d2, dataset_id=502)
    assert folder == tmp_path / "raw/Dataset502_SpineTh8Th11"
    manifest, external = read_manifest(d1), read_manifest(d2)
    description = json.loads((folder / "dataset.json").read_text())
    trained = manifest[manifest["split"] != "test"]
    assert description["labels"] == {"background": 0, "Th8-Th11": 1} and description["file_ending"] == ".png"
    assert description["channel_names"] == {"0": "X-ray"} and description["numTraining"] == len(trained)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(f"{i}_0000.png" for i in trained["id"])
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"{i}.png" for i in trained["id"])
    tests = [f"d1_{i}" for i in manifest.loc[manifest["split"] == "test", "id"]] + [f"d2_{i}" for i in external["id"]]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(f"{case}_0000.png" for case in tests)
    fold = json.loads((folder / "splits_final.json").read_text())
    assert len(fold) == 1 and {split: sorted(ids) for split, ids in fold[0].items()} == {
        split: sorted(manifest.loc[manifest["split"] == split, "id"]) for split in ("train", "val")}
    first = trained.iloc[0]
    label = np.asarray(Image.open(folder / "labelsTr" / f"{first['id']}.png"))
    assert set(np.unique(label)) == {0, 1} and np.array_equal(label, np.asarray(Image.open(d1 / first["mask"])) > 0)
    assert (folder / "imagesTr" / f"{first['id']}_0000.png").read_bytes() == (d1 / first["image"]).read_bytes()


def test_an_existing_dataset_or_a_bad_id_is_refused_and_nothing_half_written_stays(tmp_path):
    d1 = write_rectangles(tmp_path / "data", "d1", 12)
    export_nnunet(d1, tmp_path / "raw")
    with pytest.raises(DatasetError, match="Dataset501_SpineTh8Th11 exists"):
        export_nnunet(d1, tmp_path / "raw")
    with pytest.raises(DatasetError, match="ids lie in 1…999"):
        export_nnunet(d1, tmp_path / "raw", dataset_id=1000)
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset501_SpineTh8Th11"]
