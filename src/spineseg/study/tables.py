"""Tables 1–9 in the article's layout, Tables 10–13 beyond it, confidence intervals and Wilcoxon families.

Every table value is a percentage with two decimals: the mean over images of a per-image metric
(for repeated trainings, the mean over trainings of that per-training mean).
"""

from __future__ import annotations

import json

import pandas as pd

from spineseg import atomic
from spineseg.encoders import PAPER_ENCODERS
from spineseg.errors import StageOrderError
from spineseg.identification import SHIFT_CLASSES, shift_class
from spineseg.metrics import f1_as_scikit_learn_1_3
from spineseg.names import (
    AUGMENTATION_GROUPS,
    BOUNDARY_METRICS,
    CALIBRATED,
    EXTRA_RULES,
    METRICS,
    RULES,
    STACKING,
    TARGETS,
    TUNED,
    TWO_STAGE,
    metric_name,
    rule_name,
)
from spineseg.stats import PATIENT_KEYS, all_pairs, format_p, format_wilcoxon, mean_ci_table, one_vs_rest, wilcoxon_family
from spineseg.study.article import article_tables, caption, published
from spineseg.study.artifacts import read_table
from spineseg.study.session import Study
from spineseg.study.store import candidate_name
from spineseg.study.training import load_stage_metrics
from spineseg.vertebrae import REGION

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
ALL_RULES = [*RULES, *EXTRA_RULES, TUNED, STACKING, CALIBRATED, TWO_STAGE]
# Encoder tables: the article's encoders in its order, each followed by its level-aware variant.
CANDIDATE_ORDER = [candidate_name(encoder, target) for encoder in (*PAPER_ENCODERS, "VGG16") for target in TARGETS]


TABLE_CAPTIONS = {
    **{name: caption(name) for name in article_tables()["tables"]},
    "table10": "Table 10. Every ensemble rule with boundary metrics (HD95, ASSD in pixels), dataset 1 test",
    "table11": "Table 11. Every ensemble rule with boundary metrics (HD95, ASSD in pixels), dataset 2",
    "table12": "Table 12. Leave-one-model-out ablation of soft voting (ΔDSC > 0: better without the model)",
    "table13": "Table 13. Bootstrap 95 % confidence intervals (over images) of the means in Tables 4–9",
    "wilcoxon_readable": "Wilcoxon signed-rank tests, Holm-adjusted per family, dataset and metric",
    "identification_d1": "Identification of Th8–Th11, dataset 1 test: share of images on the right four vertebrae, level "
                         "shift of the predicted region (% of images), DSC per level and by identification (%)",
    "identification_d2": "Identification of Th8–Th11, dataset 2: share of images on the right four vertebrae, level "
                         "shift of the predicted region (% of images), DSC per level and by identification (%)",
    "cases_d1": "Every dataset-1 test image, worst soft-voting DSC first: each rule's DSC (%), the members' disagreement",
    "cases_d2": "Every dataset-2 image, worst soft-voting DSC first: each rule's DSC (%), the members' disagreement",
    "uncertainty": "Does the members' disagreement flag failed images (soft-voting DSC < 80 %)? AUROC and Spearman ρ with DSC",
    "calibration_d1": "Expected calibration error (%) per model, soft voting and calibrated soft voting, dataset 1 test",
    "calibration_d2": "Expected calibration error (%) per model, soft voting and calibrated soft voting, dataset 2",
    "best_vs_single": "The best ensemble against the best single model (both chosen on dataset-1 validation), "
                      "Wilcoxon signed-rank test by patient",
}


def caption(study: Study, name: str) -> str:
    """A table's caption, saying what this run did where it differs from the article's setting."""
    base = TABLE_CAPTIONS.get(name, name)
    cfg = study.cfg
    size = lambda section: "×".join(str(side) for side in section.image_size)
    if name == "table1":
        return f"{base} — this run: {cfg.stage1.repeats} training(s) per arm at {size(cfg.stage1)} (article: 50 at 256×256)"
    if name in ("table2", "table3"):
        candidates = len(cfg.stage2.encoders) * len(cfg.stage2.targets)
        return (f"{base} — this run: {candidates} candidate(s), {cfg.stage2.repeats} training(s) each at {size(cfg.stage2)} "
                f"(article: 20 encoders × 10 at 256×256)")
    selected = json.loads(study.layout.selection.read_text())["candidates"] if study.layout.selection.is_file() else []
    if name in ("table4", "table5", "table6", "table7"):
        return f"{base} — this run: the {len(selected)} selected model(s) at {size(cfg.stage3)} (article: 10 at 512×512)"
    if name in ("table8", "table9"):
        return f"{base} — this run: ensembles of {len(selected)} model(s) (article: 10)"
    return base


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
    return CANDIDATE_ORDER


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


def load_identification(study: Study) -> pd.DataFrame | None:
    path = study.layout.identification
    return read_table(path) if path.is_file() else None


def identification_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model and rule: identification rate, shift histogram, per-level DSC, DSC by identification."""
    rows = []
    for (group, kind), part in frame.groupby(["group", "kind"], sort=False):
        shifts = part["shift"].map(shift_class)
        identified = part["identified"].astype(bool)
        row = {"": rule_name(group) if kind == "rule" else group, "Kind": kind, "Images": len(part),
               "Identified": 100 * identified.mean()}
        row |= {f"Shift {k:+d}": 100 * (shifts == k).mean() for k in SHIFT_CLASSES}
        row["No region"] = 100 * shifts.isna().mean()  # nothing predicted on any labelled vertebra
        row |= {f"DSC {name}": 100 * part[f"dsc_{name}"].mean() for name in REGION}
        row["DSC identified"] = 100 * part.loc[identified, "dsc"].mean() if identified.any() else float("nan")
        row["DSC not identified"] = 100 * part.loc[~identified, "dsc"].mean() if (~identified).any() else float("nan")
        if "level_accuracy" in part and part["level_accuracy"].notna().any():
            row["Level accuracy"] = 100 * part["level_accuracy"].mean()
            row["PQ"] = 100 * part["pq"].mean()
        rows.append(row)
    return pd.DataFrame(rows).set_index("").round(2)


def _identification_tables(study: Study) -> dict[str, pd.DataFrame]:
    frame = load_identification(study)
    if frame is None:
        return {}
    return {f"identification_{dataset}": identification_summary(part) for dataset, part in frame.groupby("dataset")}


def best_vs_single(study: Study) -> pd.DataFrame:
    """Mean DSC and identification of the validation-chosen best rule and best single model on every test
    set, their difference, and the Wilcoxon test by patient."""
    if not study.layout.learned.is_file():
        return pd.DataFrame()
    learned = json.loads(study.layout.learned.read_text())
    rule, model = rule_name(learned["best_rule"]), learned["best_model"]
    stage3, stage4 = _try("stage3", study), _try("stage4", study)
    if stage3 is None or stage4 is None:
        return pd.DataFrame()
    both = pd.concat([stage4.assign(group=stage4["group"].map(rule_name)), stage3], ignore_index=True)
    tests = wilcoxon_family(both, [(rule, model)], metrics=("dsc",), family="best vs single", pair_on=PATIENT_KEYS)
    identified = load_identification(study)
    rows = []
    for test in tests.itertuples():
        row = {"Dataset": test.dataset, "Best rule": rule, "Best model": model,
               "DSC rule": 100 * both.loc[(both["group"] == rule) & (both["dataset"] == test.dataset), "dsc"].mean(),
               "DSC model": 100 * both.loc[(both["group"] == model) & (both["dataset"] == test.dataset), "dsc"].mean()}
        row["Δ DSC (pp)"] = row["DSC rule"] - row["DSC model"]
        if identified is not None:
            part = identified[identified["dataset"] == test.dataset]
            for label, kind, group in (("Identified rule", "rule", learned["best_rule"]), ("Identified model", "model", model)):
                row[label] = 100 * part.loc[(part["kind"] == kind) & (part["group"] == group), "identified"].astype(bool).mean()
        row |= {"patients": test.n, "images": test.n_images, "p (Wilcoxon, by patient)": format_p(test.p)}
        rows.append(row)
    return pd.DataFrame(rows).round(2)


def build_tables(study: Study) -> dict[str, pd.DataFrame]:
    """Tables 1–9 (those whose stage has run and whose dataset exists) and Tables 10–12, in number order."""
    tables: dict[str, pd.DataFrame] = {}
    for stage in STAGE_TABLES:
        tables.update(stage_tables(study, stage))
    tables.update(_extra_tables(study))
    return dict(sorted(tables.items(), key=lambda item: int(item[0].removeprefix("table"))))


def write_all(study: Study) -> dict[str, pd.DataFrame]:
    """Build and write every table, the CIs, the Wilcoxon tests and the identification tables; return them."""
    tables = build_tables(study)
    ci = confidence_intervals(study, study.cfg.analysis.n_boot)
    if not ci.empty:
        tables["table13"] = ci
    tables |= _identification_tables(study)
    headline = best_vs_single(study)
    if not headline.empty:
        tables["best_vs_single"] = headline
    for name, table in tables.items():
        write_table(study, table, name)
    tests = wilcoxon_tests(study)
    if not tests.empty:
        atomic.write_csv(study.layout.table("wilcoxon", "csv"), tests)
        tables["wilcoxon_readable"] = format_wilcoxon(tests)
        write_table(study, tables["wilcoxon_readable"], "wilcoxon_readable")
    return tables


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
        extras = [rule_name(m) for m in (*EXTRA_RULES, TUNED, STACKING, CALIBRATED, TWO_STAGE) if rule_name(m) in set(named["group"])]
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


def write_table(study: Study, table: pd.DataFrame, name: str, title: str | None = None) -> None:
    """CSV, Markdown and LaTeX copies of one table, captioned (by default with `caption`)."""
    title = title or caption(study, name)
    index = not isinstance(table.index, pd.RangeIndex)
    layout = study.layout
    atomic.write_text(layout.table(name, "csv"), table.to_csv(index=index))
    atomic.write_text(layout.table(name, "md"), f"**{title}**\n\n" + table.to_markdown(index=index, floatfmt=".2f") + "\n")
    atomic.write_text(layout.table(name, "tex"), table.to_latex(index=index, float_format="%.2f", caption=title,
                                                                label=f"tab:{name}"))
