"""Table construction: percentages, run averaging, the paper's layout and the side-by-side view."""

import pandas as pd
import pytest

from spineseg.encoders import PAPER_ENCODERS
from spineseg.names import AUGMENTATION_GROUPS, METRICS, RULES, rule_name
from spineseg.study import tables
from spineseg.study.article import ARTICLE_ROWS, article_tables, published, side_by_side
from spineseg.study.artifacts import Layout
from spineseg.study.config import Profile
from spineseg.study.session import Study
from spineseg.study.tables import METRIC_COLUMNS, metric_table, min_max_mean


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


def test_every_row_and_column_of_tables_1_to_9_finds_its_published_value():
    for number in range(1, 10):
        name = f"table{number}"
        spec = article_tables()["tables"][name]
        values = published(name)
        assert list(values.columns) == spec["columns"] == METRIC_COLUMNS, name
        assert len(values) == len(spec["rows"]) and values.notna().all().all(), name
        for article_label, row in spec["rows"].items():
            ours = ARTICLE_ROWS.get(article_label, article_label)
            for column, value in row.items():
                assert values.loc[ours, column] == value, (name, article_label, column)
    # the article's labels land on this project's row names
    assert set(published("table8").index) == {rule_name(m) for m in RULES}
    assert set(published("table1").index) == set(AUGMENTATION_GROUPS.values())
    assert set(published("table2").index) == set(PAPER_ENCODERS)


def test_side_by_side_shows_this_run_the_article_and_the_difference_in_the_articles_order():
    ours = pd.DataFrame({"IoU": [80.0, 81.0], "DSC": [88.0, 94.0]}, index=["Max", "Soft voting"])
    view = side_by_side("table8", ours)
    assert list(view.columns[:3]) == [("IoU", "this run"), ("IoU", "article"), ("IoU", "Δ pp")]
    assert list(view.index) == ["Min", "Max", "Soft voting", "Shape averaging", "Union"]  # the article's order
    assert view.loc["Soft voting", ("DSC", "article")] == 94.21
    assert view.loc["Soft voting", ("DSC", "Δ pp")] == pytest.approx(-0.21)
    assert pd.isna(view.loc["Min", ("DSC", "this run")]) and view.loc["Min", ("DSC", "article")] == 91.77


def test_write_table_formats(tmp_path):
    table = pd.DataFrame({"DSC": [88.123]}, index=["Soft voting"])
    study = Study(Profile(), Layout(tmp_path, "p"))
    tables.write_table(study, table, "table8")
    folder = study.layout.tables_dir
    caption = tables.caption(study, "table8")
    assert caption.startswith(tables.TABLE_CAPTIONS["table8"]) and "this run: ensembles of 0 model(s) (article: 10)" in caption
    assert "88.12" in (folder / "table8.md").read_text() and caption in (folder / "table8.md").read_text()
    assert f"\\caption{{{caption}}}" in (folder / "table8.tex").read_text()
    assert pd.read_csv(folder / "table8.csv", index_col=0).loc["Soft voting", "DSC"] == pytest.approx(88.123)
