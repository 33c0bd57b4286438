"""A study's datasets as an nnU-Net v2 raw dataset, so that nnU-Net, the method a user would pick instead, can be
trained on the same split and scored on the same test images.

    <out>/Dataset<id>_<name>/
        dataset.json          channel "X-ray" (z-score normalised), labels background 0 and Th8-Th11 1, PNG
        imagesTr/<id>_0000.png, labelsTr/<id>.png   dataset 1's train and validation images, masks as 0/1
        splits_final.json     one fold: dataset 1's own train / validation split (copy it into
                              nnUNet_preprocessed/Dataset<id>_<name>/ before training, or nnU-Net draws five folds)
        imagesTs/<d>_<id>_0000.png, labelsTs/<d>_<id>.png   the test images of dataset 1 (d1_) and dataset 2 (d2_)

Images are the dataset's own PNGs, copied; masks are rewritten 0/255 → 0/1, as nnU-Net reads a label's values.
The folder is written beside its place and renamed into it when complete: an existing one is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from spineseg.data.dataset import DatasetError, fresh_output, read_manifest

LABELS = {"background": 0, "Th8-Th11": 1}
CHANNEL = "X-ray"  # any name but "CT" gets nnU-Net's z-score normalisation


def _mask(source: Path, target: Path) -> None:
    mask = np.asarray(Image.open(source)) > 0
    Image.fromarray(mask.astype(np.uint8)).save(target)


def export_nnunet(d1: str | Path, out: str | Path, d2: str | Path | None = None, dataset_id: int = 501,
                  name: str = "SpineTh8Th11") -> Path:
    """Write dataset 1 (and dataset 2's test images) as ``<out>/Dataset<id>_<name>``; returns that folder."""
    if not 1 <= dataset_id <= 999:
        raise DatasetError(f"nnU-Net dataset ids lie in 1…999 (custom ones from 500 on), got {dataset_id}")
    target = Path(out) / f"Dataset{dataset_id:03d}_{name}"
    if target.exists():
        raise DatasetError(f"{target} exists: nnU-Net finds a dataset by its id, so choose another --dataset-id or folder")
    folders = {"d1": Path(d1), **({"d2": Path(d2)} if d2 else {})}
    manifests = {dataset: read_manifest(folder) for dataset, folder in folders.items()}
    with fresh_output(target) as staging:  # whole or not at all, with the umask's permissions
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / sub).mkdir()
        folds = {"train": [], "val": []}
        for dataset, manifest in manifests.items():
            for row in manifest.itertuples():
                if dataset == "d1" and row.split in folds:
                    case, images, labels = row.id, "imagesTr", "labelsTr"
                    folds[row.split].append(case)
                elif row.split == "test":
                    case, images, labels = f"{dataset}_{row.id}", "imagesTs", "labelsTs"
                else:
                    continue
                shutil.copyfile(folders[dataset] / row.image, staging / images / f"{case}_0000.png")
                _mask(folders[dataset] / row.mask, staging / labels / f"{case}.png")
        if not folds["train"]:
            raise DatasetError(f"{d1}: no training images to export")
        description = {"channel_names": {"0": CHANNEL}, "labels": LABELS,
                       "numTraining": len(folds["train"]) + len(folds["val"]), "file_ending": ".png",
                       "name": name, "description": "Th8–Th11 on frontal spine radiographs, exported by spineseg "
                                                    "(spineseg data nnunet): dataset 1's split as fold 0"}
        (staging / "dataset.json").write_text(json.dumps(description, indent=2))
        (staging / "splits_final.json").write_text(json.dumps([folds], indent=2))
    return target
