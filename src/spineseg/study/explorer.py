"""A threshold explorer that works without a kernel: one Plotly figure with a slider over T.

Top: mean DSC against T for every rule that thresholds (the article's five and the extra ones), one
colour per rule and one line style per dataset, the current T marked. Bottom: the soft-voting masks
of the best, median and worst dataset-1 test images at that T, cropped around the spine, false
positives red and false negatives blue. plotly.js is embedded, so the rendered notebook and the saved
``threshold_explorer.html`` work offline; the same figure is live in JupyterLab.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spineseg import atomic
from spineseg.ensemble import THRESHOLD_GRID, combine
from spineseg.metrics import dice
from spineseg.names import EXTRA_RULES, RULES
from spineseg.study.figures import DATASET_STYLES, FALSE_NEGATIVE, FALSE_POSITIVE, RULE_COLOURS, crop_box, rule_labels
from spineseg.study.session import Study
from spineseg.study.stage0_data import StudyData
from spineseg.study.stage4_ensembles import EnsembleInputs, available_eval_sets, ensemble_inputs, threshold_curves

THRESHOLD_RULES = (*RULES, *EXTRA_RULES)
PICKS = ("best", "median", "worst")
_DASH = {"-": "solid", "--": "dash", ":": "dot"}


def _rgb(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=2)
    rgb[pred & ~truth] = FALSE_POSITIVE
    rgb[~pred & truth] = FALSE_NEGATIVE
    rgb[truth & pred] = 0.55 * rgb[truth & pred] + 0.45 * np.array([0.2, 0.8, 0.2])
    return (255 * np.clip(rgb, 0, 1)).astype(np.uint8)


def _picks(inputs: EnsembleInputs, threshold: float) -> dict[str, int]:
    order = np.argsort(dice(combine(inputs.probs, "soft", threshold), inputs.masks), kind="stable")
    return {"best": int(order[-1]), "median": int(order[len(order) // 2]), "worst": int(order[0])}


def explorer_figure(study: Study, data: StudyData) -> go.Figure:
    """The figure: curves of every thresholding rule, and three images' masks at each T of the grid."""
    sets = available_eval_sets(data)
    all_inputs = {dataset: ensemble_inputs(study, data, dataset, split) for dataset, split in sets}
    rules = [r for r in THRESHOLD_RULES if r in (*study.cfg.stage4.methods, *study.cfg.stage4.extra_methods)]
    curves = pd.concat([threshold_curves(inputs, rules).assign(dataset=d) for d, inputs in all_inputs.items()],
                       ignore_index=True)
    labels = rule_labels(curves)
    d1 = all_inputs["d1"]
    picks = _picks(d1, study.cfg.stage4.threshold)
    fig = make_subplots(rows=2, cols=3, specs=[[{"colspan": 3}, None, None], [{}, {}, {}]],
                        row_heights=[0.42, 0.58], vertical_spacing=0.16,
                        subplot_titles=["Mean DSC against T", *(f"{p}:<br>{d1.ids[i]}" for p, i in picks.items())])
    for (dataset, rule), part in curves.groupby(["dataset", "method"], sort=False):
        if rule in labels:
            fig.add_trace(go.Scatter(x=part["threshold"], y=100 * part["mean_dsc"], mode="lines+markers",
                                     name=f"{labels[rule]} ({dataset})", marker={"size": 4},
                                     line={"color": _hex(RULE_COLOURS.get(rule)), "dash": _DASH[DATASET_STYLES.get(dataset, ":")]}),
                          row=1, col=1)
    fixed = len(fig.data)
    profile_masks = combine(d1.probs, "soft", study.cfg.stage4.threshold)
    boxes = {p: crop_box([d1.masks[i], profile_masks[i]]) for p, i in picks.items()}
    start = int(np.argmin(np.abs(THRESHOLD_GRID - study.cfg.stage4.threshold)))  # the grid's T nearest the profile's
    for k, t in enumerate(THRESHOLD_GRID):
        masks = combine(d1.probs, "soft", float(t))
        for column, (pick, index) in enumerate(picks.items(), start=1):
            box = boxes[pick]
            rgb = _rgb(d1.images[index][box], masks[index][box], d1.masks[index][box].astype(bool))
            fig.add_trace(go.Image(z=rgb, visible=k == start, hoverinfo="skip",
                                   name=f"soft voting, T = {t:.2f}"), row=2, col=column)
    steps = []
    for k, t in enumerate(THRESHOLD_GRID):
        visible = [True] * fixed + [False] * (len(fig.data) - fixed)
        for column in range(len(picks)):
            visible[fixed + k * len(picks) + column] = True
        steps.append({"method": "update", "label": f"{t:.2f}", "args": [{"visible": visible}, {"shapes": [_marker(t)]}]})
    fig.update_layout(sliders=[{"active": start, "currentvalue": {"prefix": "T = "}, "steps": steps, "pad": {"t": 30}}],
                      shapes=[_marker(THRESHOLD_GRID[start])], height=760, width=900, legend={"font": {"size": 9}},
                      title="Soft-voting masks of three dataset-1 test images, and every rule's DSC, as T varies")
    fig.update_xaxes(title_text="T", row=1, col=1)
    fig.update_yaxes(title_text="mean DSC (%)", row=1, col=1)
    for column in range(1, 4):
        fig.update_xaxes(visible=False, row=2, col=column)
        fig.update_yaxes(visible=False, row=2, col=column)
    return fig


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

