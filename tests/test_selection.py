"""Stage 2's choice of encoders: validation DSC only, threshold, top k."""

import pandas as pd

from spineseg.study.core.config import Stage2
from spineseg.study.stages.stage2_selection import select_encoders


def test_selection_ranks_by_mean_validation_dsc_and_applies_threshold_and_top_k():
    runs = pd.DataFrame({
        "encoder": ["A", "A", "B", "B", "C", "C", "D", "D"],
        "best_val_dsc": [0.95, 0.93, 0.97, 0.90, 0.80, 0.99, 0.70, 0.72], "target": "binary",
    })
    ranking = select_encoders(runs, Stage2(min_val_dsc=0.915, top_k=2))
    assert ranking["encoder"].tolist() == ["A", "B", "C", "D"]  # means 0.94, 0.935, 0.895, 0.71
    assert ranking.loc[ranking["selected"], "encoder"].tolist() == ["A", "B"]
    relaxed = select_encoders(runs, Stage2(min_val_dsc=0.8, top_k=10))
    assert relaxed.loc[relaxed["selected"], "encoder"].tolist() == ["A", "B", "C"]


def test_selection_ignores_test_metrics():
    runs = pd.DataFrame({"encoder": ["A", "B"], "best_val_dsc": [0.9, 0.95], "test_dsc": [0.99, 0.1], "target": "binary"})
    ranking = select_encoders(runs, Stage2(min_val_dsc=0.0, top_k=1))
    assert ranking.loc[ranking["selected"], "encoder"].tolist() == ["B"]
