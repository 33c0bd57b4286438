"""Table construction: percentages, run averaging, the paper's layout and the side-by-side view."""

import numpy as np
import pandas as pd
import pytest

from spineseg.encoders import PAPER_ENCODERS
from spineseg.names import AUGMENTATION_GROUPS, METRICS, RULES, rule_name
from spineseg.study.core.artifacts import Layout
from spineseg.study.core.config import Profile
from spineseg.study.core.session import Study
from spineseg.study.report import tables
from spineseg.study.report.article import ARTICLE_ROWS, article_tables, published, side_by_side
from spineseg.study.report.tables import METRIC_COLUMNS, metric_table, min_max_mean


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


def _smoke_like(tmp_path) -> Study:
    """A study set up as the smoke profile sets its stages (no run needed: captions read the profile)."""
    profile = Profile.model_validate({"data": {"size": 128},
                                      "stage1": {"repeats": 2, "image_size": 64, "max_epochs": 2, "pretrained": "none"},
                                      "stage2": {"encoders": ["MobileNetV2", "ResNet34"], "targets": ["binary", "levels"],
                                                 "repeats": 1, "image_size": 64, "max_epochs": 2, "pretrained": "none"},
                                      "stage3": {"image_size": 64, "max_epochs": 2}})
    return Study(profile, Layout(tmp_path, "p"))


def test_write_table_formats(tmp_path):
    table = pd.DataFrame({"DSC": [88.123, float("nan")]}, index=["Soft voting", "Min"])
    study = Study(Profile(), Layout(tmp_path, "p"))
    tables.write_table(study, table, "table8")
    folder = study.layout.tables_dir
    caption = tables.caption(study, "table8")
    assert caption.startswith(tables.TABLE_CAPTIONS["table8"]) and "ensembles at T = 0.5 (article: 0.5)" in caption
    markdown = (folder / "table8.md").read_text()
    assert "88.12" in markdown and caption in markdown and "| Min         |  —    |" in markdown
    tex = (folder / "table8.tex").read_text()
    assert caption.startswith("Table 8. ")  # the display numbers it; LaTeX numbers its own tables
    assert "\\caption{" + tables.latex_text(caption.removeprefix("Table 8. ")) + "}" in tex and "Table 8" not in tex
    csv = pd.read_csv(folder / "table8.csv", index_col=0)
    assert csv.loc["Soft voting", "DSC"] == pytest.approx(88.123) and pd.isna(csv.loc["Min", "DSC"])


def test_the_latex_copy_escapes_caption_names_cells_and_note(tmp_path, monkeypatch):
    table = pd.DataFrame({"n_images": [3, 4], "Δ DSC (pp)": [1.5, float("nan")], "p_holm": ["< 0.001", "#1 & $2"]},
                         index=pd.Index(["100% ± 2 ≥ 1 – x", "a_b"], name="rule_name"))
    study = Study(Profile(), Layout(tmp_path, "p"))
    monkeypatch.setattr(tables, "table_note", lambda study, name: "note: 5 % of ρ")
    tables.write_table(study, table, "anything", title="metrics (%) of x_y & z #1 $ — Δ")
    tex = (tmp_path / "runs/p/tables/anything.tex").read_text()
    assert tex.isascii()
    assert r"\caption{metrics (\%) of x\_y \& z \#1 \$ --- $\Delta$}" in tex
    assert r"rule\_name" in tex
    assert r" & n\_images & $\Delta$ DSC (pp) & p\_holm \\" in tex
    assert r"100\% $\pm$ 2 $\geq$ 1 -- x & 3 & 1.50 & < 0.001 \\" in tex
    assert r"a\_b & 4 & --- & \#1 \& \$2 \\" in tex
    assert "\\end{tabular}}" in tex and "\\resizebox{\\linewidth}{!}" in tex  # scaled only when wider than the text
    assert "\\endgroup\n\\par\\footnotesize note: 5 \\% of $\\rho$\n\\end{table}" in tex


def test_every_caption_and_note_is_ascii_latex(tmp_path):
    study = _smoke_like(tmp_path)
    names = [*tables.TABLE_CAPTIONS, "table6", "table7"]
    for name in names:
        for text in (tables.caption(study, name), tables.table_note(study, name) or ""):
            escaped = tables.latex_text(text)
            assert escaped.isascii(), name
            bare = escaped.replace("\\%", "").replace("\\_", "").replace("\\&", "").replace("\\#", "").replace("\\$", "")
            assert not set("%_&#") & set(bare), (name, escaped)


def test_captions_say_how_each_stage_differs_from_the_article(tmp_path):
    study = _smoke_like(tmp_path)
    assert tables.caption(study, "table1").endswith(
        "this run: synthetic radiographs, from scratch, ≤ 2 epochs at 64×64, 2 training(s) per arm "
        "(article: CheXpert and VinDr-SpineXR radiographs, weights not stated, ≤ 100 epochs at 256×256, "
        "50 trainings per arm)")
    table2 = tables.caption(study, "table2")
    assert "4 candidate(s) × 1 training(s) (article: CheXpert and VinDr-SpineXR radiographs, ImageNet weights, " \
           "≤ 300 epochs at 256×256, 20 encoders × 10 trainings)" in table2
    assert "did not train show —" not in table2  # the file has no article columns: its caption says none
    assert "encoders this run did not train show —" in tables.caption(study, "table2", beside_article=True)
    smoke_encoder = Study(Profile.model_validate({"stage1": {"encoder": "MobileNetV2"}}), Layout(tmp_path, "other"))
    assert "U-Net with MobileNetV2 (article: VGG16) backbone" in tables.caption(smoke_encoder, "table1")
    assert "this run: synthetic radiographs, from scratch, ≤ 2 epochs at 64×64, the 0 selected model(s)" in \
        tables.caption(study, "table8")
    assert "HD95 and ASSD in px of the stored grid (128×128)" in tables.caption(study, "table10")
    assert "resampling patients" in tables.caption(study, "table13")


def test_tables_8_and_9_say_how_an_empty_prediction_scores_and_count_them(tmp_path):
    study = _smoke_like(tmp_path)
    assert "no pixel above T" in tables.table_note(study, "table8")
    rows = [("min", "d1", 0.0, 1.0), ("min", "d1", 0.5, 0.5), ("soft", "d1", 0.9, 0.9), ("min", "d2", 0.0, 1.0),
            ("nnunet", "d1", 0.0, 1.0)]
    frame = pd.DataFrame(rows, columns=["group", "dataset", "recall", "precision"]).assign(run=0)
    study.layout.stage_metrics("stage4").parent.mkdir(parents=True)
    frame.to_csv(study.layout.stage_metrics("stage4"), index=False)
    assert tables.table_note(study, "table8").endswith("Empty predictions in this run: Min 1 of 2, nnU-Net v2 (2d, set budget) 1 of 1.")
    frame[frame["dataset"] == "d1"].assign(recall=0.5).to_csv(study.layout.stage_metrics("stage4"), index=False)
    assert tables.table_note(study, "table8").endswith("Empty predictions in this run: none.")


def test_the_notebooks_show_a_dash_for_what_this_run_did_not_train(tmp_path, monkeypatch):
    import spineseg.study.report.display as shown

    outputs = []
    monkeypatch.setattr(shown, "display", outputs.append)
    ours = pd.DataFrame({"DSC": [88.0]}, index=["MobileNetV2"])
    shown.show_tables(_smoke_like(tmp_path), {"table2": ours})
    html = outputs[1].to_html()
    assert "did not train" in outputs[0].data and "nan" not in html.lower()
    assert html.count(">—<") == 2 * (len(published("table2")) - 1)  # this run and Δ of every other encoder
    assert "88.00" in html


def test_identification_intervals_resample_patients_not_images():
    """Two patients of ten images each, one always identified and one never: resampling patients can only
    give 0, 50 or 100 %, so the interval spans 0–100 (an image bootstrap would say about 28–72)."""
    found = [True] * 10 + [False] * 10
    frame = pd.DataFrame({"group": "soft", "kind": "rule", "patient": ["a"] * 10 + ["b"] * 10,
                          "identified": found, "identified_strict": found, "centres_identified": found,
                          "dsc": [0.9] * 10 + [0.5] * 10, "shift": [0.0] * 10 + [1.0] * 10,
                          **{f"dsc_{name}": 0.8 for name in ("Th8", "Th9", "Th10", "Th11")}})
    row = tables.identification_summary(frame, n_boot=500).iloc[0]
    for label in ("Identified strictly", "Centres identified", "Identified (coverage only)"):
        assert (row[label], row[f"{label} CI low"], row[f"{label} CI high"]) == (50, 0, 100)
    assert (row["DSC CI low"], row["DSC CI high"], row["Patients"]) == (50, 90, 2)
    assert "Identified strictly CI low" not in tables.identification_summary(frame).columns  # no n_boot, no interval


def test_each_method_is_compared_with_the_mean_position_prior_image_by_image():
    """The prior is right on the first two images of each patient; the locator on every image but one. The
    difference is paired by image and its interval resamples patients."""
    ids = [f"i{k}" for k in range(8)]
    patients = ["a"] * 4 + ["b"] * 4
    prior = [True, True, False, False] * 2
    locator = [True] * 7 + [False]
    rows = [{"group": "prior_mean", "kind": "prior", "identified_strict": p, "centres_identified": p} for p in prior]
    rows += [{"group": "locator", "kind": "locator", "identified_strict": np.nan, "centres_identified": c} for c in locator]
    frame = pd.DataFrame(rows).assign(id=ids * 2, patient=patients * 2)
    row = tables.identification_vs_prior(frame, n_boot=300).loc["Locator (its centres)"]
    assert row["Δ centres identified (pp)"] == pytest.approx(100 * (7 - 4) / 8, abs=0.01)
    assert row["Δ centres identified (pp) CI low"] <= 25.0 <= row["Δ centres identified (pp) CI high"]
    assert "Δ identified strictly (pp)" not in row.index  # the locator draws no mask: no strict criterion


def test_captions_say_which_candidates_started_from_imagenet(tmp_path):
    from spineseg.study.report.deviations import run_setting

    stage2 = {"encoders": ["MobileNetV2", "EfficientNetLite0"], "pretrained": "none",
              "encoder_weights": {"EfficientNetLite0": "imagenet"}}
    study = Study(Profile.model_validate({"stage2": stage2}), Layout(tmp_path, "mixed"))
    assert run_setting(study, "stage2").weights == "ImageNet weights for EfficientNetLite0, the others from scratch"
    every = Study(Profile.model_validate({"stage2": {**stage2, "pretrained": "imagenet"}}), Layout(tmp_path, "all"))
    assert run_setting(every, "stage2").weights == "ImageNet weights"


def test_the_identification_endpoint_compares_the_chosen_rule_with_the_chosen_model_and_the_prior(tmp_path):
    """The declared primary endpoint: paired by image, intervals by patient, Holm over the two tests."""
    from spineseg import atomic
    from spineseg.study.core.records import Learned

    study = Study(Profile.model_validate({"analysis": {"primary_endpoint": "identification", "n_boot": 200}}),
                  Layout(tmp_path, "p"))
    patients = [f"p{k // 2}" for k in range(40)]
    rows = []
    for group, kind, found in (("located", "rule", [True] * 36 + [False] * 4), ("Lite1 (levels)", "model", [True] * 20 + [False] * 20),
                               ("prior_mean", "prior", [True] * 8 + [False] * 32)):
        rows += [{"group": group, "kind": kind, "dataset": "d2", "id": f"i{k}", "patient": patients[k],
                  "identified_strict": found[k], "dsc": 0.8} for k in range(40)]
    study.layout.identification.parent.mkdir(parents=True)
    atomic.write_csv(study.layout.identification, pd.DataFrame(rows))
    Learned(0.5, {"coef": [1.0], "intercept": 0.0}, {}, ["Lite1 (levels)"], "Lite1 (levels)", "located",
            {"models": {}, "rules": {}}).save(study.layout.learned)
    row = tables.identification_endpoint(study).iloc[0]
    assert (row["Best rule"], row["Best model"]) == ("Located (locator + crop model)", "Lite1 (levels)")
    assert row["Identified strictly rule"] == 90 and row["Identified strictly prior"] == 20
    assert row["Δ rule − model (pp)"] == 40 and row["Δ rule − prior (pp)"] == 70
    assert 0 < row["Δ rule − prior (pp) CI low"] < 70 < row["Δ rule − prior (pp) CI high"] <= 100
    assert row["r rule vs prior (rank-biserial)"] == 1.0 and row["p rule vs prior (Wilcoxon by patient, Holm)"] == "<0.001"
    assert (row["patients"], row["images"]) == (20, 40)


def test_with_the_peer_enabled_the_endpoint_also_tests_the_rule_against_nnunet_holm_over_three(tmp_path):
    """nnU-Net identifies 24 of 40 images where the rule identifies 36: its arm joins the declared family, and
    Holm over three tests can only raise each p of the two-test family."""
    from spineseg import atomic
    from spineseg.study.core.records import Learned

    def endpoint(peer: bool) -> pd.Series:
        profile = {"analysis": {"primary_endpoint": "identification", "n_boot": 200}, "nnunet": {"enabled": peer}}
        study = Study(Profile.model_validate(profile), Layout(tmp_path, f"peer{int(peer)}"))
        patients = [f"p{k // 2}" for k in range(40)]
        arms = [("located", "rule", [True] * 36 + [False] * 4), ("Lite1 (levels)", "model", [True] * 30 + [False] * 10),
                ("prior_mean", "prior", [True] * 8 + [False] * 32), ("nnunet", "peer", [False] * 16 + [True] * 24)]
        rows = [{"group": group, "kind": kind, "dataset": "d2", "id": f"i{k}", "patient": patients[k],
                 "identified_strict": found[k], "dsc": 0.7 if kind == "peer" else 0.8} for group, kind, found in arms for k in range(40)]
        study.layout.identification.parent.mkdir(parents=True)
        atomic.write_csv(study.layout.identification, pd.DataFrame(rows))
        Learned(0.5, {"coef": [1.0], "intercept": 0.0}, {}, ["Lite1 (levels)"], "Lite1 (levels)", "located",
                {"models": {}, "rules": {}}).save(study.layout.learned)
        assert ("nnU-Net peer" in tables.caption(study, "identification_endpoint")) == peer
        return tables.identification_endpoint(study).iloc[0]

    with_peer, without = endpoint(True), endpoint(False)
    assert with_peer["Identified strictly peer"] == 60 and with_peer["Δ rule − peer (pp)"] == 30
    assert with_peer["DSC peer (secondary)"] == 70 and "Δ rule − peer (pp)" not in without.index
    assert with_peer["Δ rule − peer (pp) CI low"] < 30 < with_peer["Δ rule − peer (pp) CI high"]
    model_p = [float(row["p rule vs model (Wilcoxon by patient, Holm)"]) for row in (with_peer, without)]
    assert model_p[0] >= model_p[1] > 0
