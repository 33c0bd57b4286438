"""The run grid on Dask: the same results as here, nothing trained twice, a killed worker survived."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_rectangles
from spineseg.errors import WeightsUnavailable
from spineseg.study.core.config import ExecutorSection
from spineseg.study.core.executors import DaskExecutor, RunFailed, SequentialExecutor
from spineseg.study.core.session import StudyData
from spineseg.study.runs.store import RunSpec, run_all
from spineseg.train import TrainSettings

pytestmark = [pytest.mark.usefixtures("torch_single_thread"),  # the workers run one thread each, so must we
              pytest.mark.slow, pytest.mark.dask]
COMPARED = ["best_val_dsc", "best_epoch", "epochs_run", "stopped_early", "folder"]


def _grid(data_fingerprint: str, epochs: int = 2, size: int = 32) -> list[RunSpec]:
    return [RunSpec(stage="stage2", encoder=encoder, image_size=(size, size), data=data_fingerprint,
                    train=TrainSettings(batch_size=4, lr=3e-3, max_epochs=epochs, patience=epochs, augment=True, seed=seed))
            for encoder in ("MobileNetV2", "EfficientNetB0") for seed in (0, 1)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> StudyData:
    return StudyData(write_rectangles(tmp_path_factory.mktemp("dask"), "d1", 20), fingerprint="rect")


def test_a_local_cluster_gives_what_the_sequential_executor_gives_and_skips_what_is_done(data, tmp_path):
    specs = _grid(data.fingerprint)
    here = pd.DataFrame(run_all(specs, data, tmp_path / "here", device="cpu", executor=SequentialExecutor()))
    dask = DaskExecutor(ExecutorSection(kind="dask", workers=2, threads_per_worker=1))
    there = pd.DataFrame(run_all(specs, data, tmp_path / "there", device="cpu", executor=dask))
    pd.testing.assert_frame_equal(here[COMPARED], there[COMPARED])
    for spec in specs:
        np.testing.assert_array_equal(np.load(spec.files(tmp_path / "here").probs("d1", "test"))["probs"],
                                      np.load(spec.files(tmp_path / "there").probs("d1", "test"))["probs"])
    stamps = [spec.files(tmp_path / "there").best.stat().st_mtime_ns for spec in specs]
    said = []
    class Unused:  # a finished grid only reads summaries: no cluster is started (or, on SLURM, jobs submitted)
        def map(self, *args, **kwargs):
            raise AssertionError("the executor was asked to run a finished grid")

    again = pd.DataFrame(run_all(specs, data, tmp_path / "there", device="cpu", executor=Unused(), log=said.append))
    assert [spec.files(tmp_path / "there").best.stat().st_mtime_ns for spec in specs] == stamps
    assert said == ["4 of 4 runs already finished: skipped"]
    pd.testing.assert_frame_equal(again[COMPARED], there[COMPARED])


def test_a_worker_killed_mid_training_is_survived_and_its_run_resumes(data, tmp_path):
    from distributed import LocalCluster

    specs = _grid(data.fingerprint, epochs=8, size=64)[:2]
    store = tmp_path / "store"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        executor = DaskExecutor(ExecutorSection(kind="dask", address=cluster.scheduler_address, retries=2))
        results: list = []
        thread = threading.Thread(target=lambda: results.append(run_all(specs, data, store, device="cpu", executor=executor)))
        thread.start()
        victim = specs[0].files(store)
        deadline = time.monotonic() + 300
        while not (victim.checkpoint.is_file() and victim.history.is_file() and len(pd.read_csv(victim.history)) >= 2):
            assert time.monotonic() < deadline and thread.is_alive(), "the run never wrote two epochs"
            time.sleep(0.1)
        before = pd.read_csv(victim.history)
        for nanny in list(cluster.workers.values()):  # kill every worker: whichever held the run dies with it
            os.kill(nanny.process.process.pid, signal.SIGKILL)
        thread.join(timeout=600)
    assert results and all(summary["epochs_run"] == 8 for summary in results[0])
    after = pd.read_csv(victim.history)
    assert list(after["epoch"]) == list(range(1, 9))
    # the epochs finished before the kill are kept as they were: the run resumed, it did not start again
    pd.testing.assert_frame_equal(after.iloc[:len(before) - 1], before.iloc[:len(before) - 1])
    assert not list(victim.folder.glob(".*.tmp*"))


def test_a_failing_run_is_named_after_the_others_finish(tmp_path):
    calls = []

    def task(item):
        calls.append(item)
        if item == "b":
            raise WeightsUnavailable("no ImageNet weights here")
        return item.upper()

    with pytest.raises(RunFailed, match=r"1 run\(s\) failed, the others finished — run b: WeightsUnavailable: no ImageNet"):
        SequentialExecutor().map(task, ["a", "b", "c"], label=lambda item: f"run {item}")
    assert calls == ["a", "b", "c"]
    attempts = tmp_path / "attempts.txt"

    def counted(item):
        with open(attempts, "a") as file:
            file.write(item)
        return task(item)

    # retries are for workers that die: a run that raises is reported at once, not trained three times
    with pytest.raises(RunFailed, match="run b: WeightsUnavailable"):
        DaskExecutor(ExecutorSection(kind="dask", workers=1, retries=2)).map(counted, ["a", "b", "c"],
                                                                              label=lambda item: f"run {item}")
    assert sorted(attempts.read_text()) == ["a", "b", "c"]


def test_the_executor_is_chosen_and_validated_in_the_profile(tmp_path):
    import yaml

    from spineseg.errors import ConfigError
    from spineseg.study.core.config import load_profile, parse_override

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({}))
    cfg = load_profile(path, dict([parse_override("executor.kind=dask"), parse_override("executor.workers=2")]))
    assert (cfg.executor.kind, cfg.executor.workers, cfg.executor.threads_per_worker) == ("dask", 2, 1)
    with pytest.raises(ConfigError, match="executor.kind = 'spark'"):
        load_profile(path, {"executor.kind": "spark"})
    with pytest.raises(ConfigError, match="executor.slurm.gpus.*raise slurm.jobs"):
        load_profile(path, {"executor.slurm.gpus": 2})
    assert torch.get_num_threads() == 1


def test_a_slurm_cluster_without_sbatch_is_refused_at_once(tmp_path, monkeypatch):
    from spineseg.errors import ConfigError

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    section = ExecutorSection(kind="dask", cluster="slurm")
    with pytest.raises(ConfigError, match="executor.cluster = 'slurm' but sbatch is not on PATH"):
        DaskExecutor(section)
    DaskExecutor(section.model_copy(update={"address": "tcp://10.0.0.5:8786"}))  # a running scheduler needs no sbatch
