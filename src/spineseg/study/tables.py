"""Tables 1–9 in the article's layout, Tables 10–13 beyond it, confidence intervals and Wilcoxon families.

Every table value is a percentage with two decimals: the mean over images of a per-image metric
(for repeated trainings, the mean over trainings of that per-training mean).
"""

from __future__ import annotations

import pandas as pd

from spineseg import atomic
from spineseg.encoders import PAPER_ENCODERS
from spineseg.errors import StageOrderError
from spineseg.metrics import f1_as_scikit_learn_1_3
from spineseg.names import (
    AUGMENTATION_GROUPS,
    BOUNDARY_METRICS,
    EXTRA_RULES,
    METRICS,
    RULES,
    STACKING,
    TUNED,
    metric_name,
    rule_name,
)
from spineseg.stats import PATIENT_KEYS, all_pairs, format_wilcoxon, mean_ci_table, one_vs_rest, wilcoxon_family
from spineseg.study.article import article_tables, caption, published
from spineseg.study.artifacts import read_table
from spineseg.study.session import Study
from spineseg.study.training import load_stage_metrics

METRIC_COLUMNS = [metric_name(m) for m in METRICS]
STAT_ROWS = {"min": "Min", "max": "Max", "mean": "Mean"}
# Which tables each stage fills, and from which dataset: the article's numbering.
STAGE_TABLES = {
    "stage1": {"table1": "d1"},
    "stage2": {"table2": "d1", "table3": "d2"},
    "stage3": {"table4": "d1", "table5": "d2"},
    "stage4": {"table8": "d1", "table9": "d2"},
}
SUMMARY_TABLES = {"table4": "table6", "table5": "table7"}  # min / max / mean over the models
BOUNDARY_TABLES = {"table10": "d1", "table11": "d2"}
ALL_RULES = [*RULES, *EXTRA_RULES, TUNED, STACKING]


TABLE_CAPTIONS = {
    **{name: caption(name) for name in article_tables()["tables"]},
    "table10": "Table 10. Every ensemble rule with boundary metrics (HD95, ASSD in pixels), dataset 1 test",
    "table11": "Table 11. Every ensemble rule with boundary metrics (HD95, ASSD in pixels), dataset 2",
    "table12": "Table 12. Leave-one-model-out ablation of soft voting (ΔDSC > 0: better without the model)",
    "table13": "Table 13. Bootstrap 95 % confidence intervals (over images) of the means in Tables 4–9",
    "wilcoxon_readable": "Wilcoxon signed-rank tests, Holm-adjusted per family, dataset and metric",
}


# Said under a table wherever it is shown.
TABLE_NOTES = {
    "table2": "This study ranks and selects the encoders by validation DSC only. The article's ten are exactly the "
              "ten best of this table (test data) at or above 91.5 %: it may have selected on test.",
}


def metric_table(frame: pd.DataFrame, dataset: str, order: list[str], metrics=METRICS) -> pd.DataFrame:
    """Rows in `order` (groups present), columns the paper's metric names, percentages."""
    part = frame[frame["dataset"] == dataset]
    per_run = part.groupby(["group", "run"])[list(metrics)].mean()
    table = per_run.groupby("group").mean() * 100
    table = table.reindex([g for g in order if g in table.index])
    table.columns = [metric_name(m) for m in metrics]
    table.index.name = None
    return table.round(2)


def min_max_mean(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({label: table.agg(stat) for stat, label in STAT_ROWS.items()}).T.round(2)


def _try(stage: str, study: Study) -> pd.DataFrame | None:
    try:
        return load_stage_metrics(study, stage)
    except StageOrderError:
        return None


def _rows(stage: str) -> list[str]:
    """The row order of a stage's tables, as group keys: the article's (its Tables 1, 2 and 8)."""
    if stage == "stage1":
        return list(published("table1").index)
    if stage == "stage4":
        by_name = {rule_name(key): key for key in RULES}
        return [by_name[label] for label in published("table8").index]
    return list(PAPER_ENCODERS)


def stage_tables(study: Study, stage: str) -> dict[str, pd.DataFrame]:
    """The article's tables that `stage` fills, for the datasets present, once the stage has run."""
    frame = _try(stage, study)
    tables: dict[str, pd.DataFrame] = {}
    if frame is None:
        return tables
    metrics = METRICS
    if study.cfg.analysis.paper_style_f1:
        frame = frame.assign(f1_sklearn13=f1_as_scikit_learn_1_3(frame))
        metrics = (*METRICS, "f1_sklearn13")
    for name, dataset in STAGE_TABLES[stage].items():
        if not (frame["dataset"] == dataset).any():
            continue
        table = metric_table(frame, dataset, _rows(stage), metrics)
        if stage == "stage4":
            table.index = [rule_name(g) for g in table.index]
        tables[name] = table
        if name in SUMMARY_TABLES:
            tables[SUMMARY_TABLES[name]] = min_max_mean(table)
    return tables


def _extra_tables(study: Study) -> dict[str, pd.DataFrame]:
    """Tables 10–12: every rule with boundary metrics, and the leave-one-out ablation."""
    tables: dict[str, pd.DataFrame] = {}
    stage4 = _try("stage4", study)
    if stage4 is None:
        return tables
    for name, dataset in BOUNDARY_TABLES.items():
        if (stage4["dataset"] == dataset).any():
            table = metric_table(stage4, dataset, ALL_RULES, metrics=(*METRICS, *BOUNDARY_METRICS))
            boundary = [metric_name(m) for m in BOUNDARY_METRICS]
            table[boundary] /= 100  # distances are in pixels, not fractions
            # HD95 and ASSD are undefined where exactly one mask is empty: their means skip those images
            undefined = stage4[stage4["dataset"] == dataset].groupby("group")["hd95"].apply(lambda x: int(x.isna().sum()))
            table.insert(table.columns.get_loc(boundary[-1]) + 1, "images without HD95/ASSD", undefined.reindex(table.index))
            table.index = [rule_name(g) for g in table.index]
            tables[name] = table.round(2)
    if study.layout.leave_one_out.is_file():
        loo = read_table(study.layout.leave_one_out)
        loo[["mean_dsc", "delta_dsc"]] *= 100
        tables["table12"] = loo.rename(columns={"dataset": "Dataset", "removed": "Model removed",
                                                "mean_dsc": "DSC", "delta_dsc": "ΔDSC"}).round(2)
    return tables


def build_tables(study: Study) -> dict[str, pd.DataFrame]:
    """Tables 1–9 (those whose stage has run and whose dataset exists) and Tables 10–12, in number order."""
    tables: dict[str, pd.DataFrame] = {}
    for stage in STAGE_TABLES:
        tables.update(stage_tables(study, stage))
    tables.update(_extra_tables(study))
    return dict(sorted(tables.items(), key=lambda item: int(item[0].removeprefix("table"))))


def confidence_intervals(study: Study, n_boot: int) -> pd.DataFrame:
    """Bootstrap 95 % CIs for every mean of Tables 4–9, as percentages."""
    parts = []
    for stage, groups in (("stage3", None), ("stage4", list(RULES))):
        frame = _try(stage, study)
        if frame is None:
            continue
        if groups is not None:
            frame = frame[frame["group"].isin(groups)]
        for name, dataset in STAGE_TABLES[stage].items():
            part = frame[frame["dataset"] == dataset]
            if part.empty:
                continue
            ci = mean_ci_table(part, by=["group"], metrics=list(METRICS), n_boot=n_boot, cluster_on=PATIENT_KEYS)
            ci.insert(0, "table", name)
            parts.append(ci)
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    out["group"] = out["group"].map(rule_name)
    out["metric"] = out["metric"].map(metric_name)
    out[["mean", "low", "high"]] = (out[["mean", "low", "high"]] * 100).round(2)
    return out.rename(columns={"n": "images", "n_clusters": "patients"})


def wilcoxon_tests(study: Study) -> pd.DataFrame:
    """The study's families of paired tests on per-image DSC and IoU, Holm-adjusted within each."""
    families = []
    stage1, stage3, stage4 = (_try(s, study) for s in ("stage1", "stage3", "stage4"))
    if stage4 is not None:
        named = stage4.assign(group=stage4["group"].map(rule_name))
        by_patient = {"pair_on": PATIENT_KEYS}  # per-patient means: images of one patient are not independent
        families.append(wilcoxon_family(named, all_pairs([rule_name(m) for m in RULES]), family="ensemble rules",
                                        **by_patient))
        extras = [rule_name(m) for m in (*EXTRA_RULES, TUNED, STACKING) if rule_name(m) in set(named["group"])]
        soft = rule_name("soft")
        if extras:
            families.append(wilcoxon_family(named, one_vs_rest(soft, extras), family="new rules vs soft voting", **by_patient))
        if stage3 is not None:
            both = pd.concat([named[named["group"] == soft], stage3], ignore_index=True)
            families.append(wilcoxon_family(both, one_vs_rest(soft, sorted(set(stage3["group"]))),
                                            family="soft voting vs single models", **by_patient))
    if stage1 is not None:
        per_run = (stage1[stage1["dataset"] == "d1"].groupby(["group", "run", "dataset"])[["dsc", "iou"]].mean()
                   .reset_index().assign(id=lambda f: f["run"].astype(str)))
        with_aug, without = AUGMENTATION_GROUPS[True], AUGMENTATION_GROUPS[False]
        families.append(wilcoxon_family(per_run, [(with_aug, without)], family="augmentation (paired by seed)"))
    return pd.concat(families, ignore_index=True) if families else pd.DataFrame()


def write_table(study: Study, table: pd.DataFrame, name: str) -> None:
    """CSV, Markdown and LaTeX copies of one table, captioned."""
    caption = TABLE_CAPTIONS.get(name, "")
    index = not isinstance(table.index, pd.RangeIndex)
    layout = study.layout
    atomic.write_text(layout.table(name, "csv"), table.to_csv(index=index))
    atomic.write_text(layout.table(name, "md"), (f"**{caption}**\n\n" if caption else "")
                      + table.to_markdown(index=index, floatfmt=".2f") + "\n")
    atomic.write_text(layout.table(name, "tex"), table.to_latex(index=index, float_format="%.2f",
                                                                caption=caption or None, label=f"tab:{name}"))


def write_all(study: Study) -> dict[str, pd.DataFrame]:
    """Build and write every table, the CIs and the Wilcoxon tests; return them for display."""
    tables = build_tables(study)
    ci = confidence_intervals(study, study.cfg.analysis.n_boot)
    if not ci.empty:
        tables["table13"] = ci
    for name, table in tables.items():
        write_table(study, table, name)
    tests = wilcoxon_tests(study)
    if not tests.empty:
        atomic.write_csv(study.layout.table("wilcoxon", "csv"), tests)
        tables["wilcoxon_readable"] = format_wilcoxon(tests)
        write_table(study, tables["wilcoxon_readable"], "wilcoxon_readable")
    return tables
