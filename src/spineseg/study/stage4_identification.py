"""Stage 4's identification table: per image, did each member's and each rule's mask land on Th8–Th11?

A mask one level off still overlaps three of the four vertebrae and keeps a DSC near 0.75: the DSC
alone hides the failure a reader most needs counted. Where the dataset has level labels
(`spineseg.identification`), every member and rule gets the levels it covered, and the level-aware
members their level accuracy and panoptic quality.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spineseg.identification import identification_table, level_accuracy, panoptic_quality
from spineseg.metrics import MODEL_THRESHOLD, dice
from spineseg.study.ensemble_inputs import EnsembleInputs


def identification(inputs: EnsembleInputs, masks: dict[str, np.ndarray], dataset: str) -> pd.DataFrame:
    """One row per image and per member model (its mask as stages 1–3 score it) or rule (its mask at the rule's T)."""
    frames = []
    groups = [(name, "model", probs > MODEL_THRESHOLD, levels) for name, probs, levels in zip(inputs.names, inputs.probs, inputs.levels)]
    groups += [(rule, "rule", mask, None) for rule, mask in masks.items()]
    for group, kind, predicted, levels in groups:
        frame = identification_table(predicted, inputs.labels)
        frame.insert(0, "dsc", dice(predicted, inputs.masks))
        if levels is not None:
            frame["level_accuracy"] = [level_accuracy(p, t) for p, t in zip(levels, inputs.labels)]
            quality = pd.DataFrame([panoptic_quality(p, t) for p, t in zip(levels, inputs.labels)])
            frame[quality.columns] = quality
        frame.insert(0, "patient", inputs.patients)
        frame.insert(0, "id", inputs.ids)
        frame.insert(0, "dataset", dataset)
        frame.insert(0, "kind", kind)
        frame.insert(0, "group", group)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
