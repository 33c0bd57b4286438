"""Training: it learns, it is reproducible, it stops early, it returns the best weights, and it
resumes — after a clean stop and after a real ``kill -9`` — exactly where an uninterrupted run goes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import spineseg.train as train_module
from spineseg.data import Split, load_split
from spineseg.errors import SpinesegError
from spineseg.metrics import dice
from spineseg.models import build_model
from spineseg.predict import Segmenter, predict_proba
from spineseg.train import TrainSettings, fit

ENCODER = "EfficientNetB0"  # small, learns the rectangles within an epoch; has stochastic depth
SIZE = 32
SETTINGS = TrainSettings(batch_size=4, lr=3e-3, max_epochs=4, patience=10, augment=True, seed=0)
CPU = torch.device("cpu")
SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = pytest.mark.train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: bitwise-reproducible CPU sums, and no fight over the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def splits(train_val_folder) -> tuple[Split, Split]:
    return load_split(train_val_folder, "train", SIZE), load_split(train_val_folder, "val", SIZE)


def _model(seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(build_model(ENCODER))


def _history(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "history.csv")


def _values(frame: pd.DataFrame) -> np.ndarray:
    return frame[["train_loss", "val_dsc"]].to_numpy()


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(splits, tmp_path_factory):
    """One uninterrupted run of SETTINGS: (folder, outcome, trained model)."""
    folder = tmp_path_factory.mktemp("reference")
    model = _model()
    outcome = fit(model, *splits, SETTINGS, folder, CPU)
    return folder, outcome, model


@pytest.fixture(scope="module")
def two_epochs(splits, tmp_path_factory):
    """One run of SETTINGS stopped after 2 epochs: (folder, outcome), trained once for the tests that compare with it,
    resume it or damage it (those work on a copy, `_copy`)."""
    folder = tmp_path_factory.mktemp("two_epochs")
    return folder, fit(_model(), *splits, replace(SETTINGS, max_epochs=2), folder, CPU)


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, dirs_exist_ok=True)
    return to


def test_it_learns(reference, splits):
    folder, outcome, _ = reference
    history = _history(folder)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    val = splits[1]
    everything = float(dice(np.ones_like(val.masks), val.masks).mean())  # predict "spine" everywhere
    assert outcome.best_val_dsc == pytest.approx(history["val_dsc"].max())
    assert outcome.best_val_dsc > max(0.6, everything + 0.3), (outcome.best_val_dsc, everything)
    assert outcome.epochs_run == 4 and not outcome.stopped_early
    assert outcome.best_epoch == int(history.loc[history["val_dsc"].idxmax(), "epoch"])


def test_returned_model_holds_the_best_epoch_weights(reference, splits):
    folder, outcome, model = reference
    best = torch.load(folder / "best.pt", weights_only=True)
    assert _state_equal(model.state_dict(), best)
    val = splits[1]
    again = float(dice(predict_proba(model, val.images, CPU) > 0.5, val.masks).mean())
    assert again == pytest.approx(outcome.best_val_dsc, abs=1e-12)
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert checkpoint["state"]["epoch"] == SETTINGS.max_epochs  # finished: max_epochs reached
    if outcome.best_epoch != 4:
        assert not _state_equal(checkpoint["model"], best)


def test_same_seed_same_history_and_weights(two_epochs, splits, tmp_path):
    fit(_model(), *splits, replace(SETTINGS, max_epochs=2), tmp_path, CPU)  # as two_epochs was, in another test
    np.testing.assert_array_equal(_values(_history(two_epochs[0])), _values(_history(tmp_path)))
    assert _state_equal(torch.load(two_epochs[0] / "best.pt", weights_only=True), torch.load(tmp_path / "best.pt", weights_only=True))


def test_another_seed_takes_another_path(reference, splits, tmp_path):
    fit(_model(), *splits, replace(SETTINGS, max_epochs=1, seed=1), tmp_path, CPU)
    assert _values(_history(tmp_path))[0, 0] != _values(_history(reference[0]))[0, 0]


def _scripted_dice(monkeypatch, values):
    """Replace the validation DSC by a script, one value per epoch, to steer early stopping."""
    calls = iter(values)

    def fake(pred, target):
        return np.full(len(target), next(calls))

    monkeypatch.setattr(train_module, "dice", fake)


def _small(splits) -> tuple[Split, Split]:
    train, val = splits
    return (Split(train.dataset, "train", train.ids[:4], train.images[:4], train.masks[:4]),
            Split(val.dataset, "val", val.ids[:2], val.images[:2], val.masks[:2]))


def test_early_stopping_after_patience_bad_epochs(splits, tmp_path, monkeypatch):
    # best at 1, worse, best at 3 (resets the count), worse, equal (not better) -> stop after 5
    _scripted_dice(monkeypatch, [0.5, 0.4, 0.7, 0.6, 0.7, 0.95, 0.99])
    model = _model()
    outcome = fit(model, *_small(splits), replace(SETTINGS, max_epochs=20, patience=2, lr=1e-2), tmp_path, CPU)
    history = _history(tmp_path)
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(history["val_dsc"], [0.5, 0.4, 0.7, 0.6, 0.7])
    assert (outcome.best_epoch, outcome.epochs_run, outcome.stopped_early) == (3, 5, True)
    assert outcome.best_val_dsc == 0.7
    # the model handed back is epoch 3's, not the last one
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert _state_equal(model.state_dict(), best) and not _state_equal(best, last)


def test_patience_waits_until_the_model_segments_anything(splits, tmp_path, monkeypatch):
    # DSC 0 (no foreground predicted yet) does not use up patience; after the first success it does
    _scripted_dice(monkeypatch, [0.0, 0.0, 0.0, 0.0, 0.3, 0.2, 0.2, 0.9])
    outcome = fit(_model(), *_small(splits), replace(SETTINGS, max_epochs=20, patience=2, lr=1e-2), tmp_path, CPU)
    assert list(_history(tmp_path)["epoch"]) == [1, 2, 3, 4, 5, 6, 7]
    assert (outcome.best_epoch, outcome.best_val_dsc, outcome.stopped_early) == (5, 0.3, True)


def test_finished_run_is_not_trained_again(splits, tmp_path, monkeypatch):
    _scripted_dice(monkeypatch, [0.5, 0.4, 0.3])
    settings = replace(SETTINGS, max_epochs=10, patience=2)
    small = _small(splits)
    first = fit(_model(), *small, settings, tmp_path, CPU)
    stamp = (tmp_path / "history.csv").stat().st_mtime_ns
    monkeypatch.setattr(train_module, "dice", lambda *a: pytest.fail("a finished run trained again"))
    model = _model(seed=5)
    second = fit(model, *small, settings, tmp_path, CPU)
    assert (first.best_epoch, first.epochs_run) == (second.best_epoch, second.epochs_run) == (1, 3)
    assert (tmp_path / "history.csv").stat().st_mtime_ns == stamp
    assert _state_equal(model.state_dict(), torch.load(tmp_path / "best.pt", weights_only=True))


def test_resume_with_more_epochs_matches_an_uninterrupted_run(reference, two_epochs, splits, tmp_path):
    first = two_epochs[1]
    assert first.epochs_run == 2 and len(_history(_copy(two_epochs[0], tmp_path))) == 2
    # a new process would build a fresh model; the checkpoint must restore everything that matters
    second = fit(_model(seed=123), *splits, SETTINGS, tmp_path, CPU)
    history = _history(tmp_path)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert second.epochs_run == 4 and not second.stopped_early
    np.testing.assert_allclose(_values(history), _values(_history(reference[0])), rtol=1e-6, atol=1e-7)
    assert second.best_epoch == reference[1].best_epoch


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import spineseg.train as T
    from spineseg.data import load_split
    from spineseg.models import build_model
    from spineseg.predict import Segmenter

    data, out, size, encoder = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    real, calls = T.predict_proba, []

    def slow_after_first_epoch(*args, **kwargs):
        # from epoch 2 on, linger before validating: the test's kill lands mid-epoch, not after the run
        calls.append(1)
        if len(calls) > 1:
            time.sleep(3)
        return real(*args, **kwargs)

    T.predict_proba = slow_after_first_epoch
    torch.manual_seed(0)
    settings = T.TrainSettings(batch_size={batch}, lr={lr}, max_epochs={max_epochs}, patience={patience},
                               augment={augment}, seed={seed})
    T.fit(Segmenter(build_model(encoder)), load_split(data, "train", size), load_split(data, "val", size), settings, out,
          torch.device("cpu"))
    """
).format(batch=SETTINGS.batch_size, lr=SETTINGS.lr, max_epochs=SETTINGS.max_epochs, patience=SETTINGS.patience,
         augment=SETTINGS.augment, seed=SETTINGS.seed)


def _epochs_done(folder: Path) -> int:
    try:
        return len(pd.read_csv(folder / "history.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def test_resume_after_kill_9(reference, splits, train_val_folder, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "child.log", "wb")  # noqa: SIM115 - held open for the child, closed in finally
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(train_val_folder), str(out), str(SIZE), ENCODER],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180  # generous: only a guard against a stuck child, not a timing check
        while not ((out / "checkpoint.pt").is_file() and _epochs_done(out) >= 1):
            if child.poll() is not None:
                pytest.fail(f"training child exited early ({child.returncode}):\n{(tmp_path / 'child.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("training child never wrote a checkpoint")
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()

    # what the killed run left: complete, loadable artifacts; at most hidden temporary files besides
    for path in out.iterdir():
        if path.name not in ("checkpoint.pt", "best.pt", "history.csv"):
            assert path.name.startswith(".") and ".tmp" in path.name, f"unexpected leftover {path.name}"
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    rows = _epochs_done(out)
    assert 1 <= saved["state"]["epoch"] < SETTINGS.max_epochs
    assert rows in (saved["state"]["epoch"], saved["state"]["epoch"] + 1)
    assert len(saved["state"]["history"]) == saved["state"]["epoch"]
    torch.load(out / "best.pt", weights_only=True)

    outcome = fit(_model(seed=99), *splits, SETTINGS, out, CPU)
    history = _history(out)
    assert list(history["epoch"]) == list(range(1, SETTINGS.max_epochs + 1))
    assert outcome.epochs_run == SETTINGS.max_epochs
    np.testing.assert_allclose(_values(history), _values(_history(reference[0])), rtol=1e-6, atol=1e-7)


def test_predict_proba_is_batch_size_independent(reference, splits):
    _, _, model = reference
    images = splits[1].images
    a = predict_proba(model, images, CPU, batch_size=1)
    b = predict_proba(model, images, CPU, batch_size=3)
    assert a.shape == images.shape and a.dtype == np.float32
    assert ((a >= 0) & (a <= 1)).all()
    np.testing.assert_allclose(a, b, atol=1e-5)


class _RunsCode:
    """Unpickling this object would run a shell command (the attack a weights_only load refuses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code_and_says_what_to_do(splits, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": _RunsCode(marker)}, run / "checkpoint.pt")
    with pytest.raises(SpinesegError) as info:
        fit(_model(), *splits, SETTINGS, run, CPU)
    assert not marker.exists()
    assert str(run / "checkpoint.pt") in str(info.value) and f"delete {run}" in str(info.value)


def test_a_kill_between_the_checkpoint_and_its_derived_files_is_repaired_on_resume(two_epochs, splits, tmp_path):
    settings = replace(SETTINGS, max_epochs=2)
    _copy(two_epochs[0], tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # as if killed right after the checkpoint of epoch 2: history one row short, best.pt gone, a temporary left
    pd.read_csv(tmp_path / "history.csv").iloc[:1].to_csv(tmp_path / "history.csv", index=False)
    (tmp_path / "best.pt").unlink()
    (tmp_path / ".checkpoint.pt.x1y2.tmp.pt").write_bytes(b"half a checkpoint")
    model = _model(seed=3)
    outcome = fit(model, *splits, settings, tmp_path, CPU)
    assert outcome.epochs_run == 2 and len(_history(tmp_path)) == 2
    assert _state_equal(torch.load(tmp_path / "best.pt", weights_only=True), saved["best_model"])
    assert _state_equal(model.state_dict(), saved["best_model"])
    assert not list(tmp_path.glob(".*.tmp*"))


def test_checkpoints_load_with_weights_only(reference):
    folder, outcome, _ = reference
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert saved["state"]["best_epoch"] == outcome.best_epoch and len(saved["state"]["history"]) == saved["state"]["epoch"]


def test_a_level_aware_model_with_coordinates_and_crops_learns_and_predicts_ordered_levels(tmp_path):
    from conftest import column_samples
    from spineseg.data import write_dataset
    from spineseg.objectives import Levels
    from spineseg.predict import predict

    folder = write_dataset(tmp_path, "columns", column_samples(20), fractions=(0.8, 0.2, 0.0))
    train, val = load_split(folder, "train", labels=True), load_split(folder, "val")
    settings = replace(SETTINGS, max_epochs=4, target="levels", coordinates=True, crop_height=64, batch_size=4, lr=3e-3)

    def model():
        torch.manual_seed(0)
        return Segmenter(build_model("MobileNetV2", in_channels=3, classes=18), Levels(), coordinates=True)

    first = model()
    outcome = fit(first, train, val, settings, tmp_path / "a", CPU)
    history = _history(tmp_path / "a")
    assert history["train_loss"].iloc[-1] < 0.8 * history["train_loss"].iloc[0]
    prediction = predict(first, val.images, CPU, hflip=True)
    assert prediction.region.shape == val.images.shape == prediction.levels.shape
    assert ((prediction.region >= 0) & (prediction.region <= 1)).all()
    assert set(np.unique(prediction.levels)) <= set(range(18))
    fit(model(), train, val, settings, tmp_path / "b", CPU)  # the same seed takes the same path, crops included
    np.testing.assert_array_equal(_values(_history(tmp_path / "a")), _values(_history(tmp_path / "b")))
    assert outcome.epochs_run == 4


def test_augmenting_a_level_map_never_pushes_a_level_out():
    import albumentations as A

    from conftest import column_samples
    from spineseg.augment import augment_batch

    sample = column_samples(1)[0]
    push_out = A.Compose([A.Affine(translate_percent={"y": (0.45, 0.45), "x": (0, 0)}, p=1.0)], seed=0)
    images, labels = augment_batch(push_out, sample.image[None] / 255.0, sample.labels[None], keep_levels=True)
    np.testing.assert_array_equal(labels[0], sample.labels)  # every try lost levels: the sample stays as it was
    _, moved = augment_batch(push_out, sample.image[None] / 255.0, sample.labels[None], keep_levels=False)
    assert not np.array_equal(moved[0], sample.labels)


def test_an_epoch_that_keeps_the_best_weights_does_not_rewrite_best_pt(tmp_path):
    from spineseg.train import BEST, HISTORY, _write_derived

    saved = {"best_model": {"w": torch.ones(2)}, "state": {"history": [{"epoch": 1, "val_dsc": 0.5}]}}
    _write_derived(tmp_path, saved, best_changed=False)  # no best.pt yet: written all the same
    assert torch.equal(torch.load(tmp_path / BEST, weights_only=True)["w"], torch.ones(2))
    written = (tmp_path / BEST).stat().st_mtime_ns
    later = {"best_model": {"w": torch.ones(2)}, "state": {"history": [{"epoch": 1, "val_dsc": 0.5}, {"epoch": 2, "val_dsc": 0.4}]}}
    _write_derived(tmp_path, later, best_changed=False)
    assert (tmp_path / BEST).stat().st_mtime_ns == written and len((tmp_path / HISTORY).read_text().splitlines()) == 3


def test_the_cosine_schedule_warms_up_then_decays_and_depends_on_the_epoch_alone():
    settings = train_module.TrainSettings(batch_size=2, lr=1e-3, max_epochs=11, patience=3, augment=False, seed=0,
                                          lr_schedule="cosine")
    rates = [settings.lr_at(epoch) for epoch in range(11)]
    assert rates[0] == pytest.approx(1e-4) and rates[1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates[1:], rates[2:])) and rates[-1] > 0
    assert rates == [settings.lr_at(epoch) for epoch in range(11)]  # a resumed run meets the same rates
    assert replace(settings, lr_schedule="constant").lr_at(7) == 1e-3


def test_run_keys_without_the_new_settings_are_the_keys_they_had():
    """A run with the article's augmentation and a constant rate keeps the folder name it had before either setting
    existed, so finished runs are never trained again."""
    from spineseg.study.runs.store import RunSpec

    settings = train_module.TrainSettings(batch_size=2, lr=1e-3, max_epochs=2, patience=2, augment=True, seed=0)
    spec = RunSpec("stage2", "MobileNetV2", 64, settings, data="abc")
    assert spec.key() == "39f4a9e5f1"  # computed at c887a2d, before `augmentation` and `lr_schedule`
    assert RunSpec("stage2", "MobileNetV2", 64, replace(settings, lr_schedule="cosine"), data="abc").key() != spec.key()


def test_epochs_before_the_first_eligible_one_are_never_chosen_nor_spend_patience():
    settings = train_module.TrainSettings(batch_size=2, lr=1e-3, max_epochs=10, patience=2, augment=False, seed=0,
                                          choose_after=0.5)
    assert settings.first_eligible == 5 and replace(settings, choose_after=0.0).first_eligible == 1
    progress = train_module._Progress()
    scores = [0.9, 0.2, 0.2, 0.2, 0.5, 0.6, 0.55, 0.58]  # a lucky first epoch, then noise, then the real curve
    for epoch, score in enumerate(scores, start=1):
        progress.record(score, 1.0, 1.0, eligible=epoch >= settings.first_eligible)
        assert not progress.finished(settings) or epoch == 8
    assert (progress.best_epoch, progress.best_val_dsc) == (6, 0.6) and progress.finished(settings)  # two bad epochs after 6
