"""What the notebooks show: captioned tables (beside the article's values) and figures, each in one call."""

from __future__ import annotations

import base64
from collections.abc import Mapping

import matplotlib.pyplot as plt
import pandas as pd
from IPython.core.pylabtools import print_figure
from IPython.display import Markdown, display

from spineseg.names import candidate_name
from spineseg.study.core.artifacts import read_table
from spineseg.study.core.session import Study
from spineseg.study.report.article import side_by_side
from spineseg.study.report.figures import figure_caption
from spineseg.study.report.tables import MISSING, caption, table_note
from spineseg.study.stages.stage2_selection import selected_candidates

WHOLE = {"display.max_rows": None, "display.max_columns": None, "display.width": None,
         "display.float_format": "{:.2f}".format}


def show_tables(study: Study, tables: Mapping[str, pd.DataFrame], captions: Mapping[str, str] | None = None) -> None:
    """Each table whole under its caption and above its note; the article's tables beside its published values
    (— where this run has none); the Wilcoxon tests by family (DSC first, significant rows marked); Table 13 one
    table at a time."""
    with pd.option_context(*[item for pair in WHOLE.items() for item in pair]):
        for name, table in tables.items():
            display(Markdown(f"**{(captions or {}).get(name) or caption(study, name, beside_article=True)}**"))
            if name == "wilcoxon_readable":
                _show_wilcoxon(table)
            elif name == "table13":
                for part, rows in table.groupby("table", sort=False):
                    display(Markdown(f"_{part.replace('table', 'Table ')}_"))
                    display(rows.drop(columns="table").reset_index(drop=True))
            else:
                display(side_by_side(name, table).style.format(precision=2, na_rep=MISSING))
            note = table_note(study, name)
            if note:
                display(Markdown(f"_{note}_"))


def _show_wilcoxon(table: pd.DataFrame) -> None:
    metric_order = {"dsc": 0, "iou": 1}
    for family, rows in table.groupby("family", sort=False):
        rows = rows.sort_values(["metric", "dataset"], key=lambda c: c.map(metric_order) if c.name == "metric" else c,
                                kind="stable").drop(columns="family").reset_index(drop=True)
        marked = rows.style.apply(lambda row: ["font-weight: bold" if row["significant"] == "yes" else ""] * len(row), axis=1)
        display(Markdown(f"_{family}_ (bold: significant after Holm correction)"))
        display(marked.hide(axis="index"))


def show_figures(figures: Mapping[str, plt.Figure]) -> None:
    """Display saved figures inline, each above its caption and with the caption as its alt text (which the
    report's HTML carries), then free them."""
    for name, figure in figures.items():
        text = f"Figure {name}: {figure_caption(name)}"
        png = base64.b64encode(print_figure(figure, "png", bbox_inches="tight")).decode("ascii")
        display({"image/png": png, "text/plain": text}, raw=True, metadata={"image/png": {"alt": text}})
        display(Markdown(f"_{text}_"))
        plt.close(figure)


def show_selection(study: Study) -> None:
    """Stage 2's validation ranking and the encoders it selected."""
    section = study.cfg.stage2
    display(Markdown(f"**Validation ranking** (threshold {section.min_val_dsc}, top {section.top_k})"))
    display(read_table(study.layout.ranking).round(4))
    display(Markdown("**Selected:** " + ", ".join(candidate_name(*c) for c in selected_candidates(study))))


def show_stage6(study: Study, data) -> None:
    """Run stage 6 (unless the profile turns it off) and show its tables and figures."""
    from spineseg.study.report.architectures import stage6_captions, stage6_figures, stage6_tables
    from spineseg.study.stages.stage6_architectures import run_stage6

    if not study.cfg.architectures.enabled:
        display(Markdown(f"_Stage 6 is off in the profile `{study.name}` (`architectures.enabled: false`)._"))
        return
    run_stage6(study, data)
    show_tables(study, stage6_tables(study), stage6_captions(study))
    show_figures(stage6_figures(study))
