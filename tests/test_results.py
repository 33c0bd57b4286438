"""The results file and the README section rendered from it: a number reaches the README only through a file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spineseg.errors import StageOrderError
from spineseg.study.report import results

ROOT = Path(__file__).resolve().parents[1]


def example() -> dict:
    method = {"identified_strict": {"mean": 70.0, "ci": [60.0, 80.0]}, "centres_identified": {"mean": 75.5, "ci": [65.0, 85.2]},
              "dsc": {"mean": 81.0, "ci": [79.0, 83.0]}, "images": 76, "patients": 36}
    endpoint = {"Dataset": "d2", "Best rule": "Located", "Best model": "Lite1 (levels)", "Δ rule − model (pp)": 12.34,
                "Δ rule − model (pp) CI low": 2.0, "Δ rule − model (pp) CI high": 22.0,
                "p rule vs model (Wilcoxon by patient, Holm)": "0.012", "r rule vs model (rank-biserial)": 0.5,
                "Δ rule − prior (pp)": 40.0, "r rule vs prior (rank-biserial)": 0.9,
                "Δ rule − prior (pp) CI low": 30.0, "Δ rule − prior (pp) CI high": 50.0,
                "p rule vs prior (Wilcoxon by patient, Holm)": "<0.001"}
    return {"format": results.FORMAT, "profile": "aasce", "primary_endpoint": "identification", "best_rule": "located",
            "best_model": "Lite1 (levels)",
            "datasets": {"d2": {"description": "dataset 2: the later batch", "methods": {
                "Located (locator + crop model)": method,
                "Locator (its centres)": {"centres_identified": {"mean": 76.0, "ci": [66.0, 86.0]}, "images": 76, "patients": 36}}}},
            "failures": {"d2": {"Located (locator + crop model)": {"identified": 70.0, "three vertebrae": 5.0,
                                                                   "one level off": 25.0, "empty": 0.0}}},
            "locator": {"encoder": "EfficientNetLite0", "image_size": [256, 96], "augmentation": "anatomy", "best_epoch": 20,
                        "epochs_run": 24, "max_epochs": 24, "validation_identified": 84.6, "minutes": 9.1},
            "endpoint": [endpoint], "stage_minutes": {"00_data": 0.4, "03_final_training": 30.0},
            "provenance": {"git_commit": "0123456789abcdef", "git_modified": False, "machine": "x86_64, 2 cores",
                           "threads": 2, "data": "abc123"}}


def test_render_writes_every_number_of_the_file_and_nothing_else():
    text = results.render(example())
    assert "| Located (locator + crop model) | 70.0 [60.0, 80.0] | 75.5 [65.0, 85.2] | 81.0 [79.0, 83.0] | 76 / 36 |" in text
    assert "| Locator (its centres) | — | 76.0 [66.0, 86.0] | — | 76 / 36 |" in text  # a locator draws no mask
    assert "Located − Lite1 (levels): +12.3 pp [2.0, 22.0], r = 0.50, p = 0.012" in text
    assert "Located − mean-position prior: +40.0 pp [30.0, 50.0], r = 0.90, p = <0.001" in text
    assert "- What kind of wrong, Located (locator + crop model) (% of images): one level off 25.0, three vertebrae 5.0." in text
    assert ("The locator: EfficientNetLite0 at 256 × 96, anatomy augmentation, 9.1 min; the checkpoint of epoch 20 of 24 "
            "(of at most 24), chosen on validation, where its centres identified 84.6 %.") in text
    assert "(stage 5 writes it): 00 0.4, 03 30.0; 30.4 in all." in text
    assert "Commit 0123456789, x86_64, 2 cores, 2 threads, data abc123." in text


def test_the_peer_is_rendered_with_its_budget_beside_the_studys_own_training_and_its_tests():
    with_peer = example()
    with_peer["endpoint"][0] |= {"Δ rule − peer (pp)": 18.0, "Δ rule − peer (pp) CI low": 6.5, "Δ rule − peer (pp) CI high": 29.0,
                                 "r rule vs peer (rank-biserial)": 0.61, "p rule vs peer (Wilcoxon by patient, Holm)": "0.004"}
    with_peer["datasets"]["d2"]["methods"]["nnU-Net v2 (2d, set budget)"] = {"dsc": {"mean": 66.0}, "images": 76, "patients": 36}
    with_peer["peer"] = {"nnunetv2": "2.8.1", "configuration": "2d", "patch_size": [512, 192], "batch_size": 15,
                         "budget": {"epochs": 6, "iterations": 25}, "batches": 150, "training_cases": 263, "device": "cpu",
                         "threads": 2, "test_cases": 172, "minutes": {"plan_and_preprocess": 1.4, "train": 31.25, "predict": 6.0},
                         "dsc_tests": [{"dataset": "d2", "n": 36, "median_diff": 0.1234, "effect_size": 0.8, "p": 0.0001,
                                        "p_holm_all": 0.004}]}
    with_peer["training_minutes"] = {"stage2": 20.0, "stage3": 15.5, "locator": 9.0}
    text = results.render(with_peer)
    assert "Located − nnU-Net: +18.0 pp [6.5, 29.0], r = 0.61, p = 0.004." in text
    assert "| nnU-Net v2 (2d, set budget) | — | — | 66.0 | 76 / 36 |" in text
    assert ("- The peer, nnU-Net v2 2.8.1 (2d, its own plan: patch 512 × 192, batch 15): 6 epochs × 25 batches = 2,250 "
            "patches seen (263 training images), 31.2 min of training on cpu with 2 threads (+ 1.4 min planning, 6.0 min "
            "predicting 172 test images with its mirroring); the study's own trainings took 44.5 min (stage2 20.0, "
            "stage3 15.5, locator 9.0); best rule − nnU-Net, DSC (d2, exploratory): median per patient +0.123, r = 0.80, "
            "p = 0.0001 (Holm over the secondary family: 0.004), n = 36 patients.") in text
    assert "The peer" not in results.render(example())


def test_stages_run_at_several_commits_are_each_named_with_their_commit():
    rerun = example()
    rerun["provenance"]["stage_commits"] = {"00_data": "aaaaaaaaaaaa", "03_final_training": "aaaaaaaaaaaa",
                                            "05_analysis": "0123456789abcdef"}
    assert "- Commits aaaaaaaaaa (stages 00, 03), 0123456789 (stages 05), x86_64" in results.render(rerun)
    rerun["provenance"]["stage_commits"] = {"00_data": "0123456789abcdef", "05_analysis": "0123456789abcdef"}
    assert "- Commit 0123456789, x86_64" in results.render(rerun)


def test_rows_come_in_the_shown_order_though_the_file_keeps_its_keys_sorted():
    results_file = example()
    methods = results_file["datasets"]["d2"]["methods"]
    methods["best single model (validation)"] = methods["Position prior: band of rows"] = methods["Locator (its centres)"]
    text = results.render(json.loads(json.dumps(results_file, sort_keys=True)))  # as `atomic.write_json` keeps it
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ") and " / " in line
            and not line.startswith("| |")]
    assert rows == ["best single model (validation)", "Located (locator + crop model)", "Locator (its centres)",
                    "Position prior: band of rows"]


def test_render_refuses_a_file_of_another_kind():
    with pytest.raises(StageOrderError, match="not a spineseg-results/1 file"):
        results.render({"format": "something else"})


def test_the_readme_block_is_replaced_by_the_rendering_and_a_missing_block_is_named(tmp_path):
    kept = tmp_path / "aasce.json"
    kept.write_text(json.dumps(example()))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:aasce -->\nstale numbers\n<!-- /results:aasce -->\nafter\n")
    assert results.update_readme(readme, kept)
    assert results.readme_block(kept) in readme.read_text() and "stale" not in readme.read_text()
    assert not results.update_readme(readme, kept)  # rendered already: nothing changes
    readme.write_text("no block here\n")
    with pytest.raises(StageOrderError, match="no <!-- results:aasce -->"):
        results.update_readme(readme, kept)


def test_the_readme_quotes_exactly_what_the_kept_results_files_render():
    """Every results file kept under docs/results/ has its block in the README, as `render` makes it."""
    kept = sorted((ROOT / "docs" / "results").glob("*.json"))
    readme = (ROOT / "README.md").read_text()
    assert kept, "no results file is kept under docs/results/"
    marked = re.findall(r"<!-- results:([^ ]+) -->", readme)
    assert sorted(marked) == sorted(path.stem for path in kept)  # no block without its file, no file without its block
    for path in kept:
        assert results.readme_block(path) in readme, f"README's block for {path.name} differs from its rendering"


def test_the_results_command_keeps_a_runs_file_and_fills_the_readme_from_it(tmp_path, capsys, monkeypatch):
    from spineseg.cli import main

    (tmp_path / "params").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params" / "real.yaml").write_text("description: x\n")
    produced = tmp_path / "runs" / "real" / "results.json"
    produced.parent.mkdir(parents=True)
    produced.write_text(json.dumps(example()))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:real -->\nold\n<!-- /results:real -->\n")
    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "docs" / "results" / "real.json"
    assert main(["results", "--profile", "real", "--keep", str(kept), "--readme", str(readme)]) == 0
    assert json.loads(kept.read_text()) == example() and results.readme_block(kept) in readme.read_text()
    assert "updated" in capsys.readouterr().out
    assert main(["results", "--profile", "absent"]) == 2
    assert "runs/absent/results.json is missing" in capsys.readouterr().err
