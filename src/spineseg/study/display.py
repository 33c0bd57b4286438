"""What the notebooks show: captioned tables (beside the article's values) and figures, each in one call."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from spineseg.study.article import side_by_side
from spineseg.study.artifacts import read_table
from spineseg.study.session import Study
from spineseg.study.stage2_selection import selected_encoders
from spineseg.study.tables import TABLE_CAPTIONS, TABLE_NOTES


def show_tables(tables: Mapping[str, pd.DataFrame]) -> None:
    """Each table under its caption; the article's tables beside its published values."""
    for name, table in tables.items():
        display(Markdown(f"**{TABLE_CAPTIONS.get(name, name)}**"))
        display(side_by_side(name, table))
        if name in TABLE_NOTES:
            display(Markdown(f"_{TABLE_NOTES[name]}_"))


def show_figures(figures: Mapping[str, plt.Figure]) -> None:
    """Display saved figures inline, then free them."""
    for figure in figures.values():
        display(figure)
        plt.close(figure)


def show_selection(study: Study) -> None:
    """Stage 2's validation ranking and the encoders it selected."""
    section = study.cfg.stage2
    display(Markdown(f"**Validation ranking** (threshold {section.min_val_dsc}, top {section.top_k})"))
    display(read_table(study.layout.ranking).round(4))
    display(Markdown("**Selected:** " + ", ".join(selected_encoders(study))))
