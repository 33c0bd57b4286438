"""Tables 1–9 in the article's layout, Tables 10–13 beyond it, confidence intervals and Wilcoxon families.

Every table value is a percentage with two decimals: the mean over images of a per-image metric
(for repeated trainings, the mean over trainings of that per-training mean).
"""

from __future__ import annotations

import re
import unicodedata

import pandas as pd

from spineseg import atomic
from spineseg.encoders import EXTRA_ENCODERS, PAPER_ENCODERS
from spineseg.errors import StageOrderError
from spineseg.identification import FAILURES, SHIFT_CLASSES, shift_class
from spineseg.metrics import f1_as_scikit_learn_1_3
from spineseg.names import (
    AUGMENTATION_GROUPS,
    BOUNDARY_METRICS,
    CALIBRATED,
    EXTRA_RULES,
    METRICS,
    NNUNET,
    PRIOR_MEAN,
    RULES,
    SINGLE_CROP,
    STACKING,
    TARGETS,
    TUNED,
    TWO_STAGE,
    candidate_name,
    metric_name,
    rule_name,
)
from spineseg.stats import (
    PATIENT_KEYS,
    all_pairs,
    bootstrap_ci,
    format_p,
    format_wilcoxon,
    holm_across,
    mean_ci_table,
    one_vs_rest,
    wilcoxon_family,
)
from spineseg.study.core.artifacts import read_table
from spineseg.study.core.records import Learned
from spineseg.study.core.session import Study
from spineseg.study.report.article import article_tables, caption, published
from spineseg.study.report.deviations import against_article
from spineseg.study.runs.training import load_stage_metrics
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
ALL_RULES = [*RULES, *EXTRA_RULES, TUNED, STACKING, CALIBRATED, TWO_STAGE, SINGLE_CROP, NNUNET]
# Encoder tables: the article's encoders in its order, each followed by its level-aware variant.
# the article's encoders in its order, then the others (VGG16, the offline pre-trained EfficientNet-Lite, ...)
CANDIDATE_ORDER = [candidate_name(encoder, target) for encoder in (*PAPER_ENCODERS, *EXTRA_ENCODERS) for target in TARGETS]


TABLE_CAPTIONS = {
    **{name: caption(name) for name in article_tables()["tables"]},
    "table10": "Table 10. Every ensemble rule with boundary metrics, dataset 1 test",
    "table11": "Table 11. Every ensemble rule with boundary metrics, dataset 2",
    "table12": "Table 12. Leave-one-model-out ablation of soft voting (ΔDSC > 0: better without the model)",
    "table13": "Table 13. Bootstrap 95 % confidence intervals of the means in Tables 4–9, resampling patients "
               "(all images of a patient together)",
    "wilcoxon_readable": "Exploratory: Wilcoxon signed-rank tests, Holm-adjusted per family, dataset and metric "
                         "(p_holm) and across every test of this table (p_holm_all, the secondary family as one)",
    **{f"identification_{dataset}": f"Identification of Th8–Th11, {where}: share of images on the right four vertebrae "
                                     "by three criteria — strictly (each of the four covered ≥ 50 %, no other vertebra, "
                                     "and ≥ 50 % of the mask on them), by the centres named, by coverage alone — and DSC "
                                     "(patient-cluster bootstrap 95 % CIs), level shift of the predicted region "
                                     "(% of images), DSC per level and by strict identification (%); position priors "
                                     "fitted on dataset-1 training label maps, the same for every image"
       for dataset, where in (("d1", "dataset 1 test"), ("d2", "dataset 2"))},
    **{f"identification_failures_{dataset}": f"What kind of wrong each mask is, {where} (% of images)"
       for dataset, where in (("d1", "dataset 1 test"), ("d2", "dataset 2"))},
    **{f"identification_vs_prior_{dataset}": f"Each method against the mean-position prior, {where}: difference in the "
                                             "share identified strictly and with centres identified (pp), paired by "
                                             "image, patient-cluster bootstrap 95 % CIs"
       for dataset, where in (("d1", "dataset 1 test"), ("d2", "dataset 2"))},
    "cases_d1": "Every dataset-1 test image, worst soft-voting DSC first: each rule's DSC (%), the members' disagreement",
    "cases_d2": "Every dataset-2 image, worst soft-voting DSC first: each rule's DSC (%), the members' disagreement",
    "uncertainty": "Does the members' disagreement flag failed images (soft-voting DSC < 80 %)? AUROC and Spearman ρ with DSC",
    "calibration_d1": "Expected calibration error (%) per model, soft voting and calibrated soft voting, dataset 1 test",
    "calibration_d2": "Expected calibration error (%) per model, soft voting and calibrated soft voting, dataset 2",
    "identification_endpoint": "Primary endpoint (declared in the profile): the share of images identified strictly by the "
                               "best rule against the best single model (both chosen on dataset-1 validation) and against "
                               "the mean-position prior; patient-cluster bootstrap 95 % CIs of each share and of each paired "
                               "difference (pp), Wilcoxon signed-rank tests by patient, Holm-adjusted over the two; DSC "
                               "beside it is secondary",
    "best_vs_single": "Primary endpoint: the best ensemble against the best single model (both chosen on dataset-1 validation), "
                      "Wilcoxon signed-rank test of DSC by patient; means with patient-cluster bootstrap 95 % CIs",
}


# The training stage whose models a table's numbers come from.
TABLE_STAGES = {"table1": "stage1", "table2": "stage2", "table3": "stage2",
                **{f"table{n}": "stage3" for n in range(4, 14)}}
ENCODER_TABLES = ("table2", "table3", "table4", "table5")
EMPTY_RULE_TABLES = {"table8": "d1", "table9": "d2"}


def caption(study: Study, name: str, beside_article: bool = False) -> str:
    """A table's caption, saying how this run differs from the article: data, weights, epochs, sizes. It describes
    the file it heads; `beside_article` for the notebooks' display, which adds the article's values."""
    base = TABLE_CAPTIONS.get(name, name)
    if name == "table1" and study.cfg.stage1.encoder != "VGG16":  # the article's title names its encoder
        base = base.replace("VGG16", f"{study.cfg.stage1.encoder} (article: VGG16)")
    if name == "identification_endpoint" and study.cfg.nnunet.enabled:
        return base.replace(" and against the mean-position prior", ", against the mean-position prior and against the "
                                                                     "nnU-Net peer").replace("over the two", "over the three")
    if name == "best_vs_single" and study.cfg.analysis.primary_endpoint != "dsc":
        return base.replace("Primary endpoint:", "Secondary endpoint (the profile's primary is identification):")
    if name not in TABLE_STAGES:
        return base
    parts = [base]
    if name in ("table8", "table9"):
        parts.append(f"ensembles at T = {study.cfg.stage4.threshold} (article: 0.5)")
    if name in BOUNDARY_TABLES:
        parts.append(f"HD95 and ASSD in px of the stored grid{_stored_grid(study)}")
    parts.append(against_article(study, TABLE_STAGES[name]))
    if name in ENCODER_TABLES and beside_article:
        parts.append("the article's encoders this run did not train show — beside the article's values")
    return " — ".join(parts)


def _stored_grid(study: Study) -> str:
    """The stored image size where the profile sets it (a folder of images keeps its own sizes)."""
    data = study.cfg.data
    return "" if data.source == "folder" else " (" + "×".join(str(side) for side in data.size) + ")"


def table_note(study: Study, name: str) -> str | None:
    """What a reader must know under a table: for Table 2 how the article selected, for Tables 8–9 how an
    empty prediction scores and how many there were."""
    if name == "table2":
        return ("This study ranks and selects the encoders by validation DSC only. The article's ten are exactly the "
                "ten best of this table (test data) at or above 91.5 %: it may have selected on test.")
    if name in EMPTY_RULE_TABLES:
        return _empty_predictions_note(study, EMPTY_RULE_TABLES[name])
    return None


def _empty_predictions_note(study: Study, dataset: str) -> str:
    rule = ("An empty prediction (no pixel above T) scores precision 100 % and recall, IoU and DSC 0; its HD95 and "
            "ASSD are undefined and left out of Tables 10–11's means.")
    stage4 = _try("stage4", study)
    if stage4 is None:
        return rule
    part = stage4[stage4["dataset"] == dataset]
    empty = ((part["recall"] == 0) & (part["precision"] == 1)).groupby(part["group"]).sum()
    images = part.groupby("group").size()
    counts = ", ".join(f"{rule_name(g)} {int(empty[g])} of {int(images[g])}" for g in (*RULES, NNUNET) if empty.get(g, 0))
    return f"{rule} Empty predictions in this run: {counts or 'none'}."


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
        return [by_name[label] for label in published("table8").index] + [NNUNET]  # the peer, where trained
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
            table = table.rename(columns={name: f"{name} (px)" for name in boundary})
            boundary = [f"{name} (px)" for name in boundary]
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


def _with_ci(name: str, values: pd.Series, patients: pd.Series, n_boot: int) -> dict[str, float]:
    """A mean in % with its patient-cluster bootstrap 95 % interval (images of one patient resampled together)."""
    if not n_boot:
        return {name: 100 * values.mean()}
    low, high = bootstrap_ci(values.astype(float), n_boot=n_boot, clusters=patients)
    return {name: 100 * values.mean(), f"{name} CI low": 100 * low, f"{name} CI high": 100 * high}


IDENTIFICATION_CRITERIA = {"identified_strict": "Identified strictly", "centres_identified": "Centres identified",
                           "identified": "Identified (coverage only)"}


def _group_label(group: str, kind: str) -> str:
    return group if kind == "model" else rule_name(group)


def identification_summary(frame: pd.DataFrame, n_boot: int = 0) -> pd.DataFrame:
    """One row per model, rule and reference: the three identification criteria and DSC (with patient-cluster
    95 % CIs when `n_boot`), shift histogram, per-level DSC, DSC by strict identification."""
    rows = []
    for (group, kind), part in frame.groupby(["group", "kind"], sort=False):
        row = {"": _group_label(group, kind), "Kind": kind, "Images": len(part), "Patients": part["patient"].nunique()}
        for column, label in IDENTIFICATION_CRITERIA.items():
            if column in part and part[column].notna().any():
                row |= _with_ci(label, part[column].astype(float), part["patient"], n_boot)
        if part["dsc"].notna().any():
            row |= _with_ci("DSC", part["dsc"], part["patient"], n_boot)
            shifts = part["shift"].map(shift_class)
            row |= {f"Shift {k:+d}": 100 * (shifts == k).mean() for k in SHIFT_CLASSES}
            row["No region"] = 100 * shifts.isna().mean()  # nothing predicted on any labelled vertebra
            row |= {f"DSC {name}": 100 * part[f"dsc_{name}"].mean() for name in REGION}
            strict = part["identified_strict"].astype(bool)
            row["DSC identified strictly"] = 100 * part.loc[strict, "dsc"].mean() if strict.any() else float("nan")
            row["DSC not identified strictly"] = 100 * part.loc[~strict, "dsc"].mean() if (~strict).any() else float("nan")
        if "level_accuracy" in part and part["level_accuracy"].notna().any():
            row["Level accuracy"] = 100 * part["level_accuracy"].mean()
            row["PQ"] = 100 * part["pq"].mean()
        rows.append(row)
    return pd.DataFrame(rows).set_index("").round(2)


def identification_failures(frame: pd.DataFrame) -> pd.DataFrame:
    """What kind of wrong each model, rule and reference is (`spineseg.identification.FAILURES`), % of images."""
    counts = frame.groupby(["group", "kind"], sort=False)["failure"].value_counts(normalize=True).unstack(fill_value=0.0)
    table = 100 * counts.reindex(columns=[c for c in FAILURES if c in counts.columns])
    table.index = [_group_label(group, kind) for group, kind in table.index]
    return table.round(2)


def identification_vs_prior(frame: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Each method against the mean-position prior, image by image: the difference in the share identified
    strictly and with centres identified (percentage points), with patient-cluster bootstrap 95 % CIs of the
    difference. A constant that never looks at the image is what a locator must beat."""
    prior = frame[frame["group"] == PRIOR_MEAN].set_index("id")
    rows = []
    for (group, kind), part in frame[frame["kind"] != "prior"].groupby(["group", "kind"], sort=False):
        part = part.set_index("id")
        row = {"": _group_label(group, kind), "Kind": kind, "Images": len(part), "Patients": part["patient"].nunique()}
        for column, label in list(IDENTIFICATION_CRITERIA.items())[:2]:
            if part[column].isna().all():
                continue
            difference = part[column].astype(float) - prior.loc[part.index, column].astype(float)
            row |= _with_ci(f"Δ {label.lower()} (pp)", difference, part["patient"], n_boot)
        rows.append(row)
    return pd.DataFrame(rows).set_index("").round(2) if rows else pd.DataFrame()


def _identification_tables(study: Study) -> dict[str, pd.DataFrame]:
    frame = load_identification(study)
    if frame is None:
        return {}
    n_boot = study.cfg.analysis.n_boot
    tables = {}
    for dataset, part in frame.groupby("dataset"):
        tables[f"identification_{dataset}"] = identification_summary(part, n_boot)
        tables[f"identification_failures_{dataset}"] = identification_failures(part)
        if (part["group"] == PRIOR_MEAN).any():
            tables[f"identification_vs_prior_{dataset}"] = identification_vs_prior(part, n_boot)
    return tables


def best_vs_single(study: Study) -> pd.DataFrame:
    """Mean DSC and identification of the validation-chosen best rule and best single model on every test
    set, their difference, and the Wilcoxon test by patient."""
    if not study.layout.learned.is_file():
        return pd.DataFrame()
    learned = Learned.load(study.layout.learned)
    rule, model = rule_name(learned.best_rule), learned.best_model
    n_boot = study.cfg.analysis.n_boot
    stage3, stage4 = _try("stage3", study), _try("stage4", study)
    if stage3 is None or stage4 is None:
        return pd.DataFrame()
    both = pd.concat([stage4.assign(group=stage4["group"].map(rule_name)), stage3], ignore_index=True)
    tests = wilcoxon_family(both, [(rule, model)], metrics=("dsc",), family="best vs single", pair_on=PATIENT_KEYS)
    identified = load_identification(study)
    rows = []
    for test in tests.itertuples():
        row = {"Dataset": test.dataset, "Best rule": rule, "Best model": model}
        for label, group in (("DSC rule", rule), ("DSC model", model)):
            scored = both[(both["group"] == group) & (both["dataset"] == test.dataset)]
            row |= _with_ci(label, scored["dsc"], scored["patient"], n_boot)
        row["Δ DSC (pp)"] = row["DSC rule"] - row["DSC model"]
        if identified is not None:
            part = identified[identified["dataset"] == test.dataset]
            for label, kind, group in (("Identified strictly rule", "rule", learned.best_rule),
                                       ("Identified strictly model", "model", model)):
                found = part[(part["kind"] == kind) & (part["group"] == group)]
                row |= _with_ci(label, found["identified_strict"].astype(bool), found["patient"], n_boot)
        row |= {"patients": test.n, "images": test.n_images, "p (Wilcoxon, by patient)": format_p(test.p)}
        rows.append(row)
    return pd.DataFrame(rows).round(2)


def identification_endpoint(study: Study) -> pd.DataFrame:
    """The identification endpoint on every test set: the validation-chosen best rule against the validation-chosen
    best single model, the mean-position prior and, where the profile trains it, the nnU-Net peer, image by image;
    Holm over those comparisons (the family the profile declares)."""
    frame = load_identification(study)
    if frame is None or not study.layout.learned.is_file():
        return pd.DataFrame()
    learned = Learned.load(study.layout.learned)
    n_boot = study.cfg.analysis.n_boot
    arms = {"rule": ("rule", learned.best_rule), "model": ("model", learned.best_model), "prior": ("prior", PRIOR_MEAN)}
    if study.cfg.nnunet.enabled:
        arms["peer"] = ("peer", NNUNET)
    others = [arm for arm in arms if arm != "rule"]
    rows = []
    for dataset, part in frame.groupby("dataset"):
        scored = {arm: part[(part["kind"] == kind) & (part["group"] == group)].set_index("id")
                  for arm, (kind, group) in arms.items()}
        if any(arm.empty for arm in scored.values()):
            continue
        long = pd.concat([arm.assign(group=name).reset_index() for name, arm in scored.items()], ignore_index=True)
        long["identified_strict"] = long["identified_strict"].astype(float)
        tests = wilcoxon_family(long, [("rule", other) for other in others], metrics=("identified_strict",),
                                family="identification endpoint", pair_on=PATIENT_KEYS).set_index("b")
        rule = scored["rule"]
        row = {"Dataset": dataset, "Best rule": rule_name(learned.best_rule), "Best model": learned.best_model}
        for arm in arms:
            row |= _with_ci(f"Identified strictly {arm}", scored[arm]["identified_strict"].astype(float),
                            scored[arm]["patient"], n_boot)
        for other in others:
            difference = rule["identified_strict"].astype(float) - scored[other].loc[rule.index, "identified_strict"].astype(float)
            row |= _with_ci(f"Δ rule − {other} (pp)", difference, rule["patient"], n_boot)
            row[f"r rule vs {other} (rank-biserial)"] = tests.loc[other, "effect_size"]
            row[f"p rule vs {other} (Wilcoxon by patient, Holm)"] = format_p(tests.loc[other, "p_holm"])
        row |= _with_ci("DSC rule (secondary)", rule["dsc"], rule["patient"], n_boot)
        row |= _with_ci("DSC model (secondary)", scored["model"]["dsc"], scored["model"]["patient"], n_boot)
        if "peer" in scored:
            row |= _with_ci("DSC peer (secondary)", scored["peer"]["dsc"], scored["peer"]["patient"], n_boot)
        row |= {"patients": rule["patient"].nunique(), "images": len(rule)}
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
    if study.cfg.analysis.primary_endpoint == "identification":
        endpoint = identification_endpoint(study)
        if not endpoint.empty:
            tables["identification_endpoint"] = endpoint
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
    for stage, groups in (("stage3", None), ("stage4", [*RULES, NNUNET])):
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
        two_stage, single_crop = rule_name(TWO_STAGE), rule_name(SINGLE_CROP)
        if {two_stage, single_crop} <= set(named["group"]):  # the same crop model behind the ensemble or one model
            families.append(wilcoxon_family(named, [(two_stage, single_crop)], family="two-stage: ensemble vs single locator",
                                            **by_patient))
        peer = rule_name(NNUNET)
        if peer in set(named["group"]) and study.layout.learned.is_file():  # the study's best against the peer
            best = rule_name(Learned.load(study.layout.learned).best_rule)
            families.append(wilcoxon_family(named, [(best, peer)], family="best rule vs nnU-Net", **by_patient))
        if stage3 is not None:
            both = pd.concat([named[named["group"] == soft], stage3], ignore_index=True)
            families.append(wilcoxon_family(both, one_vs_rest(soft, sorted(set(stage3["group"]))),
                                            family="soft voting vs single models", **by_patient))
    if stage1 is not None:
        per_run = (stage1[stage1["dataset"] == "d1"].groupby(["group", "run", "dataset"])[["dsc", "iou"]].mean()
                   .reset_index().assign(id=lambda f: f["run"].astype(str)))
        with_aug, without = AUGMENTATION_GROUPS[True], AUGMENTATION_GROUPS[False]
        families.append(wilcoxon_family(per_run, [(with_aug, without)], family="augmentation (paired by seed)"))
    if not families:
        return pd.DataFrame()
    tests = pd.concat(families, ignore_index=True)
    return tests.assign(p_holm_all=holm_across(tests["p"]))  # the whole secondary family at once


# pdflatex reads ASCII safely: LaTeX's special characters escaped, every other character spelled in LaTeX.
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_SYMBOLS = {"Δ": r"$\Delta$", "±": r"$\pm$", "≥": r"$\geq$", "≤": r"$\leq$", "≠": r"$\neq$", "×": r"$\times$",
                 "−": "$-$", "ρ": r"$\rho$", "τ": r"$\tau$", "²": r"$^{2}$", "·": r"$\cdot$", "→": r"$\rightarrow$",
                 "∂": r"$\partial$", "⊙": r"$\odot$", "₊": "$_{+}$", "₋": "$_{-}$", "–": "--", "—": "---",
                 "…": r"\ldots{}", "°": r"$^{\circ}$", "µ": r"$\mu$", "σ": r"$\sigma$", "’": "'", "‘": "`",
                 "“": "``", "”": "''", "\u00a0": "~"}
MISSING = "—"  # a value this run has not got, in the Markdown and LaTeX copies (empty in the CSV)


def latex_text(text: object) -> str:
    """Any text as LaTeX that pdflatex compiles as it reads: `% _ & # $` escaped, Δ as $\\Delta$, accents dropped."""
    return "".join(LATEX_SPECIALS.get(char) or LATEX_SYMBOLS.get(char) or _ascii(char) for char in str(text))


def _ascii(char: str) -> str:
    if char.isascii():
        return char
    return unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode() or "?"


def latex_table(table: pd.DataFrame, title: str, label: str, note: str | None = None) -> str:
    """A booktabs table whose caption, column names, row names, cells and note are all escaped text."""
    index = not isinstance(table.index, pd.RangeIndex)
    escaped = table.rename(index=latex_text, columns=latex_text)
    escaped.index.name = latex_text(escaped.index.name) if escaped.index.name is not None else None
    text_columns = [c for c in escaped.columns if not pd.api.types.is_numeric_dtype(escaped[c])]
    escaped[text_columns] = escaped[text_columns].map(lambda v: v if pd.isna(v) else latex_text(v))
    numbered = re.match(r"Table \d+\. ", title)  # LaTeX numbers its tables: "Table 1: Table 2. …" otherwise
    body = escaped.to_latex(index=index, float_format="%.2f", na_rep=latex_text(MISSING), escape=False,
                            caption=latex_text(title[numbered.end():] if numbered else title), label=label)
    # a table wider than the text is scaled down to it (graphicx's \resizebox), a narrower one left as it is
    body = body.replace("\\begin{tabular}", "\\begingroup\\setbox0=\\hbox{\\begin{tabular}", 1)
    body = body.replace("\\end{tabular}\n", "\\end{tabular}}\\ifdim\\wd0>\\linewidth\\resizebox{\\linewidth}{!}"
                                           "{\\box0}\\else\\box0\\fi\\endgroup\n", 1)
    if note:
        body = body.replace("\\endgroup\n", f"\\endgroup\n\\par\\footnotesize {latex_text(note)}\n", 1)
    return body


def write_table(study: Study, table: pd.DataFrame, name: str, title: str | None = None) -> None:
    """CSV, Markdown and LaTeX copies of one table, captioned (by default with `caption`), with its note."""
    title = title or caption(study, name)
    note = table_note(study, name)
    index = not isinstance(table.index, pd.RangeIndex)
    layout = study.layout
    missing_as_none = table.astype(object).where(table.notna(), None)  # what tabulate prints as `missingval`
    markdown = missing_as_none.to_markdown(index=index, floatfmt=".2f", missingval=MISSING)
    atomic.write_text(layout.table(name, "csv"), table.to_csv(index=index))
    atomic.write_text(layout.table(name, "md"), f"**{title}**\n\n{markdown}\n" + (f"\n_{note}_\n" if note else ""))
    atomic.write_text(layout.table(name, "tex"), latex_table(table, title, f"tab:{name}", note))
