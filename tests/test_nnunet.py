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


def _nnunet_probabilities(folder, case: str, foreground: np.ndarray) -> None:
    """A prediction as nnU-Net saves it for a 2d PNG: [classes, 1, H, W] under 'probabilities'."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{case}.npz", probabilities=np.stack([1 - foreground, foreground])[:, None].astype(np.float16))


def test_the_foreground_probability_is_read_from_nnunets_own_file_and_a_missing_case_is_named(tmp_path):
    from spineseg import nnunet_peer
    from spineseg.errors import StageOrderError

    foreground = np.linspace(0, 1, 6 * 4).reshape(6, 4)
    _nnunet_probabilities(tmp_path / nnunet_peer.PREDICTIONS, "d2_x7", foreground)
    read = nnunet_peer.foreground_probability(tmp_path, "d2_x7")
    assert read.shape == (6, 4) and np.allclose(read, foreground, atol=1e-3)
    with pytest.raises(StageOrderError, match="no prediction for d1_x8"):
        nnunet_peer.foreground_probability(tmp_path, "d1_x8")


def test_without_nnunet_installed_the_peer_asks_for_the_extra_before_any_work(tmp_path, monkeypatch):
    from spineseg import nnunet_peer
    from spineseg.errors import ConfigError

    monkeypatch.setattr(nnunet_peer, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[nnunet\]'"):
        nnunet_peer.train_and_predict(tmp_path, 501, nnunet_peer.Budget(1, 1, 1))
    assert not any(tmp_path.iterdir())


def test_a_failing_nnunet_is_one_error_naming_its_log_with_its_last_lines(tmp_path, monkeypatch):
    """A broken dataset.json stops nnU-Net's child (where nnU-Net is missing, its import does): either way one
    error names the log and quotes the end of what it printed."""
    from spineseg import nnunet_peer

    monkeypatch.setattr(nnunet_peer, "available", lambda: True)
    broken = tmp_path / nnunet_peer.RAW / "Dataset501_Broken"
    (broken / "imagesTs").mkdir(parents=True)
    (broken / "dataset.json").write_text("{not json")
    with pytest.raises(nnunet_peer.NnUNetFailed, match=f"output is in {tmp_path / nnunet_peer.LOG}") as caught:
        nnunet_peer.train_and_predict(tmp_path, 501, nnunet_peer.Budget(1, 1, 1))
    assert "Error" in str(caught.value).splitlines()[-1]
    assert not (tmp_path / nnunet_peer.SUMMARY).exists()


def test_the_peers_probability_is_averaged_onto_the_members_grid_and_cut_at_one_half(tmp_path):
    from spineseg import nnunet_peer
    from spineseg.study.stages.ensemble_inputs import EnsembleInputs
    from spineseg.study.stages.nnunet import NnUNetPeer

    left = np.zeros((8, 4))
    left[:, :2] = 1.0  # the left half at the stored size: the left two columns of four, then one of two
    speck = np.zeros((8, 4))
    speck[0, 0] = 1.0  # one stored pixel of the four in a grid cell: averaged away
    _nnunet_probabilities(tmp_path / nnunet_peer.PREDICTIONS, "d1_a", left)
    _nnunet_probabilities(tmp_path / nnunet_peer.PREDICTIONS, "d1_b", speck)
    grid = np.zeros((2, 4, 2), dtype=bool)
    inputs = EnsembleInputs([], ["a", "b"], ["p", "q"], np.zeros((0, 2, 4, 2)), grid, grid.astype(float), None, [],
                            np.zeros(0), 0.5)
    masks = NnUNetPeer(tmp_path).masks(inputs, "d1")
    assert masks.shape == (2, 4, 2)
    assert masks[0, :, 0].all() and not masks[0, :, 1].any() and not masks[1].any()


@pytest.mark.slow
def test_nnunet_itself_trains_at_the_budget_predicts_every_test_image_and_a_rerun_keeps_its_record(tmp_path):
    """Real nnU-Net v2 (where the nnunet extra is installed): two epochs of two batches on a small export."""
    pytest.importorskip("nnunetv2")
    from spineseg import nnunet_peer

    d1 = write_rectangles(tmp_path / "data", "d1", 16, size=64)
    d2 = write_rectangles(tmp_path / "data", "d2", 3, seed=3, test_only=True, size=64)
    work = tmp_path / "peer"
    raw = export_nnunet(d1, work / nnunet_peer.RAW, d2)
    budget = nnunet_peer.Budget(epochs=2, iterations=2, validation_iterations=1)
    summary = nnunet_peer.train_and_predict(work, 501, budget)
    cases = sorted(p.name.removesuffix("_0000.png") for p in (raw / "imagesTs").iterdir())
    predictions = list((work / nnunet_peer.PREDICTIONS).iterdir())
    assert sorted(p.stem for p in predictions if p.suffix == ".npz") == cases
    assert not [p.name for p in predictions if ".partial" in p.name]  # no by-product or half-written file stays
    assert (summary["epochs_run"], summary["batches"], summary["test_cases"]) == (2, 4, len(cases))
    assert summary["training_cases"] == int((read_manifest(d1)["split"] == "train").sum())
    assert summary["minutes"]["train"] > 0 and summary["patch_size"] == [64, 64]
    probability = nnunet_peer.foreground_probability(work, cases[0])
    assert probability.shape == (64, 64) and 0 <= probability.min() <= probability.max() <= 1
    assert nnunet_peer.train_and_predict(work, 501, budget) == summary  # done: the record stays as it was
