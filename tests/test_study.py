"""Stage plumbing: user-supplied dataset folders, data summaries and one full training run as a task."""

import json

import numpy as np
import pytest
import yaml

from conftest import write_rectangles
from spineseg.data import DatasetError
from spineseg.runs import DONE, RunSpec, StudyData, execute, load_probs, run_folder
from spineseg.study import data_summary, open_study, prepare_data


def _project(tmp_path, data: dict) -> None:
    (tmp_path / "params").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params/mine.yaml").write_text(yaml.safe_dump({"data": data, "threads": 1}))


def test_folder_source_uses_the_users_datasets(tmp_path):
    write_rectangles(tmp_path / "mydata", "hospital_a", 20)
    write_rectangles(tmp_path / "mydata", "hospital_b", 6, seed=1, test_only=True)
    _project(tmp_path, {"source": "folder", "d1": "mydata/hospital_a", "d2": "mydata/hospital_b"})
    study = open_study("mine", project_dir=tmp_path)
    data = prepare_data(study)
    assert data.d1 == (tmp_path / "mydata/hospital_a").resolve()
    summary = data_summary(data).set_index(["dataset", "split"])["images"].to_dict()
    assert summary == {("d1", "test"): 4, ("d1", "train"): 14, ("d1", "val"): 2, ("d2", "test"): 6}


def test_folder_source_without_manifest_names_it(tmp_path):
    (tmp_path / "mydata/empty").mkdir(parents=True)
    _project(tmp_path, {"source": "folder", "d1": "mydata/empty"})
    with pytest.raises(DatasetError, match="manifest"):
        prepare_data(open_study("mine", project_dir=tmp_path))


def test_a_run_writes_every_artifact_and_is_skipped_when_done(tmp_path):
    d1 = write_rectangles(tmp_path, "d1", 20)
    d2 = write_rectangles(tmp_path, "d2", 5, seed=1, test_only=True)
    data = StudyData(d1, d2)
    spec = RunSpec(stage="t", encoder="MobileNetV2", image_size=64, seed=0, max_epochs=2, patience=2,
                   data=data.fingerprint())
    summary = execute(spec, data, tmp_path / "store", device="cpu")
    folder = run_folder(tmp_path / "store", spec)
    for name in ("config.json", "history.csv", "best.pt", "summary.json", DONE, "metrics_d1_val.csv",
                 "metrics_d1_test.csv", "metrics_d2_test.csv", "probs_d1_test.npz", "probs_d2_test.npz"):
        assert (folder / name).is_file(), name
    assert not (folder / "checkpoint.pt").exists()
    ids, probs = load_probs(tmp_path / "store", spec, "d2", "test")
    assert len(ids) == 5 and probs.shape == (5, 64, 64) and probs.dtype == np.float32
    assert 0 <= probs.min() and probs.max() <= 1
    assert summary["epochs_run"] == 2 and json.loads((folder / "config.json").read_text())["encoder"] == "MobileNetV2"
    before = (folder / "best.pt").stat().st_mtime_ns
    assert execute(spec, data, tmp_path / "store", device="cpu") == summary
    assert (folder / "best.pt").stat().st_mtime_ns == before


def test_run_keys_change_with_the_config_and_the_data(tmp_path):
    base = RunSpec(stage="s", encoder="ResNet34", image_size=64, seed=0, data="abc")
    assert base.key() == RunSpec(stage="s", encoder="ResNet34", image_size=64, seed=0, data="abc").key()
    assert base.key() != RunSpec(stage="s", encoder="ResNet34", image_size=64, seed=1, data="abc").key()
    assert base.key() != RunSpec(stage="s", encoder="ResNet34", image_size=64, seed=0, data="abd").key()
