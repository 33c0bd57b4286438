"""Tables 1–9 in the paper's layout, the extra tables, confidence intervals and Wilcoxon families.

Every table value is a percentage with two decimals: the mean over images of a per-image metric
(for repeated trainings, the mean over trainings of that per-training mean).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pandas as pd

from spineseg import atomic
from spineseg.config import PAPER_ENCODERS
from spineseg.ensemble import EXTRA_METHODS, METHODS
from spineseg.metrics import METRICS, PAPER_LABELS
from spineseg.stage4 import GROUP_NAMES, STACKING, TUNED
from spineseg.stats import all_pairs, format_wilcoxon, mean_ci_table, one_vs_rest, wilcoxon_family
from spineseg.study import AUGMENTATION_GROUPS, StageOrderError, Study, load_stage_metrics

METRIC_COLUMNS = [PAPER_LABELS[m] for m in METRICS]
STAT_ROWS = {"min": "Min", "max": "Max", "mean": "Mean"}
DATASETS = {"d1": "Dataset 1", "d2": "Dataset 2"}


def paper_tables() -> dict:
    return json.loads(resources.files("spineseg").joinpath("resources/paper_tables.json").read_text())


def metric_table(frame: pd.DataFrame, dataset: str, order: list[str], metrics=METRICS) -> pd.DataFrame:
    """Rows in `order` (groups present), columns the paper's metric names, percentages."""
    part = frame[frame["dataset"] == dataset]
    per_run = part.groupby(["group", "run"])[list(metrics)].mean()
    table = per_run.groupby("group").mean() * 100
    table = table.reindex([g for g in order if g in table.index])
    table.columns = [PAPER_LABELS.get(m, m.upper()) for m in metrics]
    table.index.name = None
    return table.round(2)


def min_max_mean(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({label: table.agg(stat) for stat, label in STAT_ROWS.items()}).T.round(2)


def _try(stage: str, study: Study) -> pd.DataFrame | None:
    try:
        return load_stage_metrics(study, stage)
    except StageOrderError:
        return None


def build_tables(study: Study) -> dict[str, pd.DataFrame]:
    """Tables 1–9 (those whose stage has run and whose dataset exists) and Tables 10–12."""
    tables: dict[str, pd.DataFrame] = {}
    stage1, stage2, stage3, stage4 = (_try(s, study) for s in ("stage1", "stage2", "stage3", "stage4"))
    if stage1 is not None:
        tables["table1"] = metric_table(stage1, "d1", list(AUGMENTATION_GROUPS.values()))
    for number, dataset in ((2, "d1"), (3, "d2")):
        if stage2 is not None and (stage2["dataset"] == dataset).any():
            tables[f"table{number}"] = metric_table(stage2, dataset, PAPER_ENCODERS)
    for number, dataset in ((4, "d1"), (5, "d2")):
        if stage3 is not None and (stage3["dataset"] == dataset).any():
            tables[f"table{number}"] = metric_table(stage3, dataset, PAPER_ENCODERS)
            tables[f"table{number + 2}"] = min_max_mean(tables[f"table{number}"])
    for number, dataset in ((8, "d1"), (9, "d2")):
        if stage4 is not None and (stage4["dataset"] == dataset).any():
            paper = metric_table(stage4, dataset, list(METHODS))
            paper.index = [GROUP_NAMES[g] for g in paper.index]
            tables[f"table{number}"] = paper
    if stage4 is not None:
        rules = list(METHODS) + list(EXTRA_METHODS) + [TUNED, STACKING]
        for number, dataset in ((10, "d1"), (11, "d2")):
            if (stage4["dataset"] == dataset).any():
                table = metric_table(stage4, dataset, rules, metrics=(*METRICS, "hd95", "assd"))
                table[["HD95", "ASSD"]] /= 100  # distances are in pixels, not fractions
                table.index = [GROUP_NAMES[g] for g in table.index]
                tables[f"table{number}"] = table.round(2)
        ablation = study.stage_dir("stage4") / "leave_one_out.csv"
        if ablation.is_file():
            loo = pd.read_csv(ablation)
            loo[["mean_dsc", "delta_dsc"]] *= 100
            tables["table12"] = loo.rename(columns={"dataset": "Dataset", "removed": "Model removed",
                                                    "mean_dsc": "DSC", "delta_dsc": "ΔDSC"}).round(2)
    return tables


TABLE_CAPTIONS = {
    **{name: spec["caption"] for name, spec in paper_tables()["tables"].items()},
    "table10": "Table 10. Every ensemble rule with boundary metrics (HD95, ASSD in pixels), dataset 1 test",
    "table11": "Table 11. Every ensemble rule with boundary metrics (HD95, ASSD in pixels), dataset 2",
    "table12": "Table 12. Leave-one-model-out ablation of soft voting (ΔDSC > 0: better without the model)",
    "table13": "Table 13. Bootstrap 95 % confidence intervals (over images) of the means in Tables 4–9",
}


def confidence_intervals(study: Study, n_boot: int) -> pd.DataFrame:
    """Bootstrap 95 % CIs for every mean of Tables 4–9, as percentages."""
    parts = []
    sources = [("stage3", None, (4, 5)), ("stage4", list(METHODS), (8, 9))]
    for stage, groups, numbers in sources:
        frame = _try(stage, study)
        if frame is None:
            continue
        if groups is not None:
            frame = frame[frame["group"].isin(groups)]
        for number, dataset in zip(numbers, ("d1", "d2")):
            part = frame[frame["dataset"] == dataset]
            if part.empty:
                continue
            ci = mean_ci_table(part, by=["group"], metrics=list(METRICS), n_boot=n_boot)
            ci.insert(0, "table", f"table{number}")
            parts.append(ci)
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    out["group"] = out["group"].map(lambda g: GROUP_NAMES.get(g, g))
    out["metric"] = out["metric"].map(PAPER_LABELS)
    out[["mean", "low", "high"]] = (out[["mean", "low", "high"]] * 100).round(2)
    return out


def wilcoxon_tests(study: Study) -> pd.DataFrame:
    """The study's families of paired tests on per-image DSC and IoU, Holm-adjusted within each."""
    families = []
    stage1, stage3, stage4 = (_try(s, study) for s in ("stage1", "stage3", "stage4"))
    if stage4 is not None:
        named = stage4.assign(group=stage4["group"].map(GROUP_NAMES))
        paper_rules = [GROUP_NAMES[m] for m in METHODS]
        families.append(wilcoxon_family(named, all_pairs(paper_rules), family="ensemble rules"))
        extras = [GROUP_NAMES[m] for m in (*EXTRA_METHODS, TUNED, STACKING) if GROUP_NAMES[m] in set(named["group"])]
        if extras:
            families.append(wilcoxon_family(named, one_vs_rest(GROUP_NAMES["soft"], extras), family="new rules vs soft voting"))
        if stage3 is not None:
            both = pd.concat([named[named["group"] == GROUP_NAMES["soft"]], stage3], ignore_index=True)
            families.append(wilcoxon_family(both, one_vs_rest(GROUP_NAMES["soft"], sorted(set(stage3["group"]))),
                                            family="soft voting vs single models"))
    if stage1 is not None:
        per_run = (stage1[stage1["dataset"] == "d1"].groupby(["group", "run", "dataset"])[["dsc", "iou"]].mean()
                   .reset_index().assign(id=lambda f: f["run"].astype(str)))
        with_aug, without = AUGMENTATION_GROUPS[True], AUGMENTATION_GROUPS[False]
        families.append(wilcoxon_family(per_run, [(with_aug, without)], family="augmentation (paired by seed)"))
    return pd.concat(families, ignore_index=True) if families else pd.DataFrame()


def side_by_side(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """This run's values next to the published ones (missing where not transcribed)."""
    published = paper_tables()["tables"].get(name, {}).get("values", {})
    paper = pd.DataFrame(published).T.reindex(index=table.index, columns=table.columns).astype(float)
    both = pd.concat({"this run": table, "paper": paper}, axis=1).swaplevel(axis=1)
    return both[pd.MultiIndex.from_product([table.columns, ["this run", "paper"]])]  # the paper's column order


def write_table(table: pd.DataFrame, folder: Path, name: str, caption: str = "") -> None:
    """CSV, Markdown and LaTeX copies of one table."""
    index = not isinstance(table.index, pd.RangeIndex)
    atomic.write_text(folder / f"{name}.csv", table.to_csv(index=index))
    atomic.write_text(folder / f"{name}.md", (f"**{caption}**\n\n" if caption else "") + table.to_markdown(index=index, floatfmt=".2f") + "\n")
    atomic.write_text(folder / f"{name}.tex", table.to_latex(index=index, float_format="%.2f", caption=caption or None, label=f"tab:{name}"))


def write_all(study: Study) -> dict[str, pd.DataFrame]:
    """Build and write every table, the CIs and the Wilcoxon tests; return them for display."""
    tables = build_tables(study)
    ci = confidence_intervals(study, study.cfg["analysis"]["n_boot"])
    if not ci.empty:
        tables["table13"] = ci
    for name, table in tables.items():
        write_table(table, study.tables_dir, name, TABLE_CAPTIONS.get(name, ""))
    tests = wilcoxon_tests(study)
    if not tests.empty:
        atomic.write_csv(study.tables_dir / "wilcoxon.csv", tests)
        readable = format_wilcoxon(tests)
        write_table(readable, study.tables_dir, "wilcoxon_readable", "Wilcoxon signed-rank tests, Holm-adjusted per family, dataset and metric")
        tables["wilcoxon"] = readable
    return tables
