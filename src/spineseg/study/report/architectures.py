"""Stage 6's Tables 14–17, their captions and the pruning figure: read from the runs stage 6 recorded
(`spineseg.study.stages.stage6_architectures`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from spineseg.names import METRICS
from spineseg.stats import PATIENT_KEYS, format_wilcoxon, one_vs_rest, wilcoxon_family
from spineseg.study.core.artifacts import ATTENTION, DECODERS, OPTIMISERS, PRUNING
from spineseg.study.core.session import Study
from spineseg.study.report.figures import save
from spineseg.study.report.tables import metric_table, write_table
from spineseg.study.runs.training import load_stage_metrics, load_stage_runs
from spineseg.study.stages.stage6_architectures import baseline_group, chosen, decoder_baselines, pair_name


def stage6_frames(study: Study) -> dict[str, pd.DataFrame]:
    """The per-image test metrics of each comparison that has run."""
    frames = {}
    for stage in (DECODERS, OPTIMISERS, ATTENTION, PRUNING):
        path = study.layout.stage_metrics(stage)
        if path.is_file():
            frames[stage] = load_stage_metrics(study, stage)
    return frames



TABLE_METRICS = (*METRICS, "ap")
STAGE6_TABLES = {DECODERS: "table14", OPTIMISERS: "table15", ATTENTION: "table16", PRUNING: "table17"}
STAGE6_CAPTIONS = {
    "table14": "Table 14. Decoders × encoders (Adam, no attention), {dataset}: seven metrics and mAP (%)",
    "table15": "Table 15. Optimisers on the best decoder–encoder pair ({pair}), {dataset} (%)",
    "table16": "Table 16. The pair {pair} without and with scSE attention in its decoder, {dataset} (%)",
    "table17": "Table 17. Gradient-sensitivity pruning of {pair}, then fine-tuning: size, CPU time at {timing}, "
               "DSC before and after fine-tuning, {dataset} (metrics after fine-tuning, %)",
}


def stage6_tables(study: Study) -> dict[str, pd.DataFrame]:
    """Tables 14–17 per test set, and the Wilcoxon tests of every row against its baseline."""
    frames, picked = stage6_frames(study), chosen(study)
    tables, families = {}, []
    for stage, frame in frames.items():
        if stage == PRUNING:
            frame = frame[frame["phase"] == "after fine-tuning"]
        for dataset in sorted(frame["dataset"].unique()):
            name = STAGE6_TABLES[stage] + ("" if dataset == "d1" else f"_{dataset}")
            order = list(dict.fromkeys(frame["group"]))
            table = metric_table(frame, dataset, order, metrics=TABLE_METRICS)
            if stage == PRUNING:
                table = _pruning_columns(study, frames[PRUNING], dataset).join(table)
            tables[name] = table
        pairs = decoder_baselines(frame) if stage == DECODERS else one_vs_rest(baseline_group(stage, study), frame["group"].unique())
        if pairs:
            families.append(wilcoxon_family(frame, [(b, a) for a, b in pairs] if stage != DECODERS else pairs,
                                            family=STAGE6_TABLES[stage], pair_on=PATIENT_KEYS))
    if picked is not None and picked.skipped:
        tables["table14_skipped"] = pd.DataFrame({"reason": picked.skipped})
    if families:
        tables["table14_17_wilcoxon"] = format_wilcoxon(pd.concat(families, ignore_index=True))
    captions = stage6_captions(study)
    for name, table in tables.items():
        write_table(study, table, name, captions.get(name))
    return tables


def _pruning_columns(study: Study, frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    runs = load_stage_runs(study, PRUNING).set_index("group")
    before = frame[(frame["phase"] == "before fine-tuning") & (frame["dataset"] == dataset)].groupby("group")["dsc"].mean()
    after = frame[(frame["phase"] == "after fine-tuning") & (frame["dataset"] == dataset)].groupby("group")["dsc"].mean()
    return pd.DataFrame({"Parameters (M)": runs["parameters"] / 1e6, "Size (MB)": runs["size_mb"], "CPU ms": runs["cpu_ms"],
                         "DSC before FT": 100 * before, "DSC after FT": 100 * after}).round(2)


def stage6_captions(study: Study) -> dict[str, str]:
    picked, arch = chosen(study), study.cfg.architectures
    pair = pair_name(*picked.best_pair) if picked else "the best pair"
    attention_pair = pair_name(*picked.attention_pair) if picked and picked.attention_pair else pair
    timing = "×".join(map(str, arch.timing_size))
    out = {}
    for name in STAGE6_TABLES.values():
        for dataset, label in (("d1", "dataset 1 test"), ("d2", "dataset 2")):
            key = name + ("" if dataset == "d1" else f"_{dataset}")
            out[key] = STAGE6_CAPTIONS[name].format(dataset=label, pair=attention_pair if name == "table16" else pair,
                                                    timing=timing)
    out["table14_skipped"] = "Decoder–encoder pairs smp cannot build, and why"
    out["table14_17_wilcoxon"] = ("Wilcoxon tests by patient (Holm) of Tables 14–17 against the baseline: U-Net with the "
                                  "same encoder, Adam, no attention, unpruned")
    return out


def pruning_figure(study: Study) -> plt.Figure:
    """DSC against file size before and after fine-tuning; where the two coincide (the unpruned model) the hollow
    markers of one and the filled ones of the other stay both visible, and DSC keeps its 0–100 % scale."""
    runs = load_stage_runs(study, PRUNING)
    frame = load_stage_metrics(study, PRUNING)
    d1 = frame[frame["dataset"] == "d1"]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    styles = {"before fine-tuning": dict(ls="--", marker="o", ms=8, mfc="none"),
              "after fine-tuning": dict(ls="-", marker="s", ms=4)}
    for phase, style in styles.items():
        dsc = d1[d1["phase"] == phase].groupby("group")["dsc"].mean().reindex(runs["group"])
        ax.plot(runs["size_mb"], 100 * dsc.to_numpy(), label=phase, **style)
    ax.set_ylim(0, 100)
    fractions = ax.secondary_xaxis("top")  # each point's pruned fraction, clear of the lines
    fractions.set_xticks(list(runs["size_mb"]), list(runs["group"]), fontsize=6)
    fractions.set_xlabel("pruned fraction", fontsize=7)
    ax.set_xlabel("model file (MB)")
    ax.set_ylabel("mean DSC, dataset 1 test (%)")
    ax.set_title("Gradient-sensitivity pruning: DSC against size", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def stage6_figures(study: Study) -> dict[str, plt.Figure]:
    figures = {}
    if study.layout.runs_table(PRUNING).is_file():
        figures["pruning_dsc_vs_size"] = pruning_figure(study)
    for name, figure in figures.items():
        save(figure, study, name)
    return figures
