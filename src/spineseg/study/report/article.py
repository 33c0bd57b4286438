"""The article's published Tables 1–9 (``resources/paper_tables.json``), in this project's row labels.

The article names some rows differently ("Min voting", "Union ensemble"); `ARTICLE_ROWS` maps them to
the labels of this project's tables, and every side-by-side table keeps the article's row order.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import pandas as pd

from spineseg.names import rule_name

# The article's row label → this project's, where they differ.
ARTICLE_ROWS = {"Min voting": rule_name("min"), "Max voting": rule_name("max"), "Union ensemble": rule_name("union")}
THIS_RUN, ARTICLE, DIFFERENCE = "this run", "article", "Δ pp"


@cache
def article_tables() -> dict:
    return json.loads(resources.files("spineseg").joinpath("resources/paper_tables.json").read_text())


def published(name: str) -> pd.DataFrame | None:
    """The article's values of a table (rows in its order, under this project's labels), or None."""
    spec = article_tables()["tables"].get(name)
    if spec is None:
        return None
    frame = pd.DataFrame.from_dict(spec["rows"], orient="index")[spec["columns"]].astype(float)
    frame.index = [ARTICLE_ROWS.get(label, label) for label in frame.index]
    return frame


def caption(name: str) -> str | None:
    spec = article_tables()["tables"].get(name)
    return None if spec is None else f"Table {name.removeprefix('table')}. {spec['title']}"


def side_by_side(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """For each metric: this run, the article and the difference in percentage points.

    Rows follow the article's order; rows only one side has keep their place (the article's first) with
    the other side missing.
    """
    paper = published(name)
    if paper is None:
        return table
    rows = [*paper.index, *(row for row in table.index if row not in paper.index)]
    ours, theirs = table.reindex(index=rows), paper.reindex(index=rows, columns=table.columns)
    parts = {THIS_RUN: ours, ARTICLE: theirs, DIFFERENCE: (ours - theirs).round(2)}
    both = pd.concat(parts, axis=1).swaplevel(axis=1)
    return both[pd.MultiIndex.from_product([table.columns, list(parts)])]
