"""Which images fail, whether the ensemble knows it, and whether its probabilities are honest.

- the per-case table: every test image with each rule's DSC (and level shift where labels exist),
  worst first, and a gallery of the worst images with the best and the worst member's mask on each, the
  ensemble's, and the members' disagreement (the per-pixel spread of their probabilities);
- uncertainty: how well the per-image disagreement flags failed images (DSC < 0.8): AUROC, and the
  Spearman correlation with DSC;
- calibration: expected calibration error and reliability diagrams of each stage-3 model, soft voting
  and calibrated soft voting (temperatures fitted on dataset-1 validation in stage 4).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from spineseg import atomic
from spineseg.calibration import calibration_table, expected_calibration_error, scale
from spineseg.ensemble import combine, disagreement
from spineseg.errors import StageOrderError
from spineseg.metrics import dice
from spineseg.names import RULES, rule_name
from spineseg.stats import auroc
from spineseg.study.core.records import Learned
from spineseg.study.core.session import Study, StudyData
from spineseg.study.report.figures import PAGE_HEIGHT_IN, PAGE_WIDTH_IN, crop_box, error_overlay, save
from spineseg.study.report.tables import load_identification
from spineseg.study.stages.ensemble_inputs import EnsembleInputs, available_eval_sets, ensemble_inputs

FAILED_BELOW = 0.8  # an image "fails" below this DSC
GALLERY = 6


def per_case(study: Study, inputs: EnsembleInputs, dataset: str) -> pd.DataFrame:
    """Every image of one test set: each rule's DSC, the members' disagreement, worst (soft voting) first."""
    threshold = inputs.threshold
    table = pd.DataFrame({"id": inputs.ids, "patient": inputs.patients})
    for rule in RULES:
        table[rule_name(rule)] = 100 * dice(combine(inputs.probs, rule, threshold), inputs.masks)
    table["disagreement"] = disagreement(inputs.probs, threshold)[1]
    identification = load_identification(study)
    if identification is not None:
        soft = identification[(identification["dataset"] == dataset) & (identification["group"] == "soft")]
        table["level shift (soft voting)"] = table["id"].map(soft.set_index("id")["shift"]).round(2)
    return table.sort_values(rule_name("soft"), kind="stable").reset_index(drop=True).round(3)


def uncertainty(table: pd.DataFrame) -> dict:
    """Does disagreement flag failures? AUROC for soft-voting DSC < 80 %, Spearman ρ with DSC."""
    dsc = table[rule_name("soft")] / 100
    failed = dsc < FAILED_BELOW
    rho = spearmanr(table["disagreement"], dsc).statistic if len(table) > 2 else float("nan")
    return {"images": len(table), "failed": int(failed.sum()), "auroc": auroc(table["disagreement"], failed),
            "spearman": float(rho)}


def calibration(study: Study, inputs: EnsembleInputs) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """ECE per stage-3 model, soft voting and calibrated soft voting; their reliability tables."""
    learned = Learned.load(study.layout.learned).temperatures
    missing = [name for name in inputs.names if name not in learned]
    if missing:
        raise StageOrderError(f"{study.layout.learned} has no temperature for {', '.join(missing)} "
                              "(the ensemble changed since stage 4 ran): rerun stage 4")
    temperatures = [learned[name] for name in inputs.names]
    maps = {name: probs for name, probs in zip(inputs.names, inputs.probs)}
    maps[rule_name("soft")] = inputs.probs.mean(axis=0)
    maps[rule_name("calibrated_soft")] = np.mean([scale(p, t) for p, t in zip(inputs.probs, temperatures)], axis=0)
    tables = {name: calibration_table(probs, inputs.masks) for name, probs in maps.items()}
    ece = pd.DataFrame({"ECE (%)": [100 * expected_calibration_error(p, inputs.masks) for p in maps.values()],
                        "temperature": [*temperatures, np.nan, np.nan]}, index=list(maps)).round(3)
    return ece, tables


def case_tables(study: Study, data: StudyData) -> dict[str, pd.DataFrame]:
    """Per-case tables, the uncertainty summary and the ECE table of every test set, written as CSV too."""
    tables, flags = {}, []
    for dataset, split in available_eval_sets(data):
        inputs = ensemble_inputs(study, data, dataset, split)
        cases = per_case(study, inputs, dataset)
        tables[f"cases_{dataset}"] = cases
        flags.append({"dataset": dataset, **uncertainty(cases)})
        tables[f"calibration_{dataset}"] = calibration(study, inputs)[0]
    tables["uncertainty"] = pd.DataFrame(flags).round(3)
    for name, table in tables.items():
        atomic.write_text(study.layout.table(name, "csv"), table.to_csv(index=not name.startswith("cases")))
    return tables


def worst_gallery(inputs: EnsembleInputs, cases: pd.DataFrame, n: int = GALLERY) -> plt.Figure:
    """The worst images (soft voting), cropped around the spine: the member that did best and the one that did
    worst on that image, the ensemble, the members' disagreement. Four panels a row fit a journal page at legible
    label sizes whatever the ensemble's size; every member's DSC on every image is in the per-case table."""
    worst = [inputs.ids.index(i) for i in cases["id"].head(n)]
    panel = min(1.8, PAGE_WIDTH_IN / 4, PAGE_HEIGHT_IN / max(len(worst), 1))  # inches per image
    fig, axes = plt.subplots(len(worst), 4, figsize=(4 * panel, panel * len(worst) + 0.4), squeeze=False)
    soft = combine(inputs.probs, "soft", inputs.threshold)
    spread = disagreement(inputs.probs, inputs.threshold)[0]
    for row, index in zip(axes, worst):
        truth = inputs.masks[index].astype(bool)
        members = [(name, probs[index] > inputs.threshold) for name, probs in zip(inputs.names, inputs.probs)]
        scores = [dice(mask, truth)[0] for _, mask in members]
        best, worst_member = members[int(np.argmax(scores))], members[int(np.argmin(scores))]
        box = crop_box([truth, soft[index], best[1], worst_member[1]])
        panels = [("best member", *best), ("worst member", *worst_member), ("", rule_name("soft"), soft[index])]
        for ax, (role, name, mask) in zip(row, panels):
            error_overlay(ax, inputs.images[index][box], mask[box], truth[box])
            ax.set_title(f"{role}\n{name}\nDSC {100 * dice(mask, truth)[0]:.0f} %".lstrip("\n"), fontsize=6)
        row[-1].imshow(spread[index][box], cmap="magma", vmin=0, vmax=0.5)
        row[-1].set_title("members' disagreement", fontsize=6)
        row[-1].set_axis_off()
        row[0].set_ylabel(inputs.ids[index], fontsize=6)
    fig.suptitle("Worst images by soft-voting DSC: false positives red, false negatives blue, truth outlined green",
                 fontsize=7)
    fig.tight_layout()
    return fig


def uncertainty_plot(cases: pd.DataFrame, summary: dict, dataset: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    failed = cases[rule_name("soft")] < 100 * FAILED_BELOW
    ax.scatter(cases["disagreement"], cases[rule_name("soft")], c=np.where(failed, "#d62728", "#1f77b4"), s=14)
    ax.axhline(100 * FAILED_BELOW, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("members' disagreement (mean probability spread)")
    ax.set_ylabel("soft-voting DSC (%)")
    auroc = (f"AUROC {summary['auroc']:.2f}" if np.isfinite(summary["auroc"])
             else "AUROC undefined (every image on one side)")  # no failed image, or no other
    ax.set_title(f"{dataset}: {auroc} for DSC < {100 * FAILED_BELOW:.0f} %, Spearman ρ {summary['spearman']:.2f}", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_plot(tables: dict[str, pd.DataFrame], ece: pd.DataFrame, dataset: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for name, table in tables.items():
        used = table["pixels"] > 0
        ax.plot(table.loc[used, "confidence"], table.loc[used, "observed"], marker="o", ms=3,
                label=f"{name} (ECE {ece.loc[name, 'ECE (%)']:.2f} %)")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed share of Th8–Th11 pixels")
    ax.set_title(f"Reliability, {dataset}", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def case_figures(study: Study, data: StudyData) -> dict[str, plt.Figure]:
    figures = {}
    for dataset, split in available_eval_sets(data):
        inputs = ensemble_inputs(study, data, dataset, split)
        cases = per_case(study, inputs, dataset)
        figures[f"worst_cases_{dataset}"] = worst_gallery(inputs, cases)
        figures[f"uncertainty_{dataset}"] = uncertainty_plot(cases, uncertainty(cases), dataset)
        ece, tables = calibration(study, inputs)
        figures[f"reliability_{dataset}"] = reliability_plot(tables, ece, dataset)
    for name, figure in figures.items():
        save(figure, study, name)
    return figures
