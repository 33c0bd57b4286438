"""Atomic writes: a failed write leaves the old file (or nothing) and no temporary file; a good
one lands with ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest
import torch

from spineseg import atomic


class _Boom:
    def __reduce__(self):
        raise RuntimeError("serialisation failed half-way")


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_failing_block_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="midway"), atomic.atomic_path(target) as tmp:
        tmp.write_text("new but incompl")
        assert tmp.parent == target.parent  # same folder: the rename is atomic
        assert tmp.name.startswith(".") and ".tmp" in tmp.name
        raise RuntimeError("midway")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_serialiser_failing_midway_keeps_old_checkpoint(tmp_path):
    target = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1}, target)
    with pytest.raises(RuntimeError, match="half-way"), atomic.atomic_path(target) as tmp:
        torch.save({"weights": torch.zeros(1000), "bad": _Boom()}, tmp)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_failed_first_write_creates_nothing(tmp_path):
    target = tmp_path / "deep" / "er" / "new.json"
    with pytest.raises(ValueError), atomic.atomic_path(target):
        raise ValueError("nope")
    assert not target.exists()
    assert list((tmp_path / "deep" / "er").iterdir()) == []


def test_successful_write_replaces_content_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    atomic.write_bytes(target, b"one")
    atomic.write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]


def test_file_mode_follows_umask_not_0600(tmp_path, umask_022):
    target = tmp_path / "a.txt"
    atomic.write_text(target, "x")
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode != 0o600
    assert mode == 0o644


def test_file_mode_with_group_writable_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        atomic.write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o664


def test_umask_is_left_as_it_was(tmp_path, umask_022):
    atomic.write_text(tmp_path / "c.txt", "x")
    current = os.umask(0o022)
    assert current == 0o022


def test_json_and_csv_helpers_round_trip(tmp_path):
    atomic.write_json(tmp_path / "s.json", {"b": 1, "a": [1.5, "x"], "p": tmp_path})
    loaded = json.loads((tmp_path / "s.json").read_text())
    assert loaded == {"a": [1.5, "x"], "b": 1, "p": str(tmp_path)}
    frame = pd.DataFrame({"id": ["001", "002"], "dsc": [0.5, 0.75]})
    atomic.write_csv(tmp_path / "m.csv", frame)
    text = (tmp_path / "m.csv").read_text()
    assert text.splitlines()[0] == "id,dsc"  # no index column
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "m.csv", dtype={"id": str}), frame)


def test_a_damaged_cache_reads_as_empty_so_it_is_made_again(tmp_path):
    from spineseg.atomic import read_json_cache

    path = tmp_path / "cache.json"
    assert read_json_cache(path) == {}
    for damaged in (b'{"half": ', b"\xff\xfe", b"[1, 2]"):
        path.write_bytes(damaged)
        assert read_json_cache(path) == {}
    path.write_text('{"fingerprint": "abc"}')
    assert read_json_cache(path) == {"fingerprint": "abc"}


def test_a_damaged_provenance_file_is_replaced_by_the_stage_that_runs(tmp_path):
    from spineseg.study.core import provenance

    path = tmp_path / "provenance.json"
    path.write_text('{"00_data": {"time": ')
    provenance.record(path, "02_backbone_selection", {"time": "now"})
    assert json.loads(path.read_text()) == {"02_backbone_selection": {"time": "now"}}
