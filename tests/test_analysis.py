"""Table construction: percentages, run averaging, the paper's layout and the side-by-side view."""

import pandas as pd
import pytest

from spineseg.names import METRICS
from spineseg.study import tables
from spineseg.study.artifacts import Layout
from spineseg.study.config import Profile
from spineseg.study.session import Study
from spineseg.study.tables import METRIC_COLUMNS, metric_table, min_max_mean, side_by_side


def _frame(rows):
    frame = pd.DataFrame(rows, columns=["group", "run", "dataset", "id", "dsc"])
    for metric in METRICS:
        if metric != "dsc":
            frame[metric] = frame["dsc"]
    return frame


def test_metric_table_averages_images_then_runs_and_keeps_the_given_order():
    frame = _frame([
        ("B", 0, "d1", "a", 0.5), ("B", 0, "d1", "b", 0.7),  # run mean 0.6
        ("B", 1, "d1", "a", 0.9), ("B", 1, "d1", "b", 0.9),  # run mean 0.9
        ("A", 0, "d1", "a", 0.2), ("A", 0, "d1", "b", 0.4),
        ("A", 0, "d2", "a", 1.0),
    ])
    table = metric_table(frame, "d1", ["A", "B", "C"])
    assert list(table.index) == ["A", "B"] and list(table.columns) == METRIC_COLUMNS
    assert table.loc["A", "DSC"] == pytest.approx(30.0)
    assert table.loc["B", "DSC"] == pytest.approx(75.0)


def test_min_max_mean_rows():
    table = pd.DataFrame({"DSC": [80.0, 90.0, 85.0]}, index=["x", "y", "z"])
    out = min_max_mean(table)
    assert list(out.index) == ["Min", "Max", "Mean"]
    assert out["DSC"].tolist() == [80.0, 90.0, 85.0]


def test_side_by_side_aligns_published_values_in_the_papers_column_order(monkeypatch):
    published = {"_source": "", "tables": {"table8": {"caption": "", "values": {"Soft voting": {"DSC": 91.25}}}}}
    monkeypatch.setattr(tables, "paper_tables", lambda: published)
    ours = pd.DataFrame({"IoU": [80.0, 81.0], "DSC": [88.0, 89.0]}, index=["Max", "Soft voting"])
    view = side_by_side("table8", ours)
    assert list(view.columns) == [("IoU", "this run"), ("IoU", "paper"), ("DSC", "this run"), ("DSC", "paper")]
    assert view.loc["Soft voting", ("DSC", "paper")] == 91.25
    assert pd.isna(view.loc["Max", ("DSC", "paper")])
    assert view.loc["Max", ("IoU", "this run")] == 80.0


def test_write_table_formats(tmp_path):
    table = pd.DataFrame({"DSC": [88.123]}, index=["Soft voting"])
    study = Study(Profile(), Layout(tmp_path, "p"))
    tables.write_table(study, table, "table8")
    folder = study.layout.tables_dir
    caption = tables.TABLE_CAPTIONS["table8"]
    assert "88.12" in (folder / "table8.md").read_text() and caption in (folder / "table8.md").read_text()
    assert f"\\caption{{{caption}}}" in (folder / "table8.tex").read_text()
    assert pd.read_csv(folder / "table8.csv", index_col=0).loc["Soft voting", "DSC"] == pytest.approx(88.123)
