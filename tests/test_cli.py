"""The console entry: data generation and clear, non-traceback errors."""

import subprocess
import sys

from spineseg.cli import main
from spineseg.data import read_manifest


def test_data_synth_writes_both_datasets(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--size", "64", "--seed", "3"]) == 0
    d1, d2 = read_manifest(tmp_path / "d1"), read_manifest(tmp_path / "d2")
    assert len(d1) == 183 and len(d2) == 58
    assert d1["split"].value_counts().to_dict() == {"train": 128, "test": 37, "val": 18}
    assert set(d2["split"]) == {"test"}
    assert "d1:" in capsys.readouterr().out


def test_unknown_profile_is_one_clear_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "params").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spineseg: error:") and "nope.yaml does not exist" in err and "Traceback" not in err


def test_bad_override_and_missing_aasce_source(tmp_path, capsys):
    assert main(["data", "aasce", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert main(["run", "--profile", "smoke", "--set", "stage2.repeats"]) == 2
    assert "key.sub=value" in capsys.readouterr().err


def test_run_takes_threads_and_device_as_how_it_runs_not_a_variant(monkeypatch):
    import spineseg.study.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run_study", lambda project, profile, stages, overrides, in_place: calls.append(overrides))
    assert main(["run", "--profile", "smoke", "--threads", "1", "--device", "cpu", "--set", "stage2.repeats=2"]) == 0
    assert calls == [{"stage2.repeats": 2, "threads": 1, "device": "cpu"}]
    from spineseg.study.core.artifacts import variant_name

    assert variant_name("smoke", {"threads": 1, "device": "cpu"}) == "smoke"  # the profile's own folder


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "spineseg", "--help"], capture_output=True, text=True, check=True)
    assert "data" in result.stdout and "run" in result.stdout and "bench" in result.stdout


def test_data_synth_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(tmp_path), "--size", "32"]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "notes.txt").exists()


def test_force_replaces_only_what_a_conversion_wrote_and_the_folder_follows_the_umask(tmp_path, capsys):
    import os
    import stat

    out = tmp_path / "v"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(out), "--size", "32", "--force"]) == 2
    err = capsys.readouterr().err
    assert "v holds important.txt, which no spineseg conversion wrote" in err and (out / "important.txt").read_text() == "keep me"
    (out / "important.txt").unlink()
    from spineseg.data.synthetic import synthesize

    previous = os.umask(0o022)
    try:  # the library call behind `data synth`, with few images
        synthesize(out, size=32, counts={"d1": 6}, force=True)  # an empty folder
        synthesize(out, size=32, counts={"d1": 6}, seed=1, force=True)  # a folder of its own datasets
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and sorted(p.name for p in out.iterdir()) == ["d1"]


def test_seeds_and_sizes_past_their_bounds_are_refused_before_any_work(tmp_path, capsys):
    source = tmp_path / "nothing-read"
    for command, message in (
        (["data", "aasce", "--src", str(source), "--out", str(tmp_path / "a"), "--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["data", "aasce", "--src", str(source), "--out", str(tmp_path / "a"), "--size", "100000x100000"],
         "image size must be at most 8192 pixels a side, got (100000, 100000)"),
        (["data", "synth", "--out", str(tmp_path / "s"), "--size", "100000"], "image size must be at most 8192 pixels a side"),
        (["data", "synth", "--out", str(tmp_path / "s"), "--seed", "-3"], "seed must be an integer in [0, 4294967295], got -3"),
    ):
        assert main(command) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written, not even an empty folder


def test_sizes_on_the_command_line():
    import argparse

    import pytest

    from spineseg.cli import _size

    assert _size("512") == 512 and _size("512x192") == (512, 192)
    with pytest.raises(argparse.ArgumentTypeError, match="HEIGHTxWIDTH"):
        _size("tall")


def _project_with_shipped_profiles(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[1] / "params", tmp_path / "params")
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)


def test_a_slurm_executor_without_sbatch_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    _project_with_shipped_profiles(tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["run", "--profile", "smoke", "--set", "executor.kind=dask", "--set", "executor.cluster=slurm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spineseg: error: executor.cluster = 'slurm' but sbatch is not on PATH") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_profile_is_a_name_in_params_never_a_path(tmp_path, capsys, monkeypatch):
    _project_with_shipped_profiles(tmp_path / "project", monkeypatch)
    (tmp_path / "outside.yaml").write_text("description: outside\n")
    for name in (str(tmp_path / "outside"), "../outside", "smoke/../smoke"):
        for command in (["run", "--profile", name], ["report", "--profile", name]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert err == (f"spineseg: error: profile {name!r} is not a profile name: a profile is the name of a file in "
                           f"{tmp_path / 'project/params'} without .yaml, never a path: aasce, paper, quick, smoke\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.yaml", "project"]
    assert not (tmp_path / "project/runs").exists()


def test_a_missing_weights_file_is_one_line_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    _project_with_shipped_profiles(tmp_path, monkeypatch)
    assert main(["run", "--profile", "smoke", "--set", "stage1.weights_path=nowhere.pt"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"spineseg: error: stage1.weights_path: {tmp_path / 'nowhere.pt'} does not exist\n")
    assert not (tmp_path / "runs").exists()  # not even the variant folder those overrides would make


def test_predict_refuses_located_with_two_stage_in_one_line_before_reading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no project here: the refusal comes first
    command = ["predict", "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--located"]
    assert main([*command, "--two-stage"]) == 2
    assert capsys.readouterr().err == "spineseg: error: --located and --two-stage: each makes its own mask; choose one\n"
    assert main([*command, "--rule", "max", "--model", str(tmp_path / "missing.zip")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spineseg: error: --rule max and --located: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
