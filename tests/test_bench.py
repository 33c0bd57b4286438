"""The benchmark writes a complete report (its figures are printed, never asserted)."""

import json
from pathlib import Path

import pytest

from spineseg.names import EXTRA_RULES, RULES
from spineseg.study.bench import _ensemble_encoders, run_bench
from spineseg.study.core.artifacts import Layout


@pytest.mark.slow  # it trains, times and runs a Dask grid
def test_bench_writes_report_with_every_section(tmp_path, capsys):
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "params", tmp_path / "params")
    (tmp_path / "runs/smoke/notebooks").mkdir(parents=True)
    (tmp_path / "runs/smoke/notebooks/00_data.timing.json").write_text(json.dumps({"notebook": "00_data", "seconds": 12.5}))
    report = run_bench(tmp_path, profile="smoke", quick=True, size=64)
    saved = json.loads((tmp_path / "runs/bench/report.json").read_text())
    assert saved["inference"]["encoders_from"].startswith("ten default encoders")
    assert len(saved["inference"]["per_model"]) == 3
    assert saved["inference"]["ratio"] > 0 and saved["inference"]["peak_memory_mb"] > 0
    assert [row["method"] for row in saved["aggregation"]] == [*RULES, *EXTRA_RULES]
    assert {row["encoder"] for row in saved["training"]} == {"ResNet34", "MobileNetV2"}
    assert saved["studies"] == [{"profile": "smoke", "00_data": 12.5, "total_min": 0.21, "target_min": 5, "complete": False}]
    assert set(saved["precision"]["per_precision"]) == {"fp32", "bf16"} and saved["precision"]["ratio_bf16_to_fp32"] > 0
    assert set(saved["torch_aggregation"]["per_rule_ms"]) == set(RULES)
    assert saved["predict"]["images"] == 4 and saved["predict"]["throughput_ratio"] > 0
    assert saved["dask"]["runs"] == 4 and saved["dask"]["ratio"] > 0 and saved["dask"]["ms_per_task_overhead"] > 0
    markdown = (tmp_path / "runs/bench/report.md").read_text()
    for section in ("## 1. Inference", "## 4. Study wall time", "## 5. bf16", "## 6. The five rules", "## 7. `spineseg predict`",
                    "## 8. The smoke stage-2 grid on Dask"):
        assert section in markdown, section
    assert report["torch"] in capsys.readouterr().out


def test_bench_times_the_encoders_stage_2_selected(tmp_path):
    selection = Layout(tmp_path, "smoke").selection
    selection.parent.mkdir(parents=True)
    candidates = [{"encoder": "EfficientNetLite0", "target": "levels"}, {"encoder": "MobileNetV2", "target": "binary"},
                  {"encoder": "EfficientNetLite0", "target": "binary"}]
    selection.write_text(json.dumps({"candidates": candidates}))
    encoders, origin = _ensemble_encoders(tmp_path, "smoke")
    assert encoders == ["EfficientNetLite0", "MobileNetV2"] and "smoke" in origin
