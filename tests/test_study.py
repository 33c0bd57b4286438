"""Stage plumbing: user-supplied dataset folders, data summaries and one full training run as a task."""

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml

import spineseg.study.runs.store as store_module
from conftest import write_rectangles
from spineseg.crops import CropGeometry
from spineseg.data import DatasetError, write_dataset
from spineseg.errors import ConfigError, StageOrderError
from spineseg.study.core.session import StudyData, open_study
from spineseg.study.runs.store import RunSpec, execute, load_probs, run_all, summary_columns
from spineseg.study.stages import stage0_data
from spineseg.study.stages.stage0_data import data_summary, prepare_data
from spineseg.train import TrainSettings
from test_twins import radiograph, samples


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


def test_stage_0_lists_the_radiographs_dataset_2_shares_with_dataset_1(tmp_path, monkeypatch):
    shared = radiograph(0)
    write_dataset(tmp_path / "mydata", "a", samples([shared] + [radiograph(k) for k in range(1, 20)],
                                                    ["seen"] + [f"a{k}" for k in range(1, 20)]))
    write_dataset(tmp_path / "mydata", "b", samples([radiograph(30), shared], ["new", "again"]), test_only=True)
    _project(tmp_path, {"source": "folder", "d1": "mydata/a", "d2": "mydata/b"})
    study = open_study("mine", project_dir=tmp_path)
    prepare_data(study)
    report = json.loads(study.layout.cross_twins.read_text())
    assert [(t["d1"], t["d2"]) for t in report["twins"]] == [("seen", "again")] and report["twins"][0]["r"] > 0.99
    monkeypatch.setattr(stage0_data, "twins_between", lambda *args: pytest.fail("searched again"))
    prepare_data(study)  # the same data: the report stands


def test_folder_source_without_manifest_names_it(tmp_path):
    (tmp_path / "mydata/empty").mkdir(parents=True)
    _project(tmp_path, {"source": "folder", "d1": "mydata/empty"})
    with pytest.raises(DatasetError, match="manifest"):
        prepare_data(open_study("mine", project_dir=tmp_path))


@pytest.mark.parametrize("data", [{"source": "aasce", "aasce_src": "runs/mine/data/boostnet_labeldata"},
                                  {"source": "aasce", "aasce_src": "runs/mine"},
                                  {"source": "folder", "d1": "runs/mine/data/d1"}], ids=["aasce inside", "aasce above", "folder"])
def test_a_data_source_where_stage_0_writes_is_refused_before_anything_is_deleted(tmp_path, data):
    _project(tmp_path, data)
    source = tmp_path / (data.get("aasce_src") or data["d1"]) / "precious.jpg"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"a radiograph")
    key = "data.aasce_src" if "aasce_src" in data else "data.d1"
    with pytest.raises(ConfigError, match=f"{key} = .*overlaps .*runs/mine/data, the folder stage 0 writes"):
        prepare_data(open_study("mine", project_dir=tmp_path))
    assert source.read_bytes() == b"a radiograph"


def test_a_missing_weights_file_is_refused_before_stage_0_writes(tmp_path):
    _project(tmp_path, {"source": "synthetic", "d1_count": 20, "d2_count": 4, "size": 32})
    profile = tmp_path / "params/mine.yaml"
    profile.write_text(profile.read_text() + "stage1: {weights_path: nowhere.pt}\n")
    with pytest.raises(ConfigError, match=f"stage1.weights_path: {tmp_path / 'nowhere.pt'} does not exist"):
        prepare_data(open_study("mine", project_dir=tmp_path))
    assert not (tmp_path / "runs").exists()


def test_ids_pandas_would_read_as_missing_survive_every_study_table(tmp_path):
    """Stage 6's pruning resumes from its metrics.csv: image 'NA' must come back as 'NA', or Table 17 loses it."""
    from spineseg.study.core.artifacts import read_table
    from spineseg.study.core.records import PruningResult
    from spineseg.study.stages import stage6_architectures as stage6

    write_rectangles(tmp_path / "mydata", "d1", 20)
    _project(tmp_path, {"source": "folder", "d1": "mydata/d1"})
    profile = tmp_path / "params/mine.yaml"
    profile.write_text(profile.read_text() + "architectures: {pruning: []}\n")
    study = open_study("mine", project_dir=tmp_path)
    baseline = RunSpec(stage="stage6_decoders", encoder="MobileNetV2", image_size=(32, 32), data="x",
                       train=TrainSettings(batch_size=4, lr=1e-3, max_epochs=2, patience=2, augment=False, seed=0))
    arch = study.cfg.architectures
    settings = replace(baseline.train, lr=baseline.train.lr * arch.finetune_lr_factor, max_epochs=arch.finetune_epochs,
                       patience=arch.finetune_epochs, seed=0)
    finished = study.layout.stage_dir(stage6.PRUNING) / stage6._Pruned(baseline, 0.0, settings).folder_name
    finished.mkdir(parents=True)
    ids = ["NA", "nan", "null", "None", "N/A", "a"]
    (finished / "metrics.csv").write_text("dataset,id,patient,dsc\n" + "".join(f"d1,{i},{i},0.5\n" for i in ids))
    PruningResult(0.0, "unpruned", 1000, 0.5, 1.0, (32, 32)).save(finished / "summary.json")
    stage6.run_pruning(study, prepare_data(study), baseline)  # resumes: nothing to train
    table = read_table(study.layout.stage_metrics(stage6.PRUNING))
    assert list(table["id"]) == ids and list(table["patient"]) == ids and table["dsc"].notna().all()


def test_each_stage_records_its_own_provenance_and_a_partial_run_rewrites_only_its_stages(tmp_path):
    from spineseg.study.notebook import start

    write_rectangles(tmp_path / "mydata", "d1", 20)
    _project(tmp_path, {"source": "folder", "d1": "mydata/d1"})
    path = tmp_path / "runs/mine/provenance.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"profile": "mine", "overrides": {}, "time": "2024", "packages": {}}))  # before sections
    start("mine", {"threads": 1}, str(tmp_path), notebook="03_final_training")  # the full run
    start("mine", {"device": "cpu"}, str(tmp_path), notebook="00_data")  # a later `--stages 0`, other overrides
    sections = json.loads(path.read_text())
    assert set(sections) == {"00_data", "03_final_training"}
    assert sections["03_final_training"]["overrides"] == {"threads": 1}
    assert sections["00_data"]["overrides"] == {"device": "cpu"}


def test_opening_a_study_leaves_torch_threads_alone(tmp_path, torch_single_thread):
    import torch

    _project(tmp_path, {"source": "folder", "d1": "mydata/d1"})
    profile = tmp_path / "params/mine.yaml"
    profile.write_text(profile.read_text().replace("threads: 1", "threads: 2"))
    assert open_study("mine", project_dir=tmp_path).cfg.threads == 2 and torch.get_num_threads() == 1


def test_a_run_writes_every_artifact_and_is_skipped_when_done(tmp_path):
    d1 = write_rectangles(tmp_path, "d1", 20)
    d2 = write_rectangles(tmp_path, "d2", 5, seed=1, test_only=True)
    data = StudyData(d1, d2, fingerprint="f")
    spec = RunSpec(stage="t", encoder="MobileNetV2", image_size=64, data=data.fingerprint,
                   train=TrainSettings(batch_size=4, lr=1e-4, max_epochs=2, patience=2, augment=True, seed=0))
    summary = execute(spec, data, tmp_path / "store", device="cpu")
    folder = spec.files(tmp_path / "store").folder
    for name in ("config.json", "history.csv", "best.pt", "summary.json", "model.json", "DONE", "metrics_d1_val.csv",
                 "metrics_d1_test.csv", "metrics_d2_test.csv", "probs_d1_test.npz", "probs_d2_test.npz"):
        assert (folder / name).is_file(), name
    assert not (folder / "checkpoint.pt").exists()
    cached = load_probs(spec.files(tmp_path / "store"), spec.candidate, "d2", "test")
    ids, probs = cached.ids, cached.probs
    assert len(ids) == 5 and probs.shape == (5, 64, 64) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    assert summary["epochs_run"] == 2 and json.loads((folder / "config.json").read_text())["encoder"] == "MobileNetV2"
    before = (folder / "best.pt").stat().st_mtime_ns
    assert execute(spec, data, tmp_path / "store", device="cpu") == summary
    said = []
    assert run_all([spec], data, tmp_path / "store", device="cpu", log=said.append) == [summary]
    assert said == ["1 of 1 runs already finished: skipped"]
    assert (folder / "best.pt").stat().st_mtime_ns == before
    # issue #34 row 17: a truncated prediction file failed every rerun with BadZipFile deep in stage 4
    path = spec.files(tmp_path / "store").probs("d2", "test")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StageOrderError, match=f"{path} is damaged .*delete it and rerun stage 3: it is made again from"):
        load_probs(spec.files(tmp_path / "store"), spec.candidate, "d2", "test")
    path.unlink()
    assert execute(spec, data, tmp_path / "store", device="cpu") == summary
    assert (folder / "best.pt").stat().st_mtime_ns == before  # evaluated again, not trained
    np.testing.assert_allclose(load_probs(spec.files(tmp_path / "store"), spec.candidate, "d2", "test").probs, probs, atol=1e-3)
    (folder / "summary.json").write_text("{")
    with pytest.raises(StageOrderError, match=f"summary.json is damaged .*delete {folder} to train this run again"):
        execute(spec, data, tmp_path / "store", device="cpu")


def test_a_finished_run_describes_its_model_so_that_it_loads_without_its_spec(tmp_path):
    import torch

    from spineseg.predict import predict
    from spineseg.saved_models import load_model
    from spineseg.study.runs.store import load_trained

    d1 = write_rectangles(tmp_path, "d1", 20, size=96)
    data = StudyData(d1, None, fingerprint="f")
    spec = RunSpec(stage="t", encoder="MobileNetV2", image_size=64, data=data.fingerprint,
                   train=TrainSettings(batch_size=4, lr=1e-3, max_epochs=1, patience=1, augment=False, seed=0, coordinates=True))
    summary = execute(spec, data, tmp_path / "store", device="cpu")
    folder = spec.files(tmp_path / "store").folder
    description, model = load_model(folder, torch.device("cpu"))
    assert (description.name, description.input_size, description.grid) == ("MobileNetV2", (64, 64), (96, 96))
    assert description.coordinates and description.weights_origin == {"pretrained": "none", "weights_path": None, "init": None}
    assert description.metrics["best_val_dsc"] == summary["best_val_dsc"] and "mean_dsc_d1_test" in description.metrics
    assert description.code_version["spineseg"] and description.precision == "auto"
    images = np.random.default_rng(0).random((2, 64, 64), dtype=np.float32)
    trained = load_trained(tmp_path / "store", spec, torch.device("cpu"))
    assert np.array_equal(predict(model, images, torch.device("cpu")).region, predict(trained, images, torch.device("cpu")).region)


def test_run_keys_change_with_the_config_and_the_data(tmp_path):
    def spec(seed=0, data="abc", lr=1e-4):
        train = TrainSettings(batch_size=4, lr=lr, max_epochs=3, patience=2, augment=True, seed=seed)
        return RunSpec(stage="s", encoder="ResNet34", image_size=64, train=train, data=data)

    assert spec().key() == spec().key()
    assert spec().key() != spec(seed=1).key()
    assert spec().key() != spec(data="abd").key()
    assert spec().key() != spec(lr=3e-4).key()


LEASE_SCRIPT = """
import sys, json
from pathlib import Path
import torch
torch.set_num_threads(1)
from spineseg.study.core.session import StudyData
from spineseg.study.runs.store import RunSpec, run_all
from spineseg.train import TrainSettings
d1, store, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
import spineseg.study.runs.store as S
real = S._train
def counted(spec, files, data, device, hflip):
    with open(log, "a") as fh:
        fh.write(files.folder.name + "\\n")
    return real(spec, files, data, device, hflip)
S._train = counted
specs = [RunSpec(stage="t", encoder="MobileNetV2", image_size=32, data="x",
                 train=TrainSettings(batch_size=4, lr=1e-3, max_epochs=1, patience=1, augment=False, seed=seed))
         for seed in range(3)]
print(json.dumps([s["folder"] for s in run_all(specs, StudyData(d1, fingerprint="x"), store, device="cpu")]))
"""


def test_two_processes_on_one_store_train_each_run_exactly_once(tmp_path):
    import os
    import subprocess
    import sys

    d1 = write_rectangles(tmp_path, "d1", 20, size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "trained.log"
    children = [subprocess.Popen([sys.executable, "-c", LEASE_SCRIPT, str(d1), str(tmp_path / "store"), str(log)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=600) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    trained = log.read_text().split()
    assert len(trained) == len(set(trained)) == 3  # every run once, by one of the two
    folders = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert folders[0] == folders[1]  # both got every summary, in order


def test_summaries_have_one_column_order_whether_trained_now_or_read_back(tmp_path):
    d1 = write_rectangles(tmp_path, "d1", 20, size=32)
    data = StudyData(d1, fingerprint="f")
    spec = RunSpec(stage="t", encoder="MobileNetV2", image_size=32, data="f",
                   train=TrainSettings(batch_size=4, lr=1e-3, max_epochs=1, patience=1, augment=False, seed=0))
    fresh = execute(spec, data, tmp_path / "store", device="cpu")
    again = execute(spec, data, tmp_path / "store", device="cpu")
    assert list(fresh) == summary_columns()
    assert list(again) != list(fresh) and set(again) == set(fresh)  # read back from sorted JSON: why the order is imposed


def test_a_corrected_mask_gives_every_run_a_new_key(tmp_path):
    write_rectangles(tmp_path / "mydata", "a", 20)
    _project(tmp_path, {"source": "folder", "d1": "mydata/a"})
    study = open_study("mine", project_dir=tmp_path)
    before = prepare_data(study).fingerprint
    mask = tmp_path / "mydata/a/masks/img000.png"
    from PIL import Image

    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 255 - values[0, 0]
    Image.fromarray(values).save(mask)
    assert prepare_data(study).fingerprint != before


def test_specs_without_a_crop_keep_the_keys_they_had_before_crops_existed():
    # the config.json of a stage-2 run of the aasce study, written before RunSpec had `crop`
    config = json.loads('{"architecture":"unet","attention":false,"data":"f181a8ed8b6b","encoder":"MobileNetV2",'
                        '"image_size":[256,96],"init":null,"pretrained":"none","stage":"stage2","train":{"augment":true,'
                        '"batch_size":8,"coordinates":true,"crop_height":0,"eval_batch_size":8,"lr":0.001,"max_epochs":12,'
                        '"optimizer":"adam","patience":6,"precision":"auto","seed":0,"target":"binary"},"weights_path":null}')
    spec = RunSpec(**{**config, "train": TrainSettings(**config["train"])})
    assert spec.folder_name() == "stage2-MobileNetV2-256x96px-s0-00769a46a5"  # a user's store is not retrained
    assert replace(spec, crop=CropGeometry((64, 32))).key() != spec.key()
    imagenet = replace(spec, pretrained="imagenet")  # named as before too: the key alone tells the weights apart
    assert imagenet.folder_name() == f"stage2-MobileNetV2-256x96px-s0-{imagenet.key()}" and imagenet.key() != spec.key()


def test_a_crop_model_trains_on_crops_around_the_region_and_leaves_scoring_to_stage_4(tmp_path, monkeypatch):
    d1 = write_rectangles(tmp_path, "d1", 20)
    data = StudyData(d1, None, fingerprint="f")
    seen = []
    real_fit = store_module.fit
    monkeypatch.setattr(store_module, "fit", lambda model, train, val, *args, **kw: (seen.append((train, val)),
                                                                                     real_fit(model, train, val, *args, **kw))[1])
    spec = RunSpec(stage="stage3", encoder="MobileNetV2", image_size=(64, 32), data=data.fingerprint,
                   train=TrainSettings(batch_size=4, lr=1e-3, max_epochs=1, patience=1, augment=False, seed=0),
                   crop=CropGeometry((64, 32), copies=3))
    summary = execute(spec, data, tmp_path / "store", device="cpu")
    folder = spec.files(tmp_path / "store").folder
    assert folder.name.startswith("stage3-MobileNetV2-crop-64x32px-s0-") and summary["epochs_run"] == 1
    assert (folder / "DONE").is_file() and (folder / "best.pt").is_file() and not list(folder.glob("probs_*"))
    described = json.loads((folder / "model.json").read_text())
    assert described["crop"]["size"] == [64, 32] and described["crop"]["copies"] == 3 and described["grid"] == [64, 64]
    (train, val), = seen
    assert train.images.shape[1:] == val.images.shape[1:] == (64, 32)
    assert len(train) == 3 * 14 and len(val) == 2 and train.ids[:2] == (f"{train.ids[0][:-2]}#0", f"{train.ids[0][:-2]}#1")


def test_overrides_that_change_results_get_their_own_run_folder(tmp_path):
    from spineseg.study.core.artifacts import Layout, variant_name

    assert variant_name("quick", {}) == "quick"
    assert variant_name("quick", {"executor.kind": "dask", "threads": 1, "device": "cpu"}) == "quick"  # how, not what
    threshold = variant_name("quick", {"stage4.threshold": 0.3, "threads": 1})
    assert threshold.startswith("quick+") and threshold == variant_name("quick", {"stage4.threshold": 0.3})
    assert threshold != variant_name("quick", {"stage4.threshold": 0.4})
    layout = Layout.of(tmp_path, "quick", {"stage4.threshold": 0.3})
    assert layout.run_dir == tmp_path / "runs" / threshold and layout.figures_dir == tmp_path / "figures" / threshold
    assert layout.store == tmp_path / "runs/quick/train" and layout.data_dir == tmp_path / "runs/quick/data"  # shared
    assert Layout.of(tmp_path, "quick", {"data.seed": 3}).data_dir == tmp_path / "runs" / variant_name("quick", {"data.seed": 3}) / "data"
    assert Layout.of(tmp_path, "quick", {"stage4.threshold": 0.3}, in_place=True).run_dir == tmp_path / "runs/quick"


def test_editing_the_profile_makes_the_same_overrides_a_new_variant(tmp_path):
    """Issue #34: a variant named by its overrides alone kept the stage copies it took from the profile as it was."""
    from spineseg.study.core.artifacts import Layout

    (tmp_path / "params").mkdir()
    profile = tmp_path / "params/mine.yaml"
    profile.write_text("stage3: {max_epochs: 4}\n")
    before = Layout.of(tmp_path, "mine", {"stage4.threshold": 0.3}).run_dir
    assert before == Layout.of(tmp_path, "mine", {"stage4.threshold": 0.3}).run_dir  # stable while the file is
    profile.write_text("stage3: {max_epochs: 5}\n")
    assert Layout.of(tmp_path, "mine", {"stage4.threshold": 0.3}).run_dir != before
    assert Layout.of(tmp_path, "mine", {}).run_dir == tmp_path / "runs/mine"  # the profile's own run keeps its name


def test_a_variant_starts_from_the_profiles_stages_before_the_first_it_changes(tmp_path):
    from spineseg.study.core.session import seed_variant

    _project(tmp_path, {"source": "synthetic", "size": 64, "d1_count": 20, "d2_count": 4})
    base = open_study("mine", project_dir=tmp_path).layout
    for folder in ("stage1", "stage2", "stage2_scratch", "stage3", "stage4"):
        (base.stage_dir(folder)).mkdir(parents=True)
        (base.stage_dir(folder) / "metrics_test.csv").write_text(f"{folder}\n")
    overrides = {"stage3.max_epochs": 1}
    study = open_study("mine", overrides, project_dir=tmp_path)
    seed_variant(study, overrides)
    variant = study.layout
    assert variant.run_dir != base.run_dir
    assert [f for f in ("stage1", "stage2", "stage2_scratch", "stage3", "stage4") if variant.stage_dir(f).is_dir()] == [
        "stage1", "stage2", "stage2_scratch"]  # stage 3 and after are the variant's own to make
    assert (variant.stage_dir("stage2") / "metrics_test.csv").read_text() == "stage2\n"
    record = json.loads(variant.variant.read_text())
    assert record["overrides"] == overrides and record["stages_copied"] == ["stage1", "stage2", "stage2_scratch"]
    (base.stage_dir("stage2") / "metrics_test.csv").write_text("changed later\n")
    seed_variant(study, overrides)  # what the variant has is its own: never copied over
    assert (variant.stage_dir("stage2") / "metrics_test.csv").read_text() == "stage2\n"


def test_a_variant_made_before_the_profile_finished_picks_up_its_stages_later(tmp_path):
    from spineseg.study.core.session import seed_variant

    _project(tmp_path, {"source": "synthetic", "size": 64, "d1_count": 20, "d2_count": 4})
    overrides = {"stage4.threshold": 0.3}
    study = open_study("mine", overrides, project_dir=tmp_path)
    seed_variant(study, overrides)
    assert json.loads(study.layout.variant.read_text())["stages_copied"] == []
    base = study.layout.base
    for folder in ("stage2", "stage3"):
        base.stage_dir(folder).mkdir(parents=True)
        (base.stage_dir(folder) / "runs.csv").write_text(f"{folder}\n")
    seed_variant(study, overrides)
    assert (study.layout.stage_dir("stage3") / "runs.csv").read_text() == "stage3\n"
    assert json.loads(study.layout.variant.read_text())["stages_copied"] == ["stage2", "stage3"]


def test_a_variant_may_not_change_how_the_shared_runs_are_evaluated(tmp_path):
    _project(tmp_path, {"source": "synthetic", "size": 64, "d1_count": 20, "d2_count": 4})
    with pytest.raises(ConfigError, match="stage3.tta_hflip.*--in-place"):
        open_study("mine", {"stage3.tta_hflip": True}, project_dir=tmp_path)
    assert open_study("mine", {"stage3.tta_hflip": True}, project_dir=tmp_path, in_place=True).layout.run_dir.name == "mine"


def test_a_notebook_shows_the_profiles_description_as_text(tmp_path, monkeypatch):
    import IPython.display

    from spineseg.study.notebook import start

    _project(tmp_path, {"source": "synthetic", "size": 64, "d1_count": 20, "d2_count": 4})
    profile = tmp_path / "params/mine.yaml"
    profile.write_text(profile.read_text() + 'description: "<script>alert(1)</script> & co"\n')
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objects: shown.extend(o.data for o in objects))
    start("mine", {}, str(tmp_path), notebook="00_data")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in shown[0] and "<script>" not in shown[0]
