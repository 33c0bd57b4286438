"""Publication figures: each saved as a 300-dpi PNG and a PDF under ``figures/<profile>/``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from spineseg.data import load_split
from spineseg.ensemble import METHODS, PAPER_NAMES, combine
from spineseg.metrics import per_image
from spineseg.runs import StudyData
from spineseg.study import EnsembleInputs

FALSE_POSITIVE = (0.9, 0.1, 0.1)
FALSE_NEGATIVE = (0.1, 0.4, 1.0)
TRUTH = "#2ca02c"


def save(fig: plt.Figure, folder: Path, name: str, dpi: int = 300) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
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


def _error_overlay(ax, image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> None:
    rgb = np.repeat(image[..., None], 3, axis=2)
    rgb[pred & ~truth] = FALSE_POSITIVE
    rgb[~pred & truth] = FALSE_NEGATIVE
    ax.imshow(rgb)
    ax.contour(truth, levels=[0.5], colors=TRUTH, linewidths=0.6)
    ax.set_xticks([])
    ax.set_yticks([])


def ensemble_overlays(inputs: EnsembleInputs, images: np.ndarray, threshold: float = 0.5,
                      methods=METHODS) -> plt.Figure:
    """Every rule's mask on the best, median and worst test image (ranked by soft-voting DSC).

    Ground-truth contour in green; false positives red, false negatives blue.
    """
    masks = {m: combine(inputs.probs, m, threshold) for m in methods}
    truth = inputs.masks.astype(bool)
    order = np.argsort(per_image(masks["soft"], truth)["dsc"].to_numpy(), kind="stable")
    picks = {"best": order[-1], "median": order[len(order) // 2], "worst": order[0]}
    fig, axes = plt.subplots(len(picks), len(methods), figsize=(2.2 * len(methods), 2.3 * len(picks)), squeeze=False)
    for row, (label, index) in zip(axes, picks.items()):
        for ax, method in zip(row, methods):
            _error_overlay(ax, images[index], masks[method][index], truth[index])
            dsc = per_image(masks[method][index], truth[index])["dsc"].iloc[0]
            ax.set_title(f"{PAPER_NAMES[method]}\nDSC {100 * dsc:.1f}%", fontsize=8)
        row[0].set_ylabel(f"{label}\n{inputs.ids[index]}", fontsize=8)
    fig.tight_layout()
    return fig


def dsc_boxplot(frame: pd.DataFrame, order: list[str], title: str) -> plt.Figure:
    """Per-image DSC distribution per group (method or encoder), one panel per dataset."""
    data = frame[frame["group"].isin(order)].assign(DSC=lambda f: 100 * f["dsc"])
    datasets = sorted(data["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(5, 0.7 * len(order)) * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        sns.boxplot(data=data[data["dataset"] == dataset], x="group", y="DSC", order=[g for g in order if g in set(data["group"])],
                    ax=ax, color="#9ecae1", fliersize=2)
        ax.set_title(f"{title} — {dataset}")
        ax.set_xlabel("")
        ax.set_ylabel("DSC per image (%)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def threshold_plot(curves: pd.DataFrame, threshold: float) -> plt.Figure:
    """Mean DSC against the threshold T for each rule, with the paper's T marked."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (dataset, method), part in curves.groupby(["dataset", "method"]):
        ax.plot(part["threshold"], 100 * part["mean_dsc"], marker="o", ms=3,
                label=f"{PAPER_NAMES[method]} ({dataset})", linestyle="-" if dataset == "d1" else "--")
    ax.axvline(threshold, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("Threshold T")
    ax.set_ylabel("Mean DSC (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def threshold_explorer(inputs: EnsembleInputs, images: np.ndarray, methods=METHODS):
    """An ipywidgets panel: sliders for T and the image; masks and metrics recomputed from cached maps."""
    import ipywidgets as widgets
    from IPython.display import display

    truth = inputs.masks.astype(bool)

    def show(threshold: float, index: int) -> None:
        masks = {m: combine(inputs.probs[:, index], m, threshold) for m in methods}
        fig, axes = plt.subplots(1, len(methods), figsize=(2.4 * len(methods), 2.6))
        for ax, (method, mask) in zip(axes, masks.items()):
            _error_overlay(ax, images[index], mask, truth[index])
            ax.set_title(PAPER_NAMES[method], fontsize=8)
        plt.show()
        table = pd.concat([per_image(mask, truth[index]) for mask in masks.values()], ignore_index=True)
        table.index = [PAPER_NAMES[m] for m in masks]
        display((100 * table).round(2))

    return widgets.interactive(
        show,
        threshold=widgets.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="T"),
        index=widgets.IntSlider(value=0, min=0, max=len(inputs.ids) - 1, description="image"),
    )
