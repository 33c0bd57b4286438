"""Publication figures: each saved as a PNG at the profile's ``analysis.dpi`` (300 unless a profile says otherwise)
and a PDF under ``figures/<profile>/``, no wider than `MAX_WIDTH_IN`."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.patheffects import withStroke
from PIL import Image
from skimage.measure import find_contours

from spineseg import atomic
from spineseg.data import DatasetError, Sample, load_split, read_manifest
from spineseg.ensemble import THRESHOLD_GRID, combine
from spineseg.identification import identification_table, mask_centres, vertebra_centres
from spineseg.metrics import dice, per_image
from spineseg.names import EXTRA_RULES, LOCATED, RULES, rule_name
from spineseg.study.core.records import Learned
from spineseg.study.core.session import Study, StudyData
from spineseg.study.report.tables import CANDIDATE_ORDER, identification_summary, load_identification
from spineseg.study.runs.training import load_stage_metrics
from spineseg.study.stages.ensemble_inputs import EnsembleInputs, available_eval_sets, ensemble_inputs
from spineseg.study.stages.located import Located
from spineseg.study.stages.stage4_ensembles import threshold_curves
from spineseg.vertebrae import BACKGROUND, CHAIN_CODES, CODES, IGNORE, N_LEVELS, NAMES, REGION, region_mask

# The colours of every mask figure, keyed on each: a mask tinted where it is right, filled where it is wrong.
TRUE_POSITIVE = (1.0, 0.85, 0.0)
FALSE_POSITIVE = (0.9, 0.1, 0.1)
FALSE_NEGATIVE = (0.1, 0.4, 1.0)
TRUE_POSITIVE_TINT = 0.45  # the share of TRUE_POSITIVE over the radiograph, which stays visible underneath
TRUTH = "#2ca02c"
MASK_KEY = {"TP: predicted and true": TRUE_POSITIVE, "FP: predicted, not true": FALSE_POSITIVE,
            "FN: true, missed": FALSE_NEGATIVE}
MAX_WIDTH_IN = 20
PAGE_WIDTH_IN = 7.2  # a journal's full text width (about 180 mm): the mask galleries fit it, their labels stay legible
PAGE_HEIGHT_IN = 9.0  # and its text height (about 230 mm), less room for a caption
EMBEDDED_FONTS = {"pdf.fonttype": 42, "ps.fonttype": 42}  # TrueType in the PDFs, as journals ask, not Type 3


REGION_COLOURS = ("#e41a1c", "#ff7f00", "#4daf4a", "#377eb8")

_DATASETS = {"d1": "dataset 1 test", "d2": "dataset 2"}
# What each figure shows, for its caption and alt text in the notebooks and the report (keyed by the saved name).
FIGURE_CAPTIONS = (
    (r"fig1_datasets", "Example radiographs of each dataset with their Th8–Th11 masks (the article's Figure 1)."),
    (r"label_overlays", "Dataset-1 radiographs with the outline of each labelled vertebra: what the level labels hold."),
    (r"ensemble_masks_(?P<d>d\d)", "Each ensemble rule's mask on the best, median and worst image of the {d} by "
                                    "soft-voting DSC: true positives yellow, false positives red, false negatives "
                                    "blue, the truth outlined green."),
    (r"dsc_by_ensemble", "DSC per test image of each ensemble rule, one box per rule, by dataset."),
    (r"dsc_by_encoder", "DSC per test image of each stage-3 model, one box per encoder, by dataset."),
    (r"dsc_vs_threshold", "Mean dataset-1 validation DSC of each rule against the threshold T; the dotted line "
                          "marks the T the profile uses."),
    (r"level_shifts_(?P<d>d\d)", "Where the predicted Th8–Th11 region landed on the {d}, in vertebra levels "
                                  "from the truth (0: the right four), per method."),
    (r"identification_failures_(?P<d>d\d)", "The worst identification failures of the validation-chosen method "
                                             "on the {d}: true vertebra centres green, the centres it named red."),
    (r"levels_(?P<model>.+)_(?P<d>d\d)", "Confusion matrix of the vertebra levels that {model} named against the "
                                          "labelled ones on the {d}, with its colour bar."),
    (r"worst_cases_(?P<d>d\d)", "The worst images of the {d} by soft-voting DSC: the best and the worst member on "
                                 "each, the soft-voting mask and the members' disagreement (the spread of their "
                                 "probabilities)."),
    (r"uncertainty_(?P<d>d\d)", "Soft-voting DSC against the members' disagreement on the {d}: does "
                                 "disagreement flag the failed images (DSC < 80 %, red)?"),
    (r"reliability_(?P<d>d\d)", "Reliability diagram on the {d}: the observed share of Th8–Th11 pixels against "
                                 "the predicted probability, per model and rule (ECE in the legend)."),
    (r"pruning_dsc_vs_size", "Gradient-sensitivity pruning: mean dataset-1 test DSC against the model file's size, "
                             "before and after fine-tuning, per pruned fraction p."),
)


def figure_caption(name: str) -> str:
    """The caption of a saved figure, from its name."""
    for pattern, text in FIGURE_CAPTIONS:
        match = re.fullmatch(pattern, name)
        if match:
            fields = match.groupdict()
            return text.format(d=_DATASETS.get(fields.get("d", ""), fields.get("d", "")),
                               model=fields.get("model", "").replace("_", " "))
    raise KeyError(f"figure {name!r} has no caption in FIGURE_CAPTIONS")


def save(fig: Figure, study: Study, name: str) -> list[Path]:
    """The figure as PNG (at the profile's dpi) and PDF, each written atomically."""
    paths = [study.layout.figure(name, "png"), study.layout.figure(name, "pdf")]
    for path in paths:
        with atomic.atomic_path(path) as tmp, plt.rc_context(EMBEDDED_FONTS):
            fig.savefig(tmp, format=path.suffix[1:], dpi=study.cfg.analysis.dpi, bbox_inches="tight")
    return paths


def dataset_examples(data: StudyData, size: int = 512) -> plt.Figure:
    """Fig. 1: an image and its Th8–Th11 mask from each dataset."""
    sets = [("Dataset 1", data.d1, "train")] + ([("Dataset 2", data.d2, "test")] if data.d2 else [])
    fig, axes = plt.subplots(len(sets), 2, figsize=(6, 3 * len(sets)), squeeze=False)
    for row, (title, folder, split) in zip(axes, sets):
        loaded = load_split(folder, split, size)
        row[0].imshow(loaded.images[0], cmap="gray", vmin=0, vmax=1)
        row[0].set_title(f"{title}: {loaded.ids[0]}", fontsize=9)
        row[1].imshow(loaded.masks[0], cmap="gray")
        row[1].set_title("Th8–Th11 mask", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return fig


def crop_box(masks, margin: float = 0.6, minimum: int = 8) -> tuple[slice, slice]:
    """A window around everything in `masks` (the spine region), grown by `margin` of its size."""
    union = np.any(np.stack([np.asarray(m, dtype=bool) for m in masks]), axis=0)
    height, width = union.shape
    if not union.any():
        return slice(0, height), slice(0, width)
    rows, cols = np.nonzero(union)
    pad_r = int(margin * (rows.max() - rows.min() + 1)) + minimum
    pad_c = int(margin * (cols.max() - cols.min() + 1)) + minimum
    return (slice(max(rows.min() - pad_r, 0), min(rows.max() + pad_r + 1, height)),
            slice(max(cols.min() - pad_c, 0), min(cols.max() + pad_c + 1, width)))


def error_rgb(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """A grey image [H, W] in [0, 1] as RGB with a mask's true positives tinted and its errors filled (`MASK_KEY`)."""
    rgb = np.repeat(image[..., None], 3, axis=2)
    hit = pred & truth
    rgb[hit] = (1 - TRUE_POSITIVE_TINT) * rgb[hit] + TRUE_POSITIVE_TINT * np.array(TRUE_POSITIVE)
    rgb[pred & ~truth] = FALSE_POSITIVE
    rgb[~pred & truth] = FALSE_NEGATIVE
    return rgb


def error_overlay(ax, image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> None:
    """A mask against the truth (outlined), and the figure's colour key below it (added once)."""
    ax.imshow(error_rgb(image, pred, truth))
    ax.contour(truth, levels=[0.5], colors=TRUTH, linewidths=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    add_mask_key(ax.figure)


def add_mask_key(fig: Figure) -> None:
    """The colour key of mask figures under the figure (`save` crops to include it), unless it has one."""
    if any(legend.get_label() == "mask key" for legend in fig.legends):
        return
    handles = [Patch(color=colour, label=label) for label, colour in MASK_KEY.items()]
    handles.append(Line2D([], [], color=TRUTH, label="truth outline"))
    key = fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=7,
                     frameon=False)
    key.set_label("mask key")


RANKING_RULE = "soft"  # the rule whose DSC picks the best, median and worst images of every mask figure


def ranked_picks(inputs: EnsembleInputs) -> dict[str, int]:
    """The best, median and worst image by `RANKING_RULE`'s DSC at the inputs' T: their indices."""
    order = np.argsort(dice(combine(inputs.probs, RANKING_RULE, inputs.threshold), inputs.masks), kind="stable")
    return {"best": int(order[-1]), "median": int(order[len(order) // 2]), "worst": int(order[0])}


def ranking_text(threshold: float) -> str:
    return f"ranked by {rule_name(RANKING_RULE).lower()} DSC at T = {threshold:g}"


def ensemble_overlays(inputs: EnsembleInputs, methods=RULES) -> plt.Figure:
    """Every rule's mask on the best, median and worst test image, cropped around the spine, with the colour key."""
    masks = {m: combine(inputs.probs, m, inputs.threshold) for m in methods}
    truth = inputs.masks.astype(bool)
    picks = ranked_picks(inputs)
    panel = min(2.2, PAGE_WIDTH_IN / len(methods))  # inches per image
    fig, axes = plt.subplots(len(picks), len(methods), figsize=(panel * len(methods), 2.3 * len(picks) * panel / 2.2),
                             squeeze=False)
    for row, (label, index) in zip(axes, picks.items()):
        box = crop_box([truth[index], *(masks[m][index] for m in methods)])
        for ax, method in zip(row, methods):
            error_overlay(ax, inputs.images[index][box], masks[method][index][box], truth[index][box])
            dsc = per_image(masks[method][index], truth[index])["dsc"].iloc[0]
            ax.set_title(f"{rule_name(method)}\nDSC {100 * dsc:.1f}%", fontsize=8)
        row[0].set_ylabel(f"{label}\n{inputs.ids[index]}", fontsize=8)
    fig.suptitle(f"Rows: the best, median and worst image, {ranking_text(inputs.threshold)}", fontsize=9)
    fig.tight_layout()
    return fig


def dsc_boxplot(frame: pd.DataFrame, order: list[str], title: str) -> plt.Figure:
    """Per-image DSC distribution per group (method or encoder) present in `frame`, one panel per dataset, stacked."""
    data = frame[frame["group"].isin(order)].assign(DSC=lambda f: 100 * f["dsc"])
    present = [g for g in order if g in set(data["group"])]
    datasets = sorted(data["dataset"].unique())
    width = min(max(5.0, 0.7 * len(present)), MAX_WIDTH_IN)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(width, 3.6 * len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets):
        sns.boxplot(data=data[data["dataset"] == dataset], x="group", y="DSC", order=present,
                    ax=ax, color="#9ecae1", fliersize=2)
        ax.set_title(f"{title} — {dataset}")
        ax.set_xlabel("")
        ax.set_ylabel("DSC per image (%)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


RULE_COLOURS = dict(zip((*RULES, *EXTRA_RULES), plt.get_cmap("tab10").colors))
DATASET_STYLES = {"d1": "-", "d2": "--"}


def rule_labels(curves: pd.DataFrame) -> dict[str, str]:
    """Printed rule names, with max and union merged where their curves coincide (eq. 9 and 14 agree)."""
    labels = {rule: rule_name(rule) for rule in curves["method"].unique()}
    if {"max", "union"} <= set(labels):
        by_rule = curves.set_index(["method", "dataset", "threshold"])["mean_dsc"]
        if np.allclose(by_rule.loc["max"].sort_index(), by_rule.loc["union"].sort_index()):
            labels["union"] = f"{rule_name('max')} = {rule_name('union')}"
            del labels["max"]
    return labels


def threshold_plot(curves: pd.DataFrame, threshold: float) -> plt.Figure:
    """Mean DSC against the threshold T: one colour per rule, one line style per dataset, the profile's T marked."""
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    labels = rule_labels(curves)
    for (dataset, method), part in curves.groupby(["dataset", "method"], sort=False):
        if method not in labels:
            continue  # drawn under its identical twin
        ax.plot(part["threshold"], 100 * part["mean_dsc"], marker="o", ms=3, color=RULE_COLOURS.get(method),
                linestyle=DATASET_STYLES.get(dataset, ":"), label=f"{labels[method]} ({dataset})")
    ax.axvline(threshold, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("Threshold T")
    ax.set_ylabel("Mean DSC (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def threshold_explorer(inputs: EnsembleInputs, methods=RULES):
    """An ipywidgets panel: sliders for T and the image; masks and metrics recomputed from cached maps."""
    import ipywidgets as widgets
    from IPython.display import display

    truth = inputs.masks.astype(bool)

    def show(threshold: float, index: int) -> None:
        masks = {m: combine(inputs.probs[:, index], m, threshold) for m in methods}
        fig, axes = plt.subplots(1, len(methods), figsize=(2.4 * len(methods), 2.6))
        for ax, (method, mask) in zip(axes, masks.items()):
            error_overlay(ax, inputs.images[index], mask, truth[index])
            ax.set_title(rule_name(method), fontsize=8)
        plt.show()
        table = pd.concat([per_image(mask, truth[index]) for mask in masks.values()], ignore_index=True)
        table.index = [rule_name(m) for m in masks]
        display((100 * table).round(2))

    return widgets.interactive(
        show,
        threshold=widgets.SelectionSlider(options=[float(t) for t in THRESHOLD_GRID], value=0.5, description="T"),
        index=widgets.IntSlider(value=0, min=0, max=len(inputs.ids) - 1, description="image"),
    )


def _evenly_spaced(count: int, n: int) -> list[int]:
    return sorted(set(np.linspace(0, count - 1, min(n, count)).round().astype(int).tolist()))


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _samples_from_folder(folder: Path, n: int) -> Iterator[Sample]:
    frame = read_manifest(folder)
    if "labels" not in frame.columns:
        raise DatasetError(f"{folder}: the dataset has no instance labels to draw")
    for row in frame.iloc[_evenly_spaced(len(frame), n)].itertuples():
        yield Sample(id=row.id, image=_read_png(folder / row.image), mask=_read_png(folder / row.mask) > 0,
                     labels=_read_png(folder / row.labels))


OTHER_LEVEL_COLOUR = "#bbbbbb"


def _draw_outlines(ax, labels: np.ndarray, linewidth: float) -> None:
    """Th8–Th11 in their colours, every other labelled vertebra thin and grey, unknown bands hatched grey."""
    for code in np.unique(labels):
        if code in (BACKGROUND, IGNORE):
            continue
        region = NAMES[code] in REGION
        colour = REGION_COLOURS[REGION.index(NAMES[code])] if region else OTHER_LEVEL_COLOUR
        padded = np.pad(labels == code, 1).astype(float)  # closes contours that touch the border
        for contour in find_contours(padded, 0.5):
            ax.plot(contour[:, 1] - 1, contour[:, 0] - 1, color=colour, linewidth=linewidth if region else 0.4 * linewidth)
    if (labels == IGNORE).any():
        ax.contourf(labels == IGNORE, levels=[0.5, 1.5], colors="none", hatches=["////"])


def label_overlays(samples_or_dataset_folder: Sequence[Sample] | str | Path, n: int = 4) -> Figure:
    """Images with their labelled vertebrae outlined, so a reader can check the labels by eye.

    Top row: the whole image; bottom row: a zoom on Th8–Th11 with each of the four named. Grey: the
    other labelled levels; hatched: bands whose level is unknown.
    """
    if isinstance(samples_or_dataset_folder, (str, Path)):
        samples = list(_samples_from_folder(Path(samples_or_dataset_folder), n))
    else:
        pool = list(samples_or_dataset_folder)
        samples = [pool[i] for i in _evenly_spaced(len(pool), n)] if pool else []
    if not samples:
        raise DatasetError("label_overlays: no samples to draw")
    missing = [s.id for s in samples if s.labels is None]
    if missing:
        raise DatasetError(f"label_overlays: samples {missing} have no level labels to draw")

    height, width = samples[0].image.shape
    fig = Figure(figsize=(2.3 * len(samples), 2.6 + 2.6 * height / max(width, 1) / 2), layout="constrained")
    axes = fig.subplots(2, len(samples), squeeze=False)
    for (whole, zoom), sample in zip(axes.T, samples):
        rows, cols = np.nonzero(region_mask(sample.labels))
        if rows.size == 0:
            raise DatasetError(f"label_overlays: sample {sample.id!r} has no Th8–Th11")
        centre_row, centre_col = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
        half = 0.8 * max(rows.max() - rows.min(), cols.max() - cols.min()) + 4
        for ax in (whole, zoom):
            ax.imshow(sample.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest" if ax is zoom else "antialiased")
            ax.set_axis_off()
        _draw_outlines(whole, sample.labels, linewidth=0.6)
        _draw_outlines(zoom, sample.labels, linewidth=1.0)
        whole.add_patch(Rectangle((centre_col - half, centre_row - half), 2 * half, 2 * half,
                                  fill=False, edgecolor="yellow", linewidth=0.6, linestyle="--"))
        whole.set_title(sample.id, fontsize=5)
        zoom.set_xlim(centre_col - half, centre_col + half)
        zoom.set_ylim(centre_row + half, centre_row - half)
        for name, colour in zip(REGION, REGION_COLOURS):
            vertebra_rows, vertebra_cols = np.nonzero(sample.labels == CODES[name])
            if vertebra_rows.size:
                zoom.text(vertebra_cols.max() + 4, vertebra_rows.mean(), name, color=colour, fontsize=7,
                          va="center", fontweight="bold", path_effects=[withStroke(linewidth=1.5, foreground="black")])
    fig.legend(handles=[Line2D([], [], color=c, label=v) for v, c in zip(REGION, REGION_COLOURS)]
               + [Line2D([], [], color=OTHER_LEVEL_COLOUR, label="other levels")],
               loc="outside lower center", ncol=len(REGION) + 1, fontsize=7, frameon=False)
    return fig


def data_figures(study: Study, data: StudyData) -> dict[str, Figure]:
    """Fig. 1, and the labelled vertebrae of a few dataset-1 images when the dataset has labels."""
    figures = {"fig1_datasets": dataset_examples(data)}
    if "labels" in read_manifest(data.d1).columns:
        figures["label_overlays"] = label_overlays(data.d1, n=4)
    for name, figure in figures.items():
        save(figure, study, name)
    return figures


def write_figures(study: Study, data: StudyData) -> dict[str, Figure]:
    """The analysis figures: every rule's masks on the best/median/worst image, DSC box plots, DSC vs T."""
    figures, curves = {}, []
    for dataset, split in available_eval_sets(data):
        inputs = ensemble_inputs(study, data, dataset, split)
        figures[f"ensemble_masks_{dataset}"] = ensemble_overlays(inputs)
        curves.append(threshold_curves(inputs).assign(dataset=dataset))
    stage4 = load_stage_metrics(study, "stage4")
    figures["dsc_by_ensemble"] = dsc_boxplot(stage4.assign(group=stage4["group"].map(rule_name)),
                                             [rule_name(m) for m in RULES], "Ensembles")
    figures["dsc_by_encoder"] = dsc_boxplot(load_stage_metrics(study, "stage3"), CANDIDATE_ORDER, "Stage-3 models")
    figures["dsc_vs_threshold"] = threshold_plot(pd.concat(curves, ignore_index=True), inputs.threshold)
    figures |= identification_figures(study, data)
    for name, figure in figures.items():
        save(figure, study, name)
    return figures


def level_shifts(summary: pd.DataFrame, title: str) -> plt.Figure:
    """Where each model's and rule's Th8–Th11 landed: share of images per level shift (0 = the right four)."""
    columns = [c for c in summary.columns if c.startswith("Shift ")] + ["No region"]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(summary) + 1.2))
    summary[columns].plot.barh(stacked=True, ax=ax, width=0.8,
                               color=["#b2182b", "#ef8a62", "#1a9850", "#67a9cf", "#2166ac", "#bbbbbb"])
    ax.invert_yaxis()
    ax.set_xlabel("images (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=len(columns), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    return fig


def level_confusion(levels: np.ndarray, labels: np.ndarray, title: str) -> plt.Figure:
    """Predicted vs true level of every labelled vertebra (its pixels' most frequent predicted level)."""
    codes = range(1, N_LEVELS + 1)
    counts = np.zeros((N_LEVELS, N_LEVELS + 1))
    for predicted, truth in zip(levels, labels):
        for code in codes:
            on = truth == code
            if on.any():
                counts[code - 1, np.bincount(predicted[on], minlength=N_LEVELS + 1)[:N_LEVELS + 1].argmax()] += 1
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    fig.colorbar(ax.imshow(counts, cmap="Blues"), ax=ax, label="vertebrae", shrink=0.8)
    names = [NAMES[c] for c in codes]
    ax.set_xticks(range(N_LEVELS + 1), ["none", *names], rotation=90, fontsize=6)
    ax.set_yticks(range(N_LEVELS), names, fontsize=6)
    ax.set_xlabel("predicted level")
    ax.set_ylabel("true level")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def identification_figures(study: Study, data: StudyData) -> dict[str, Figure]:
    """Level shifts of every model and rule per test set; predicted vs true levels of level-aware members."""
    frame = load_identification(study)
    if frame is None:
        return {}
    figures = {}
    for dataset, part in frame.groupby("dataset"):
        masks = identification_summary(part[part["kind"] != "locator"])  # a locator's centres land nowhere as a mask
        figures[f"level_shifts_{dataset}"] = level_shifts(masks, f"Where Th8–Th11 landed — {dataset}")
        worst = worst_identifications(study, data, dataset)
        if worst is not None:
            figures[f"identification_failures_{dataset}"] = worst
        inputs = ensemble_inputs(study, data, dataset, "test")
        for name, levels in zip(inputs.names, inputs.levels):
            if levels is not None:
                slug = name.replace(" ", "_").replace("(", "").replace(")", "")
                figures[f"levels_{slug}_{dataset}"] = level_confusion(levels, inputs.labels, f"{name}, {dataset}")
    return figures


WORST_SHOWN = 6  # identification failures per test set in `worst_identifications`
CENTRE_LABELS = ("C7", "Th1", "Th8", "Th11", "L5", "S1")  # the chain's vertebrae named beside their dots


def worst_identifications(study: Study, data: StudyData, dataset: str) -> Figure | None:
    """The study's identification failures on one test set, lowest DSC first: the located variant's masks with the
    locator's chain (where the profile trains one), else the validation-best plain rule's with the centres its
    mask names; true centres in green, named ones in red. None where every image is identified."""
    inputs = ensemble_inputs(study, data, dataset, "test")
    located = Located.load(study, data)
    if located is not None and located.can_outline(inputs):
        masks, title = located.masks(inputs, dataset, "test"), rule_name(LOCATED)
        named = [chain.centres for chain in located.chains(inputs, dataset, "test")]
        names = [NAMES[code] for code in CHAIN_CODES]
    else:
        best = Learned.load(study.layout.learned).best_rule if study.layout.learned.is_file() else RANKING_RULE
        rule = best if best in (*RULES, *EXTRA_RULES) else RANKING_RULE
        masks, title = combine(inputs.probs, rule, inputs.threshold), rule_name(rule)
        named, names = [mask_centres(mask) for mask in masks], list(REGION)
    rows = identification_table(masks, inputs.labels)
    failed = np.nonzero(~rows["identified_strict"].to_numpy(dtype=bool))[0]
    if not len(failed):
        return None
    shown = failed[np.argsort(dice(masks[failed], inputs.masks[failed]), kind="stable")][:WORST_SHOWN]
    panel = min(2.2, PAGE_WIDTH_IN / len(shown))  # inches per image, the height following the images' aspect
    height, width = inputs.images.shape[1:]
    fig, axes = plt.subplots(1, len(shown), figsize=(panel * len(shown), panel * height / width + 0.9), squeeze=False)
    for ax, index in zip(axes[0], shown):
        error_overlay(ax, inputs.images[index], masks[index], inputs.masks[index].astype(bool))
        truth = vertebra_centres(inputs.labels[index])
        ax.scatter(truth[:, 1], truth[:, 0], s=6, c=TRUTH, linewidths=0)
        for (row, col), name in zip(named[index], names):
            if np.isfinite(row):
                ax.scatter([col], [row], s=8, c="red", marker="x", linewidths=0.8)
                if name in CENTRE_LABELS:
                    ax.annotate(name, (col, row), xytext=(4, 0), textcoords="offset points", fontsize=5, color="red",
                                path_effects=[withStroke(linewidth=1.5, foreground="white")])
        score = 100 * float(dice(masks[index][None], inputs.masks[index][None])[0])
        ax.set_title(f"{inputs.ids[index][-18:]}\n{rows['failure'].iloc[index]}, DSC {score:.0f} %", fontsize=6)
    fig.suptitle(f"{title}: identification failures, {dataset} test (green: true centres; red: named)", fontsize=8)
    return fig


def live_threshold_explorer(study: Study, data: StudyData, interactive: bool):
    """The ipywidgets explorer in a live session (`interactive`); in a rendered page, a pointer to the explorer
    above, which works there without a kernel."""
    if not interactive:
        from IPython.display import Markdown, display

        display(Markdown("_This explorer needs a live kernel (JupyterLab, `interactive = True`); the threshold explorer "
                         "above works in this page as it is._"))
        return None
    return threshold_explorer(ensemble_inputs(study, data, "d1", "test"))
