"""Stage 4: the ensemble rules applied to the stage-3 models' cached probabilities (Tables 8–9).

This file owns the rules and their tables: which rules run, what they learn and choose on dataset-1
validation (tuned threshold, stacking, calibration, the best rule and model), their per-image test
metrics, rule checks and leave-one-out ablations. Test sets are only ever evaluated. The
identification table (`stage4_identification`), the timing table (`stage4_timing`) and the two-stage
variant (`two_stage`) have files of their own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spineseg import atomic
from spineseg.boundary import boundary_metrics
from spineseg.calibration import fit_temperature, scale
from spineseg.ensemble import THRESHOLD_GRID, combine, fit_stacker, leave_one_out, tune_threshold
from spineseg.errors import ConfigError
from spineseg.identification import identification_table
from spineseg.metrics import ARTICLE_THRESHOLD, dice, per_image
from spineseg.names import CALIBRATED, EXTRA_RULES, LOCATED, NNUNET, RULES, SINGLE_CROP, STACKING, TUNED, TWO_STAGE
from spineseg.study.core.records import Learned
from spineseg.study.core.session import Study, StudyData
from spineseg.study.stages.ensemble_inputs import EnsembleInputs, available_eval_sets, ensemble_inputs
from spineseg.study.stages.located import Located
from spineseg.study.stages.nnunet import NnUNetPeer
from spineseg.study.stages.stage4_identification import identification, references_of
from spineseg.study.stages.two_stage import TwoStage


def chosen_rules(study: Study) -> list[str]:
    """The profile's rules, the article's first, each in the canonical order."""
    cfg = study.cfg.stage4
    return [m for m in RULES if m in cfg.methods] + [m for m in EXTRA_RULES if m in cfg.extra_methods]


def _scored(mask: np.ndarray, inputs: EnsembleInputs, group: str, dataset: str) -> pd.DataFrame:
    frame = pd.concat([per_image(mask, inputs.masks), boundary_metrics(mask, inputs.masks)], axis=1)
    frame.insert(0, "patient", inputs.patients)
    frame.insert(0, "id", inputs.ids)
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "run", 0)
    frame.insert(0, "group", group)
    return frame


def ensemble_masks(inputs: EnsembleInputs, rules, threshold: float) -> dict[str, np.ndarray]:
    """Every requested rule's masks [N, H, W] for one dataset split."""
    return {m: combine(inputs.probs, m, threshold, weights=inputs.val_dsc if m == "weighted" else None)
            for m in rules}


def run_stage4(study: Study, data: StudyData) -> pd.DataFrame:
    """Per-image metrics of every rule (and of the nnU-Net peer) on every test set; also writes the tuning and
    ablation tables. The peer is scored beside the rules, never a candidate for the best one."""
    layout, rules = study.layout, chosen_rules(study)
    validation = ensemble_inputs(study, data, "d1", "val")
    threshold = validation.threshold
    tuned_threshold, tuning = tune_threshold(validation.probs, validation.masks.astype(bool), method="soft")
    stacker = fit_stacker(validation.probs, validation.masks.astype(bool))
    temperatures = [fit_temperature(p, validation.masks) for p in validation.probs]
    choose_by = study.cfg.stage4.choose_by
    candidates = ensemble_masks(validation, rules, threshold)
    two_stage = TwoStage.load(study, data, best_on_validation(validation, candidates, choose_by)["best_rule"])
    if two_stage is not None:
        candidates[TWO_STAGE] = two_stage.masks(validation)
    located = Located.load(study, data)
    if located is not None and located.can_outline(validation):
        candidates[LOCATED] = located.masks(validation, "d1", "val")
    choice = best_on_validation(validation, candidates, choose_by)
    peer = NnUNetPeer.load(study, data)
    atomic.write_csv(layout.threshold_tuning, tuning)
    Learned(tuned_threshold, stacker.to_dict(), dict(zip(validation.names, temperatures)), validation.names,
            **choice, two_stage_locator=two_stage.locator if two_stage else None).save(layout.learned)
    frames, ablations, checks, identified = [], [], [], []
    for dataset, split in available_eval_sets(data):
        inputs = ensemble_inputs(study, data, dataset, split)
        masks = ensemble_masks(inputs, rules, threshold)
        masks[TUNED] = combine(inputs.probs, "soft", tuned_threshold)
        masks[STACKING] = stacker.predict_mask(inputs.probs)
        masks[CALIBRATED] = combine(calibrated(inputs.probs, temperatures), "soft", threshold)
        if two_stage is not None:
            masks[TWO_STAGE] = two_stage.masks(inputs)
            best_model = inputs.probs[inputs.names.index(choice["best_model"])]
            masks[SINGLE_CROP] = two_stage.outline(best_model > ARTICLE_THRESHOLD, inputs.images)
        if located is not None and located.can_outline(inputs):
            masks[LOCATED] = located.masks(inputs, dataset, split)
        checks.append(rule_checks(inputs, masks, threshold, dataset))
        peers = {NNUNET: peer.masks(inputs, dataset)} if peer is not None else {}
        for rule, mask in (masks | peers).items():
            frames.append(_scored(mask, inputs, rule, dataset))
        if inputs.labels is not None:
            references = references_of(study, data, inputs, located, dataset, split)
            references += [(name, "peer", mask, None) for name, mask in peers.items()]
            identified.append(identification(inputs, masks, dataset, references))
        if len(inputs.names) >= 2:
            table = leave_one_out(inputs.probs, inputs.masks.astype(bool), inputs.names, "soft", threshold)
            table.insert(0, "dataset", dataset)
            ablations.append(table)
    metrics = pd.concat(frames, ignore_index=True)
    atomic.write_csv(layout.stage_metrics("stage4"), metrics)
    atomic.write_csv(layout.rule_checks, pd.DataFrame(checks))
    if identified:
        atomic.write_csv(layout.identification, pd.concat(identified, ignore_index=True))
    if ablations:
        atomic.write_csv(layout.leave_one_out, pd.concat(ablations, ignore_index=True))
    return metrics


def calibrated(probs: np.ndarray, temperatures: list[float]) -> np.ndarray:
    """Each member's probabilities under its validation-fitted temperature."""
    return np.stack([scale(p, t) for p, t in zip(probs, temperatures)]).astype(np.float32)


def best_on_validation(validation: EnsembleInputs, candidates: dict[str, np.ndarray], choose_by: str = "dsc") -> dict:
    """The single model and the rule (of `candidates`, masks on dataset-1 validation) that score best there:
    the pair the analysis compares on test, chosen without looking at it. `choose_by` "identification" ranks by
    the share identified strictly, then DSC; "dsc" by mean DSC alone. A single model's mask is at the article's T,
    as in every table that scores it."""
    models = {name: probs > ARTICLE_THRESHOLD for name, probs in zip(validation.names, validation.probs)}
    dsc = {kind: {name: float(dice(mask, validation.masks).mean()) for name, mask in masks.items()}
           for kind, masks in (("models", models), ("rules", candidates))}
    choice = {"validation_dsc": dsc}
    if choose_by == "identification":
        if validation.labels is None:
            raise ConfigError("stage4.choose_by: identification needs level label maps, and dataset 1 has none")
        identified = {kind: {name: float(identification_table(mask, validation.labels)["identified_strict"].mean())
                             for name, mask in masks.items()} for kind, masks in (("models", models), ("rules", candidates))}
        choice["validation_identified"] = identified
        rank = {kind: {name: (identified[kind][name], dsc[kind][name]) for name in dsc[kind]} for kind in dsc}
    else:
        rank = dsc
    return {"best_model": max(rank["models"], key=rank["models"].get), "best_rule": max(rank["rules"], key=rank["rules"].get),
            **choice}


def rule_checks(inputs: EnsembleInputs, masks: dict[str, np.ndarray], threshold: float, dataset: str) -> dict:
    """Facts the deviations section reports: where shape averaging met an empty member, whether max = union."""
    empty_member = (inputs.probs > threshold).sum(axis=(2, 3)) == 0  # [M, N]
    row = {"dataset": dataset, "images": len(inputs.ids), "images_with_an_empty_member": int(empty_member.any(axis=0).sum()),
           "empty_member_masks": int(empty_member.sum())}
    if "max" in masks and "union" in masks:
        row["images_where_max_differs_from_union"] = int((masks["max"] != masks["union"]).any(axis=(1, 2)).sum())
    return row


def threshold_curves(inputs: EnsembleInputs, rules=("soft", "max", "min", "union"), grid=THRESHOLD_GRID) -> pd.DataFrame:
    """Mean per-image DSC of each rule as the threshold T varies, from cached probabilities."""
    rows = []
    for rule in rules:
        for t in grid:
            weights = inputs.val_dsc if rule == "weighted" else None
            mean_dsc = dice(combine(inputs.probs, rule, float(t), weights=weights), inputs.masks).mean()
            rows.append({"method": rule, "threshold": float(t), "mean_dsc": float(mean_dsc)})
    return pd.DataFrame(rows)
