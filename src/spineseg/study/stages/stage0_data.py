"""Stage 0: make (synthetic, AASCE) or locate (folder) the two datasets once, and check every file.

Every split is read before any training: a missing, corrupt or mismatched file, an empty split, a
patient in two splits, or an external dataset with rows not marked ``test`` stops the study here, not
hours into stage 2. Radiographs that dataset 2 shares with dataset 1 are listed in ``data/twins_d1_d2.json``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd

from spineseg import atomic
from spineseg.data import read_manifest
from spineseg.data.dataset import check_dataset, twins_between
from spineseg.data.twins import CANDIDATE_CORRELATION, FALSE_JOIN_RATE, TWIN_THRESHOLD
from spineseg.study.core.session import Study, StudyData, check_before_any_stage


def checked(study: Study, d1: Path, d2: Path | None) -> StudyData:
    """Read every file of both datasets (or reuse the hashes of unchanged ones) and fingerprint them."""
    digest = hashlib.sha1()
    for name, folder in (("d1", d1), ("d2", d2)):
        if folder is not None:
            check = check_dataset(folder, external=name == "d2", cache=study.layout.data_check(name))
            digest.update(check.fingerprint.encode())
    data = StudyData(d1, d2, digest.hexdigest()[:12])
    if d2 is not None:
        cross_twins(study, data)
    return data


def cross_twins(study: Study, data: StudyData) -> list[dict]:
    """Images of dataset 2 that are one radiograph with an image of dataset 1: a model has trained on them.

    Found once per data fingerprint and kept in the study's ``data/twins_d1_d2.json``.
    """
    path = study.layout.cross_twins
    known = atomic.read_json_cache(path)
    rule = (CANDIDATE_CORRELATION, TWIN_THRESHOLD, FALSE_JOIN_RATE)
    if known.get("fingerprint") != data.fingerprint or known.get("rule") != list(rule):
        search = twins_between(data.d1, data.d2)
        twins = [{"d1": t.first, "d2": t.second, "r": round(t.score, 4),
                  "distance": None if math.isnan(t.distance) else round(t.distance, 4)} for t in search.twins]
        known = {"fingerprint": data.fingerprint, "rule": list(rule), "how": search.describe(), "twins": twins}
        atomic.write_json(path, known)
    return known["twins"]


def prepare_data(study: Study) -> StudyData:
    """The study's datasets; generated or converted only when the data settings change. Checks first what
    every stage will need (`check_before_any_stage`)."""
    check_before_any_stage(study)
    cfg = study.cfg.data
    out = study.layout.data_dir
    if cfg.source == "folder":
        d1 = (study.project / cfg.d1).resolve()
        d2 = (study.project / cfg.d2).resolve() if cfg.d2 else None
        return checked(study, d1, d2)
    stamp = study.layout.data_source
    wanted = cfg.model_dump(mode="json", include={"source", "seed", "size", "d1_count", "d2_count", "aasce_src", "later_batch"})
    if not cfg.later_batch:
        wanted.pop("later_batch")  # a store converted before the later batch existed stays valid
    if cfg.source == "aasce":  # the twin rule decides the patient groups, so the split: another rule converts again
        wanted["twins"] = [CANDIDATE_CORRELATION, TWIN_THRESHOLD, FALSE_JOIN_RATE]
    if atomic.read_json_cache(stamp) != wanted:
        # the stage's own records of the data it replaces go first: the converter replaces only what it wrote
        for record in (stamp, study.layout.data_check("d1"), study.layout.data_check("d2"), study.layout.cross_twins):
            record.unlink(missing_ok=True)
        if cfg.source == "synthetic":
            from spineseg.data.synthetic import synthesize

            synthesize(out, seed=cfg.seed, size=cfg.size[0], counts={"d1": cfg.d1_count, "d2": cfg.d2_count}, force=True)
        else:
            from spineseg.data.aasce import LATER, convert

            src = (study.project / cfg.aasce_src).resolve()
            if cfg.later_batch:  # dataset 2 is the later batch; the distribution's test split stays unused
                convert(src, out, ("training",), size=cfg.size, seed=cfg.seed, names={"training": "d1", LATER: "d2"},
                        force=True, later_batch=cfg.later_batch)
            else:
                convert(src, out, size=cfg.size, seed=cfg.seed, names={"training": "d1", "test": "d2"}, force=True)
        atomic.write_json(stamp, wanted)
    d2 = out / "d2"
    return checked(study, out / "d1", d2 if (d2 / "manifest.csv").is_file() else None)


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
