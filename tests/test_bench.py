"""The benchmark writes a complete report (its figures are printed, never asserted)."""

import json

from spineseg.names import EXTRA_RULES, RULES
from spineseg.study.bench import run_bench


def test_bench_writes_report_with_every_section(tmp_path, capsys):
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
    markdown = (tmp_path / "runs/bench/report.md").read_text()
    assert "## 1. Inference" in markdown and "## 4. Study wall time" in markdown
    assert report["torch"] in capsys.readouterr().out
