"""Hostile and careless inputs (issue #34's probe, replayed): each ends with one line naming the file or field, or
with the expected behaviour, and nothing outside the output folder changes."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spineseg.errors import ConfigError, DatasetError, ModelError
from spineseg.predict import load_state, load_weights
from spineseg.saved_models import ModelDescription, load_model
from spineseg.study.inference.bundle import FORMAT, MAX_ENTRY_BYTES, MAX_MEMBERS, UNPACKED, open_bundle
from spineseg.train import BEST

MANIFEST = {"format": FORMAT, "members": [{"folder": "members/1-a", "validation_dsc": 0.9}], "crop_model": None,
            "threshold": 0.5, "precision": "auto", "members_hflip": False}


def tiny_model_folder(folder: Path, **changes) -> Path:
    description = ModelDescription("a", "MobileNetV2", "unet", "binary", (64, 32), **{"grid": (128, 64), **changes})
    folder.mkdir(parents=True)
    torch.save(description.build().state_dict(), folder / BEST)
    description.save(folder)
    return folder


def bundle(path: Path, manifest: dict, extra: dict[str, bytes] | None = None, model: Path | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bundle.json", json.dumps(manifest))
        for folder in {m["folder"] for m in manifest["members"]}:
            archive.writestr(f"{folder}/model.json", (model / "model.json").read_bytes() if model else b"{}")
            archive.writestr(f"{folder}/best.pt", (model / BEST).read_bytes() if model else b"weights")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def refused(path: Path, match: str) -> None:
    with pytest.raises(ConfigError, match=match), open_bundle(path):
        pass


def test_a_zip_bomb_entry_bundle_json_does_not_name_is_never_unpacked(tmp_path):
    """Row 1 (a 1.1 GB entry of zeros in a 25 MB bundle), at 128 MB: not named by bundle.json, so not unpacked at all,
    whatever its size."""
    bomb = bundle(tmp_path / "bomb.zip", MANIFEST)
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as archive, archive.open("padding.bin", "w", force_zip64=True) as entry:
        chunk = bytes(2**24)
        for _ in range(8):
            entry.write(chunk)
    assert bomb.stat().st_size < 2**20
    with open_bundle(bomb) as found:
        unpacked = found.root
        assert not (unpacked / "padding.bin").exists() and sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file()) < 2**20
    assert not unpacked.exists()  # removed on leaving


def test_a_named_entry_larger_than_a_bundle_may_hold_is_refused_before_it_is_unpacked(tmp_path, monkeypatch):
    import spineseg.study.inference.bundle as module

    monkeypatch.setattr(module, "MAX_ENTRY_BYTES", 1000)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as archive:
        archive.writestr("bundle.json", json.dumps(MANIFEST))
        archive.writestr("members/1-a/model.json", b"{}")
        archive.writestr("members/1-a/best.pt", bytes(5000))
    refused(big, r"members/1-a/best.pt would unpack to 0 MiB, more than the 0 MiB a bundle's file may hold")
    assert MAX_ENTRY_BYTES == 2**30


def test_an_unpacked_bundle_left_by_a_killed_process_is_removed_by_the_next(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess_pid()
    left = tmp_path / f"{UNPACKED}{dead}-abc"
    left.mkdir()
    (left / "best.pt").write_bytes(b"x")
    alive = tmp_path / f"{UNPACKED}{os.getpid()}-mine"
    alive.mkdir()
    with open_bundle(bundle(tmp_path / "b.zip", MANIFEST)):
        pass
    assert not left.exists() and alive.exists()


def subprocess_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(child.stdout)


@pytest.mark.parametrize(("manifest", "message"), [
    ({**MANIFEST, "members": MANIFEST["members"] * 50}, r"bundle.json lists the member folder 'members/1-a' 50 times$"),
    ({**MANIFEST, "members": [{"folder": f"m/{k}", "validation_dsc": 0.5} for k in range(65)]},
     r"bundle.json field members = .*: List should have at most 64 items"),
    ({**MANIFEST, "members": []}, r"the bundle lists no members$"),
    ({**MANIFEST, "threshold": True}, r"bundle.json field threshold = True: Input should be a valid number"),
    ({**MANIFEST, "threshold": 7}, r"bundle.json field threshold = 7: Input should be less than or equal to 1"),
    ({**MANIFEST, "threshold": float("nan")}, r"bundle.json field threshold = nan: Input should be a finite number"),
    ({**MANIFEST, "precision": "fp8"}, r"bundle.json field precision = 'fp8'"),
    ({**MANIFEST, "members": [{"folder": "/etc", "validation_dsc": 0.5}]}, r"^--model \S+: '/etc' is not a folder inside the bundle$"),
])
def test_each_odd_bundle_field_is_one_line_naming_it(tmp_path, manifest, message):
    """Rows 2, 9, 19: repeated or too many members, no members, non-numeric or out-of-range T, an absolute folder."""
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bundle.json", json.dumps(manifest))
        for member in manifest["members"][:1]:
            archive.writestr(f"{member['folder'].strip('/')}/model.json", b"{}")
            archive.writestr(f"{member['folder'].strip('/')}/best.pt", b"w")
    with pytest.raises(ConfigError) as info, open_bundle(path):
        pass
    assert len(str(info.value).splitlines()) == 1 and re.search(message, str(info.value))
    assert MAX_MEMBERS == 64


def test_an_entry_stored_twice_is_refused(tmp_path):
    """Row 7: the last copy of a twice-stored bundle.json would win without a word."""
    path = bundle(tmp_path / "twice.zip", MANIFEST)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as archive:
        archive.writestr("bundle.json", json.dumps({**MANIFEST, "threshold": 0.99}))
    refused(path, r"the zip stores 'bundle.json' twice")


def test_a_member_folder_that_is_a_symlink_loop_is_one_line(tmp_path):
    """Row 13, in an unpacked bundle folder."""
    root = tmp_path / "unpacked"
    root.mkdir()
    (root / "bundle.json").write_text(json.dumps(MANIFEST))
    (root / "members").mkdir()
    os.symlink(root / "members" / "1-a", root / "members" / "1-a")
    refused(root, r"the model folder 'members/1-a' cannot be resolved")


@pytest.mark.parametrize(("changes", "message"), [
    ({"grid": [100000, 100000]}, r"grid.0 = 100000: Input should be less than or equal to 8192"),
    ({"input_size": [65536, 65536]}, r"input_size.0 = 65536: Input should be less than or equal to 8192"),
    ({"input_size": "64"}, r"input_size = '64': Input should be a valid (tuple|array)"),
    ({"attention": "no"}, r"attention = 'no': Input should be a valid boolean"),
    ({"encoder": "ResNet35"}, r"encoder = 'ResNet35': .*unknown encoder"),
])
def test_model_json_fields_are_checked_for_type_and_bounds(tmp_path, changes, message):
    """Rows 3 and 20: a size past the profiles' cap never reaches memory; a string is no boolean and no size."""
    folder = tiny_model_folder(tmp_path / "m")
    values = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**values, **changes}))
    with pytest.raises(ModelError, match=message):
        ModelDescription.load(folder, "the bundle x.zip: members/1-a")
    with pytest.raises(ModelError, match="^the bundle x.zip: members/1-a: "):
        ModelDescription.load(folder, "the bundle x.zip: members/1-a")


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"not a readable weights file"),
    ([1, 2, 3], r"not a state dict \(names → tensors\) but list"),
    (torch.zeros(3), r"not a state dict \(names → tensors\) but Tensor"),
    (None, r"not a state dict \(names → tensors\) but NoneType"),
    ({"w": torch.tensor([1.0, float("nan")])}, r"w holds NaN or infinite weights"),
])
def test_weights_that_are_no_state_dict_or_not_finite_are_one_line(tmp_path, content, message):
    """Rows 11 and 12: a 0-byte file, a list, a bare tensor, None, NaN weights."""
    path = tmp_path / BEST
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ModelError, match=message):
        load_state(path)
    (tmp_path / "text.pt").write_text("not weights at all")
    with pytest.raises(ModelError, match="text.pt: not a readable weights file"):
        load_state(tmp_path / "text.pt")


def test_weights_of_another_network_name_the_first_mismatching_key(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    state = torch.load(folder / BEST, weights_only=True)
    first = next(iter(state))
    del state[first]
    torch.save(state, folder / BEST)
    with pytest.raises(ModelError, match=rf"the bundle x.zip: m/best.pt does not fit this network: {first} is missing \(1 missing"):
        load_model(folder, torch.device("cpu"), "the bundle x.zip: m")
    with pytest.raises(ModelError, match="does not fit"):
        load_weights(ModelDescription.load(folder).build(), folder / BEST, torch.device("cpu"))


def test_a_bundle_with_real_model_folders_opens_and_names_its_entries(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    path = bundle(tmp_path / "ok.zip", MANIFEST, model=model)
    with open_bundle(path) as found:
        folder, _ = found.members[0]
        assert found.shown(folder) == f"the bundle {path}: members/1-a"
        description, _ = load_model(folder, torch.device("cpu"), found.shown(folder))
        assert description.input_size == (64, 32)


def test_predict_refuses_an_out_that_is_its_input_and_a_folder_without_radiographs(tmp_path):
    """Row 5: `--input d --out d` wrote an empty predictions.csv into the input and exited 0."""
    from PIL import Image

    from spineseg.study.inference.apply import check_folders

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="is, or holds, the --input"):
        check_folders(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="is, or holds, the --input"):
        check_folders(tmp_path / "sub", tmp_path)
    check_folders(tmp_path, tmp_path / "out")  # outputs inside the input: fine, never read back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_multi_frame_or_odd_sample_dicom_is_one_line(tmp_path):
    """Row 10: a 4-frame DICOM of 3 columns was taken for RGB and became a 4 × 50 image."""
    from pydicom import dcmread

    from conftest import write_dicom
    from spineseg.data.radiographs import load_radiograph

    path = tmp_path / "frames.dcm"
    write_dicom(path, np.zeros((50, 3), np.uint16))
    dataset = dcmread(path)
    dataset.NumberOfFrames = 4
    dataset.PixelData = np.zeros((4, 50, 3), np.uint16).tobytes()
    dataset.save_as(path)
    with pytest.raises(DatasetError, match="frames.dcm: a DICOM of 4 frames"):
        load_radiograph(path)
    write_dicom(path, np.zeros((50, 3), np.uint16))
    assert load_radiograph(path).pixels.shape == (50, 3)  # one frame, 3 columns: a narrow grayscale image


@pytest.mark.parametrize("code", ["EROFS", "ENOSPC"])
def test_a_read_only_or_full_disk_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, code):
    """Row 16: a 37-line traceback before; every write is atomic, so the line can say what was written is whole."""
    import errno

    import spineseg.data.synthetic as synthetic
    from spineseg.cli import main

    def fails(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(tmp_path / "runs" / "x.csv"))

    monkeypatch.setattr(synthetic, "synthesize", fails)
    assert main(["data", "synth", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err == (f"spineseg: error: cannot write {tmp_path / 'runs' / 'x.csv'}: {os.strerror(getattr(errno, code))}; "
                   f"files written before are complete\n")
