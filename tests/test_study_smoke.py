"""The `smoke` profile end to end through papermill, in a throwaway copy of the project."""

import json
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spineseg.encoders import PAPER_ENCODERS
from spineseg.errors import ConfigError, NotebookFailed
from spineseg.names import RULES, rule_name
from spineseg.study.artifacts import read_table
from spineseg.study.runner import NOTEBOOKS, run_study
from spineseg.study.tables import METRIC_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _copy_project(root: Path) -> Path:
    for item in ("params", "notebooks"):
        shutil.copytree(ROOT / item, root / item)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = _copy_project(tmp_path_factory.mktemp("smoke_project"))
    run_study(root, "smoke", log=lambda message: None)
    return root


def test_every_notebook_executed_without_errors(project):
    for name in NOTEBOOKS:
        rendered = project / "runs/smoke/notebooks" / f"{name}.ipynb"
        assert rendered.is_file() and rendered.with_suffix(".html").is_file()
        cells = [c for c in json.loads(rendered.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] is not None for c in cells), name
        assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"], name


def _table(project: Path, number: int) -> pd.DataFrame:
    folder = project / "runs/smoke/tables"
    for suffix in ("csv", "md", "tex"):
        assert (folder / f"table{number}.{suffix}").is_file(), f"table{number}.{suffix}"
    return pd.read_csv(folder / f"table{number}.csv", index_col=0)


def test_tables_1_to_9_have_the_papers_rows_and_columns(project):
    article_order = ["Min", "Max", "Soft voting", "Shape averaging", "Union"]
    expected_rows = {
        1: ["With augmentation", "Without augmentation"],  # the article's order
        6: ["Min", "Max", "Mean"], 7: ["Min", "Max", "Mean"],
        8: article_order, 9: article_order,
    }
    for number in range(1, 10):
        table = _table(project, number)
        assert list(table.columns) == METRIC_COLUMNS, number
        if number in expected_rows:
            assert list(table.index) == expected_rows[number], number
        else:  # encoder tables: paper names, in the paper's order
            assert list(table.index) == [e for e in PAPER_ENCODERS if e in set(table.index)], number
        values = table.to_numpy(dtype=float)
        assert np.all((values >= 0) & (values <= 100)), number


def test_f1_equals_dsc_per_image(project):
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        frame = pd.read_csv(project / "runs/smoke" / stage / "metrics_test.csv")
        assert len(frame) > 0
        np.testing.assert_allclose(frame["f1"], frame["dsc"], atol=1e-12)


def test_wilcoxon_table_has_the_expected_pairs(project):
    tests = pd.read_csv(project / "runs/smoke/tables/wilcoxon.csv")
    rules = tests[tests["family"] == "ensemble rules"]
    names = [rule_name(m) for m in RULES]
    for dataset in ("d1", "d2"):
        for metric in ("dsc", "iou"):
            got = rules[(rules["dataset"] == dataset) & (rules["metric"] == metric)]
            assert {frozenset(p) for p in zip(got["a"], got["b"])} == {frozenset(p) for p in combinations(names, 2)}
    singles = tests[tests["family"] == "soft voting vs single models"]
    assert set(singles["a"]) == {"Soft voting"} and set(singles["b"]) == {"MobileNetV2", "ResNet34"}
    augmentation = tests[tests["family"] == "augmentation (paired by seed)"]
    assert set(zip(augmentation["a"], augmentation["b"])) == {("With augmentation", "Without augmentation")}
    assert (augmentation["n"] == 2).all()  # two seeds, paired
    assert (tests["p_holm"].dropna() >= tests.loc[tests["p_holm"].notna(), "p"] - 1e-12).all()


def test_figures_exist_as_png_and_pdf(project):
    folder = project / "figures/smoke"
    for name in ("fig1_datasets", "ensemble_masks_d1", "ensemble_masks_d2", "dsc_by_ensemble",
                 "dsc_by_encoder", "dsc_vs_threshold"):
        assert (folder / f"{name}.png").stat().st_size > 0 and (folder / f"{name}.pdf").stat().st_size > 0


def test_rerun_skips_finished_training_runs(project):
    weights = sorted((project / "runs/smoke/train").glob("stage2-*/best.pt"))
    before = [w.stat().st_mtime_ns for w in weights]
    run_study(project, "smoke", stages=[2], log=lambda message: None)
    assert [w.stat().st_mtime_ns for w in weights] == before


def test_bad_override_fails_before_any_notebook_runs(project, tmp_path):
    fresh = _copy_project(tmp_path)
    with pytest.raises(ConfigError, match="stage2.repeats"):
        run_study(fresh, "smoke", overrides={"stage2.repeats": "many"})
    assert not (fresh / "runs").exists()


def test_a_failing_notebook_names_itself_and_the_error(tmp_path):
    fresh = _copy_project(tmp_path)
    with pytest.raises(NotebookFailed) as info:  # stage 3 before stage 2: no selection yet
        run_study(fresh, "smoke", stages=[3], log=lambda message: None)
    message = str(info.value)
    assert "03_final_training.ipynb" in message and "StageOrderError" in message and "run stage 2" in message


def test_a_dead_kernel_names_the_notebook_the_likely_cause_and_the_resume(tmp_path):
    import nbformat

    fresh = _copy_project(tmp_path)
    notebook = nbformat.read(fresh / "notebooks/00_data.ipynb", as_version=4)
    notebook.cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    notebook.cells.append(nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"))
    nbformat.write(notebook, fresh / "notebooks/00_data.ipynb")
    with pytest.raises(NotebookFailed) as info:
        run_study(fresh, "smoke", stages=[0], log=lambda message: None)
    message = str(info.value)
    assert "00_data" in message and "kernel" in message and "memory" in message and "rerun the same command" in message


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    fresh = _copy_project(tmp_path)
    # like a terminal: the whole foreground process group gets SIGINT
    child = subprocess.Popen([sys.executable, "-m", "spineseg", "run", "--profile", "smoke"], cwd=fresh,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (fresh / "runs/smoke/notebooks/01_augmentation.ipynb").exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.5)
    time.sleep(5)  # inside stage 1's training
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert err.rstrip().splitlines()[-1] == "spineseg: interrupted; rerun the same command to resume"
    assert "Traceback" not in err


PAPER_IN_MINIATURE = {
    "data.size": 64, "data.d1_count": 20, "data.d2_count": 4,
    "stage1.repeats": 1, "stage1.image_size": 32, "stage1.max_epochs": 1,
    "stage2.encoders": ["None"], "stage2.repeats": 1, "stage2.image_size": 32, "stage2.max_epochs": 1,
    "stage2.min_val_dsc": 0.0,
}


def test_the_paper_profile_in_miniature_trains_the_plain_unet_offline_and_stops_clearly_for_imagenet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no weights cached here, and no network
    fresh = _copy_project(tmp_path)
    run_study(fresh, "paper", stages=[0, 2], overrides=PAPER_IN_MINIATURE, log=lambda message: None)
    ranking = read_table(fresh / "runs/paper/stage2/ranking.csv")
    assert ranking["encoder"].tolist() == ["None"] and ranking["selected"].all()
    with pytest.raises(NotebookFailed) as info:  # stage 1's VGG16 wants ImageNet weights
        run_study(fresh, "paper", stages=[1], overrides=PAPER_IN_MINIATURE, log=lambda message: None)
    message = str(info.value)
    assert "WeightsUnavailable" in message and "'VGG16'" in message and "pretrained: none" in message


def test_the_analysis_shows_the_article_and_the_differences(project):
    html = (project / "runs/smoke/notebooks/05_analysis.html").read_text()
    for text in ("this run", "article", "Δ pp", "94.21", "Where this study differs from the article"):
        assert text in html, text
