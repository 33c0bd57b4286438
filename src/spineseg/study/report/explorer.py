"""A threshold explorer that works without a kernel: one Plotly figure with a slider over T.

Top: mean DSC against T for every rule that thresholds (the article's five and the extra ones), one
colour per rule and one line style per dataset (each keyed once), the current T marked. Bottom: the
soft-voting masks of the best, median and worst dataset-1 test images (ranked by soft-voting DSC at the
profile's T) at that T, each titled with its DSC at that T, cropped around the spine, in the colours of
every mask figure (`figures.MASK_KEY`, keyed in the legend) with the truth outlined. plotly.js is
embedded, so the rendered notebook and the saved ``threshold_explorer.html`` work offline; the same
figure is live in JupyterLab.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from skimage.measure import find_contours

from spineseg import atomic
from spineseg.ensemble import THRESHOLD_GRID, combine
from spineseg.metrics import dice
from spineseg.names import EXTRA_RULES, RULES
from spineseg.study.core.session import Study, StudyData
from spineseg.study.report.figures import (
    DATASET_STYLES,
    MASK_KEY,
    RULE_COLOURS,
    TRUTH,
    crop_box,
    error_rgb,
    ranked_picks,
    ranking_text,
    rule_labels,
)
from spineseg.study.stages.ensemble_inputs import available_eval_sets, ensemble_inputs
from spineseg.study.stages.stage4_ensembles import threshold_curves

THRESHOLD_RULES = (*RULES, *EXTRA_RULES)
DATASET_NAMES = {"d1": "dataset 1 test", "d2": "dataset 2"}
_DASH = {"-": "solid", "--": "dash", ":": "dot"}


def _rgb(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return (255 * np.clip(error_rgb(image, pred, truth), 0, 1)).astype(np.uint8)


def _truth_outline(truth: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """The truth's contours as one line (x, y) broken by None: drawn over the image at every T."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    for contour in find_contours(np.pad(truth, 1).astype(float), 0.5):  # padded: contours touching the border close
        xs += [*(contour[:, 1] - 1), None]
        ys += [*(contour[:, 0] - 1), None]
    return xs, ys


def _key_traces() -> list[go.Scatter]:
    """The mask colours and the truth outline as legend entries (an image has no legend of its own)."""
    squares = [go.Scatter(x=[None], y=[None], mode="markers", name=label, legendgroup="key",
                          marker={"symbol": "square", "size": 10, "color": _hex(colour)})
               for label, colour in MASK_KEY.items()]
    return [*squares, go.Scatter(x=[None], y=[None], mode="lines", name="truth outline", legendgroup="key",
                                 line={"color": TRUTH})]


def explorer_figure(study: Study, data: StudyData) -> go.Figure:
    """The figure: curves of every thresholding rule, and three images' masks at each T of the grid."""
    sets = available_eval_sets(data)
    all_inputs = {dataset: ensemble_inputs(study, data, dataset, split) for dataset, split in sets}
    rules = [r for r in THRESHOLD_RULES if r in (*study.cfg.stage4.methods, *study.cfg.stage4.extra_methods)]
    curves = pd.concat([threshold_curves(inputs, rules).assign(dataset=d) for d, inputs in all_inputs.items()],
                       ignore_index=True)
    labels = rule_labels(curves)
    d1 = all_inputs["d1"]
    picks = ranked_picks(d1)
    fig = make_subplots(rows=2, cols=3, specs=[[{"colspan": 3}, None, None], [{}, {}, {}]],
                        row_heights=[0.42, 0.58], vertical_spacing=0.16,
                        subplot_titles=["Mean DSC against T", *(f"{p}:<br>{d1.ids[i]}" for p, i in picks.items())])
    start = int(np.argmin(np.abs(THRESHOLD_GRID - d1.threshold)))  # the grid's T nearest the profile's
    for trace in _key_traces():
        fig.add_trace(trace, row=1, col=1)
    for dataset in all_inputs:  # the line style of each dataset, keyed once rather than beside every rule
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=DATASET_NAMES.get(dataset, dataset),
                                 legendgroup="datasets", line={"color": "grey", "dash": _dash(dataset)}), row=1, col=1)
    first = next(iter(all_inputs))
    for (dataset, rule), part in curves.groupby(["dataset", "method"], sort=False):
        if rule in labels:
            fig.add_trace(go.Scatter(x=part["threshold"], y=100 * part["mean_dsc"], mode="lines+markers",
                                     name=labels[rule], legendgroup=rule, showlegend=dataset == first, marker={"size": 4},
                                     line={"color": _hex(RULE_COLOURS.get(rule)), "dash": _dash(dataset)}),
                          row=1, col=1)
    fixed = len(fig.data)
    profile_masks = combine(d1.probs, "soft", d1.threshold)
    boxes = {p: crop_box([d1.masks[i], profile_masks[i]]) for p, i in picks.items()}
    dsc = np.zeros((len(THRESHOLD_GRID), len(d1.ids)))  # each image's DSC at each T of the grid, for the titles
    for k, t in enumerate(THRESHOLD_GRID):
        masks = combine(d1.probs, "soft", float(t))
        dsc[k] = dice(masks, d1.masks)
        for column, (pick, index) in enumerate(picks.items(), start=1):
            box = boxes[pick]
            rgb = _rgb(d1.images[index][box], masks[index][box], d1.masks[index][box].astype(bool))
            fig.add_trace(go.Image(z=rgb, visible=k == start, hoverinfo="skip",
                                   name=f"soft voting, T = {t:.2f}"), row=2, col=column)
    images = len(fig.data) - fixed
    for column, (pick, index) in enumerate(picks.items(), start=1):  # after the images, so drawn over them
        xs, ys = _truth_outline(d1.masks[index][boxes[pick]].astype(bool))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": TRUTH, "width": 1}, hoverinfo="skip",
                                 showlegend=False), row=2, col=column)
    outlines = len(fig.data) - fixed - images
    steps = []
    for k, t in enumerate(THRESHOLD_GRID):
        visible = [True] * fixed + [False] * images + [True] * outlines
        for column in range(len(picks)):
            visible[fixed + k * len(picks) + column] = True
        titles = {f"annotations[{column}].text": _panel_title(pick, d1.ids[index], dsc[k, index])
                  for column, (pick, index) in enumerate(picks.items(), start=1)}  # annotation 0: the curves' title
        steps.append({"method": "update", "label": f"{t:.2f}",
                      "args": [{"visible": visible}, {"shapes": [_marker(t)], **titles}]})
    fig.update_layout(sliders=[{"active": start, "currentvalue": {"prefix": "T = "}, "steps": steps, "pad": {"t": 30}}],
                      shapes=[_marker(THRESHOLD_GRID[start])], height=760, width=900, legend={"font": {"size": 9}},
                      title="Soft-voting masks of three dataset-1 test images, and every rule's DSC, as T varies<br>"
                            f"<sup>best, median and worst image {ranking_text(d1.threshold)}</sup>")
    for column, (pick, index) in enumerate(picks.items(), start=1):
        fig.layout.annotations[column].text = _panel_title(pick, d1.ids[index], dsc[start, index])
    fig.update_xaxes(title_text="T", row=1, col=1)
    fig.update_yaxes(title_text="mean DSC (%)", row=1, col=1)
    for column in range(1, 4):
        fig.update_xaxes(visible=False, row=2, col=column)
        fig.update_yaxes(visible=False, row=2, col=column)
    return fig


def _panel_title(pick: str, image_id: str, dsc: float) -> str:
    return f"{pick}: {image_id}<br>DSC {100 * dsc:.0f} % at this T"


def _dash(dataset: str) -> str:
    return _DASH[DATASET_STYLES.get(dataset, ":")]


def _marker(t: float) -> dict:
    return {"type": "line", "xref": "x", "yref": "y domain", "x0": float(t), "x1": float(t), "y0": 0.0, "y1": 1.0,
            "line": {"color": "grey", "dash": "dot", "width": 1}}


def _hex(colour) -> str | None:
    if colour is None:
        return None
    return "#" + "".join(f"{int(255 * c):02x}" for c in colour[:3])


def write_explorer(study: Study, data: StudyData):
    """Save ``figures/<profile>/threshold_explorer.html`` (offline) and return it for display in a notebook."""
    from IPython.display import HTML

    fig = explorer_figure(study, data)
    atomic.write_text(study.layout.figure("threshold_explorer", "html"), fig.to_html(include_plotlyjs=True, full_html=True))
    return HTML(fig.to_html(include_plotlyjs=True, full_html=False))

