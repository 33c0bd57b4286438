"""Reading new radiographs: DICOMs of another modality are refused unless asked for."""

import numpy as np
import pytest

from conftest import write_dicom
from spineseg.data.radiographs import read_radiograph
from spineseg.errors import DatasetError


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_dicom_that_is_not_a_projection_radiograph_is_refused_unless_asked_for(tmp_path, modality):
    pixels = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32)
    write_dicom(tmp_path / "slice.dcm", pixels, modality=modality)
    with pytest.raises(DatasetError, match=f"slice.dcm: DICOM modality {modality}, not a projection radiograph.*--any-modality"):
        read_radiograph(tmp_path / "slice.dcm")
    assert read_radiograph(tmp_path / "slice.dcm", any_modality=True).shape == (64, 32)


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_projection_radiographs_read(tmp_path, modality):
    write_dicom(tmp_path / "xray.dcm", np.arange(64 * 32, dtype=np.uint16).reshape(64, 32), modality=modality)
    image = read_radiograph(tmp_path / "xray.dcm")
    assert image.min() == 0.0 and image.max() == 1.0
