"""Stage 0: make (synthetic, AASCE) or locate (folder) the two datasets, once."""

from __future__ import annotations

import json

import pandas as pd

from spineseg import atomic
from spineseg.data import read_manifest
from spineseg.study.session import Study
from spineseg.study.store import StudyData


def prepare_data(study: Study) -> StudyData:
    """The study's datasets; generated or converted only when the data settings change."""
    cfg = study.cfg.data
    out = study.layout.data_dir
    if cfg.source == "folder":
        d1 = (study.project / cfg.d1).resolve()
        d2 = (study.project / cfg.d2).resolve() if cfg.d2 else None
        for folder in (d1, d2):
            if folder is not None:
                read_manifest(folder)
        return StudyData(d1, d2)
    stamp = study.layout.data_source
    wanted = cfg.model_dump(include={"source", "seed", "size", "d1_count", "d2_count", "aasce_src"})
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        if cfg.source == "synthetic":
            from spineseg.data.synthetic import synthesize

            synthesize(out, seed=cfg.seed, size=cfg.size, counts={"d1": cfg.d1_count, "d2": cfg.d2_count})
        else:
            from spineseg.data.aasce import convert

            src = (study.project / cfg.aasce_src).resolve()
            convert(src, out, size=cfg.size, seed=cfg.seed, names={"training": "d1", "test": "d2"})
        atomic.write_json(stamp, wanted)
    d2 = out / "d2"
    return StudyData(out / "d1", d2 if (d2 / "manifest.csv").is_file() else None)


def data_summary(data: StudyData) -> pd.DataFrame:
    rows = []
    for name, folder in (("d1", data.d1), ("d2", data.d2)):
        if folder is None:
            continue
        manifest = read_manifest(folder)
        for split, count in manifest["split"].value_counts().items():
            rows.append({"dataset": name, "split": split, "images": int(count),
                         "patients": int(manifest.loc[manifest["split"] == split, "patient"].nunique())})
    return pd.DataFrame(rows).sort_values(["dataset", "split"], ignore_index=True)
