"""Pre-trained vs from scratch (05): the article's premise, measured.

Each encoder of ``stage2.scratch_twins`` is trained twice in stage 2 with one budget — every setting,
seed and epoch limit alike — once from its ImageNet weights and once from random weights. The table
puts the two side by side: validation DSC (what selection sees), dataset-1 (and -2) test DSC,
identification of Th8–Th11 where the data have level labels, epochs to the best validation DSC and wall
time; a Wilcoxon signed-rank test by patient compares the test DSC of the two.
"""

from __future__ import annotations

import pandas as pd

from spineseg.data import load_split
from spineseg.identification import identification_table
from spineseg.metrics import ARTICLE_THRESHOLD
from spineseg.stats import ALPHA, PATIENT_KEYS, format_wilcoxon, holm_across, paired_wilcoxon
from spineseg.study.core.artifacts import SCRATCH_TWINS
from spineseg.study.core.session import Study, StudyData
from spineseg.study.report.tables import write_table
from spineseg.study.runs.store import RunSpec, load_metrics, load_probs
from spineseg.study.runs.training import load_stage_runs
from spineseg.study.stages.stage2_selection import scratch_twin_specs, stage2_specs

WEIGHTS = {"imagenet": "ImageNet", "none": "from scratch"}
CAPTIONS = {
    "pretraining": "Pre-trained vs from scratch: the same encoder, settings and epoch budget of stage 2, started "
                   "from ImageNet weights or from random weights (means over repeats; DSC and identified in %)",
    "pretraining_wilcoxon": "Pre-trained vs from scratch: Wilcoxon signed-rank tests of test DSC by patient, Holm over "
                            "every twin and test set of this table (exploratory)",
}


def arm(spec: RunSpec) -> str:
    """How the table names one side: the candidate and what it started from."""
    return f"{spec.candidate} · {WEIGHTS[spec.pretrained]}"


def compared_runs(study: Study, data: StudyData) -> list[RunSpec]:
    """The runs compared: each twin's ImageNet-initialised stage-2 runs, then its from-scratch runs."""
    twins = set(study.cfg.stage2.scratch_twins)
    return [spec for spec in stage2_specs(study, data) if spec.encoder in twins] + scratch_twin_specs(study, data)


def _identified(study: Study, data: StudyData, specs: list[RunSpec]) -> dict[str, float]:
    """Share of dataset-1 test images whose mask covers exactly Th8–Th11, per arm (data with level labels)."""
    shares: dict[str, list[float]] = {}
    for spec in specs:
        cached = load_probs(spec.files(study.layout.store), spec.candidate, "d1", "test")
        truth = load_split(data.d1, "test", cached.probs.shape[1:], labels=True)
        if truth.labels is None:
            return {}
        found = identification_table(cached.probs > ARTICLE_THRESHOLD, truth.labels)["identified_strict"]
        shares.setdefault(arm(spec), []).append(100 * float(found.mean()))
    return {name: sum(values) / len(values) for name, values in shares.items()}


def comparison(study: Study, data: StudyData) -> dict[str, pd.DataFrame]:
    """The two tables, or none when the profile trains no twins."""
    if not study.cfg.stage2.scratch_twins:
        return {}
    specs = compared_runs(study, data)
    runs = pd.concat([load_stage_runs(study, "stage2"), load_stage_runs(study, SCRATCH_TWINS)], ignore_index=True)
    runs = runs.set_index("folder").loc[[spec.folder_name() for spec in specs]]
    runs["arm"] = [arm(spec) for spec in specs]
    metrics = load_metrics(study.layout.store, specs, arm)
    training = runs.groupby("arm", sort=False).agg(runs=("seed", "count"), val_dsc=("best_val_dsc", "mean"),
                                                    epochs_to_best=("best_epoch", "mean"), epochs_run=("epochs_run", "mean"),
                                                    seconds=("seconds", "mean"))
    training["val_dsc"] *= 100
    for dataset, part in metrics.groupby("dataset"):
        training[f"test_dsc_{dataset}"] = 100 * part.groupby("group")["dsc"].mean()
    identified = _identified(study, data, specs)
    if identified:
        training["identified_d1"] = pd.Series(identified)
    tests = [paired_wilcoxon(metrics[metrics["dataset"] == dataset], arm(a), arm(b), "dsc", pair_on=PATIENT_KEYS,
                             family="pre-trained vs from scratch")
             for dataset in sorted(metrics["dataset"].unique())
             for a in specs if a.pretrained == "imagenet" and a.seed == 0
             for b in specs if b.pretrained == "none" and (b.encoder, b.target, b.seed) == (a.encoder, a.target, a.seed)]
    tests = pd.DataFrame(tests)
    if not tests.empty:  # one family: every twin on every test set, Holm over all of them
        tests["p_holm"] = holm_across(tests["p"])
        tests["significant"] = tests["p_holm"] < ALPHA
    return {"pretraining": training.round(2).rename_axis(None), "pretraining_wilcoxon": format_wilcoxon(tests)}


def write_comparison(study: Study, data: StudyData) -> dict[str, pd.DataFrame]:
    """The tables, written beside the others (CSV, Markdown, LaTeX) under their captions."""
    tables = comparison(study, data)
    for name, table in tables.items():
        write_table(study, table, name, CAPTIONS[name])
    return tables
