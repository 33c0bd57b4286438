"""Stage 4: the ensemble rules applied to the stage-3 models' cached probabilities.

Each model ran once per image in stage 3; everything here works on those maps, so trying another
rule or threshold costs no forward pass. Validation predictions of dataset 1 serve the rules that
learn something (tuned threshold, stacking); test sets are only ever evaluated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spineseg import atomic
from spineseg.boundary import boundary_metrics
from spineseg.ensemble import EXTRA_METHODS, METHODS, PAPER_NAMES, combine, fit_stacker, leave_one_out, tune_threshold
from spineseg.inference import load_trained, timing_table
from spineseg.metrics import per_image
from spineseg.runs import StudyData
from spineseg.study import EnsembleInputs, Study, available_eval_sets, ensemble_inputs, stage3_specs
from spineseg.train import pick_device

TUNED = "tuned_soft"
STACKING = "stacking"
GROUP_NAMES = {**PAPER_NAMES, TUNED: "Soft voting, tuned T", STACKING: "Stacking (logistic)"}


def _scored(mask: np.ndarray, inputs: EnsembleInputs, group: str, dataset: str) -> pd.DataFrame:
    frame = pd.concat([per_image(mask, inputs.masks), boundary_metrics(mask, inputs.masks)], axis=1)
    frame.insert(0, "id", inputs.ids)
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "run", 0)
    frame.insert(0, "group", group)
    return frame


def ensemble_masks(inputs: EnsembleInputs, methods, threshold: float) -> dict[str, np.ndarray]:
    """Every requested rule's masks [N, H, W] for one dataset split."""
    return {m: combine(inputs.probs, m, threshold, weights=inputs.val_dsc if m == "weighted" else None)
            for m in methods}


def run_stage4(study: Study, data: StudyData) -> pd.DataFrame:
    """Per-image metrics of every rule on every test set; also writes the tuning and ablation tables."""
    cfg = study.cfg["stage4"]
    threshold, out = cfg["threshold"], study.stage_dir("stage4")
    methods = [m for m in METHODS if m in cfg["methods"]] + [m for m in EXTRA_METHODS if m in cfg["extra_methods"]]
    validation = ensemble_inputs(study, data, "d1", "val")
    tuned_threshold, tuning = tune_threshold(validation.probs, validation.masks.astype(bool), method="soft")
    stacker = fit_stacker(validation.probs, validation.masks.astype(bool))
    atomic.write_csv(out / "threshold_tuning.csv", tuning)
    atomic.write_json(out / "learned.json", {"tuned_threshold": tuned_threshold, "stacker": stacker.to_dict(),
                                             "models": validation.names, "trained_on": "d1 validation"})
    frames, ablations = [], []
    for dataset, split in available_eval_sets(data):
        inputs = ensemble_inputs(study, data, dataset, split)
        for method, mask in ensemble_masks(inputs, methods, threshold).items():
            frames.append(_scored(mask, inputs, method, dataset))
        frames.append(_scored(combine(inputs.probs, "soft", tuned_threshold), inputs, TUNED, dataset))
        frames.append(_scored(stacker.predict_proba(inputs.probs) > 0.5, inputs, STACKING, dataset))
        if len(inputs.names) >= 2:
            table = leave_one_out(inputs.probs, inputs.masks.astype(bool), inputs.names, "soft", threshold)
            table.insert(0, "dataset", dataset)
            ablations.append(table)
    metrics = pd.concat(frames, ignore_index=True)
    atomic.write_csv(out / "metrics_test.csv", metrics)
    if ablations:
        atomic.write_csv(out / "leave_one_out.csv", pd.concat(ablations, ignore_index=True))
    return metrics


def threshold_curves(inputs: EnsembleInputs, methods=("soft", "max", "min", "union"),
                     grid=np.round(np.arange(0.05, 0.951, 0.05), 2)) -> pd.DataFrame:
    """Mean per-image DSC of each rule as the threshold T varies, from cached probabilities."""
    rows = []
    for method in methods:
        for t in grid:
            dsc = per_image(combine(inputs.probs, method, float(t)), inputs.masks)["dsc"].mean()
            rows.append({"method": method, "threshold": float(t), "mean_dsc": float(dsc)})
    return pd.DataFrame(rows)



def measure_inference(study: Study, data: StudyData) -> pd.DataFrame:
    """Forward time per image and peak memory of each stage-3 model and of the ensemble."""
    cfg = study.cfg["stage4"]
    device = pick_device(study.cfg["device"])
    specs = [spec for spec in stage3_specs(study, data) if spec.seed == 0]
    models = [load_trained(study.store, spec, device) for spec in specs]
    table = timing_table([spec.encoder for spec in specs], models, device, cfg["timing_size"],
                         cfg["timing_repeats"], cfg["timing_warmup"], cfg["threshold"])
    atomic.write_csv(study.stage_dir("stage4") / "timing.csv", table)
    return table
