"""Stage 4: the ensemble rules applied to the stage-3 models' cached probabilities (Tables 8–9).

Each model ran once per image in stage 3; everything here works on those maps, so trying another
rule or threshold costs no forward pass. Validation predictions of dataset 1 serve the rules that
learn something (tuned threshold, stacking); test sets are only ever evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from spineseg import atomic
from spineseg.boundary import boundary_metrics
from spineseg.calibration import fit_temperature, scale
from spineseg.crops import CropGeometry, refine
from spineseg.data import load_split, splits_present
from spineseg.device import describe, pick_device
from spineseg.ensemble import THRESHOLD_GRID, combine, fit_stacker, leave_one_out, tune_threshold
from spineseg.errors import StageOrderError
from spineseg.identification import identification_table, level_accuracy, panoptic_quality
from spineseg.metrics import dice, per_image
from spineseg.models import parameter_count
from spineseg.names import CALIBRATED, EXTRA_RULES, RULES, SINGLE_CROP, STACKING, TUNED, TWO_STAGE, rule_name
from spineseg.predict import Segmenter, ensemble_forward
from spineseg.study.records import Learned
from spineseg.study.session import Study
from spineseg.study.stage0_data import StudyData
from spineseg.study.stage3_final import ensemble_members, trained_crop_model
from spineseg.study.store import load_probs, load_trained
from spineseg.study.training import load_stage_runs
from spineseg.timing import ensemble_step, mean_seconds, peak_memory_mb


@dataclass(frozen=True)
class EnsembleInputs:
    """The stage-3 models' cached probabilities for one dataset split, stacked [M, N, H, W] on its evaluation grid."""

    names: list[str]
    ids: list[str]
    patients: list[str]
    probs: np.ndarray
    masks: np.ndarray
    images: np.ndarray
    labels: np.ndarray | None  # the level label maps, where the dataset has them
    levels: list[np.ndarray | None]  # each member's ordered level maps (level-aware members)
    val_dsc: np.ndarray  # each model's best validation DSC (weights for weighted voting)


def ensemble_inputs(study: Study, data: StudyData, dataset: str, split: str) -> EnsembleInputs:
    """Stack the cached probabilities of the ensemble members, checked against the dataset's ids."""
    specs = ensemble_members(study, data)
    folder = data.folder(dataset)
    cached = [load_probs(study.layout.store, spec, dataset, split) for spec in specs]
    loaded = load_split(folder, split, cached[0].probs.shape[1:], labels=True)
    for spec, member in zip(specs, cached):
        if member.ids != list(loaded.ids) or member.probs.shape[1:] != loaded.size:
            raise StageOrderError(f"cached probabilities of {spec.folder_name()} do not match {folder} ({split}); rerun stage 3")
    return EnsembleInputs([s.candidate for s in specs], list(loaded.ids), list(loaded.patients),
                          np.stack([m.probs for m in cached]), loaded.masks, loaded.images, loaded.labels,
                          [m.levels for m in cached], members_validation_dsc(study, specs))


def members_validation_dsc(study: Study, specs) -> np.ndarray:
    """Each member's best validation DSC: the weights of weighted voting."""
    runs = load_stage_runs(study, "stage3").set_index("folder")
    return np.array([runs.loc[spec.folder_name(), "best_val_dsc"] for spec in specs], dtype=float)


def available_eval_sets(data: StudyData) -> list[tuple[str, str]]:
    """(dataset, split) pairs reported in the ensemble tables: D1 test and, when present, D2 test."""
    return [(name, split) for name, folder, split in data.eval_splits()
            if split == "test" and split in splits_present(folder)]


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
    """Per-image metrics of every rule on every test set; also writes the tuning and ablation tables."""
    threshold, layout = study.cfg.stage4.threshold, study.layout
    rules = chosen_rules(study)
    validation = ensemble_inputs(study, data, "d1", "val")
    tuned_threshold, tuning = tune_threshold(validation.probs, validation.masks.astype(bool), method="soft")
    stacker = fit_stacker(validation.probs, validation.masks.astype(bool))
    temperatures = [fit_temperature(p, validation.masks) for p in validation.probs]
    choice = best_on_validation(validation, rules, threshold)
    two_stage = TwoStage.load(study, data, choice["best_rule"])
    if two_stage is not None:
        choice = two_stage.compete(choice, validation)
    atomic.write_csv(layout.threshold_tuning, tuning)
    Learned(tuned_threshold, stacker.to_dict(), dict(zip(validation.names, temperatures)), validation.names,
            **choice).save(layout.learned)
    frames, ablations, checks, identified = [], [], [], []
    for dataset, split in available_eval_sets(data):
        inputs = ensemble_inputs(study, data, dataset, split)
        masks = ensemble_masks(inputs, rules, threshold)
        masks[TUNED] = combine(inputs.probs, "soft", tuned_threshold)
        masks[STACKING] = stacker.predict_proba(inputs.probs) > 0.5
        masks[CALIBRATED] = combine(calibrated(inputs.probs, temperatures), "soft", threshold)
        if two_stage is not None:
            masks[TWO_STAGE] = two_stage.masks(inputs)
            best_model = inputs.probs[inputs.names.index(choice["best_model"])]
            masks[SINGLE_CROP] = two_stage.outline(best_model > threshold, inputs.images)
        checks.append(rule_checks(inputs, masks, threshold, dataset))
        for rule, mask in masks.items():
            frames.append(_scored(mask, inputs, rule, dataset))
        if inputs.labels is not None:
            identified.append(identification(inputs, masks, dataset))
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


@dataclass(frozen=True)
class TwoStage:
    """The two-stage variant: `locator`, a rule chosen on validation, finds Th8–Th11; the crop model outlines it."""

    model: Segmenter
    geometry: CropGeometry
    locator: str
    threshold: float
    device: torch.device

    @classmethod
    def load(cls, study: Study, data: StudyData, locator: str) -> TwoStage | None:
        device = pick_device(study.cfg.device)
        trained = trained_crop_model(study, data, device)
        return None if trained is None else cls(*trained, locator, study.cfg.stage4.threshold, device)

    def locate(self, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return combine(probs, self.locator, self.threshold, weights=weights if self.locator == "weighted" else None)

    def masks(self, inputs: EnsembleInputs) -> np.ndarray:
        return self.outline(self.locate(inputs.probs, inputs.val_dsc), inputs.images)

    def outline(self, located: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The crop model's masks [N, H, W] in boxes around `located` regions."""
        return refine(self.model, images, located, self.geometry, self.device) > self.threshold

    def timing_step(self, members: list[Segmenter], weights: np.ndarray, image: torch.Tensor) -> Callable[[], np.ndarray]:
        """What one image costs: the members' forwards, the locating rule, then the crop model."""

        def step() -> np.ndarray:
            located = self.locate(ensemble_forward(members, image), weights)
            return refine(self.model, image[:, 0].cpu().numpy(), located, self.geometry, self.device)

        return step

    def compete(self, choice: dict, validation: EnsembleInputs) -> dict:
        """`best_on_validation`'s choice with the two-stage variant among the rules (and chosen if it is best)."""
        rules = {**choice["validation_dsc"]["rules"], TWO_STAGE: float(dice(self.masks(validation), validation.masks).mean())}
        return {**choice, "best_rule": max(rules, key=rules.get), "two_stage_locator": self.locator,
                "validation_dsc": {**choice["validation_dsc"], "rules": rules}}


def calibrated(probs: np.ndarray, temperatures: list[float]) -> np.ndarray:
    """Each member's probabilities under its validation-fitted temperature."""
    return np.stack([scale(p, t) for p, t in zip(probs, temperatures)]).astype(np.float32)


def best_on_validation(validation: EnsembleInputs, rules, threshold: float) -> dict:
    """The single model and the rule with the best mean dataset-1 validation DSC: the pair the analysis
    compares on test, chosen without looking at it."""
    model_dsc = [float(dice(p > threshold, validation.masks).mean()) for p in validation.probs]
    rule_dsc = {rule: float(dice(mask, validation.masks).mean())
                for rule, mask in ensemble_masks(validation, rules, threshold).items()}
    return {"best_model": validation.names[int(np.argmax(model_dsc))], "best_rule": max(rule_dsc, key=rule_dsc.get),
            "validation_dsc": {"models": dict(zip(validation.names, model_dsc)), "rules": rule_dsc}}


def identification(inputs: EnsembleInputs, masks: dict[str, np.ndarray], dataset: str) -> pd.DataFrame:
    """Per image, for every member model and every rule: did the mask land on Th8–Th11 (`spineseg.identification`)?"""
    frames = []
    groups = [(name, "model", probs > 0.5, levels) for name, probs, levels in zip(inputs.names, inputs.probs, inputs.levels)]
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


def measure_inference(study: Study, data: StudyData) -> pd.DataFrame:
    """ms per image for each stage-3 model alone (named as in the tables, binary and level-aware apart) and for
    the whole ensemble (forwards + the five rules). On CUDA each row has its own peak memory; a CPU process has
    one peak (resident memory of models, data and Python together), reported as that, an upper bound."""
    cfg = study.cfg.stage4
    device = pick_device(study.cfg.device)
    specs = ensemble_members(study, data)
    models = [load_trained(study.layout.store, spec, device) for spec in specs]
    size = cfg.timing_size
    image = torch.from_numpy(np.random.default_rng(0).random((1, 1, *size), dtype=np.float32)).to(device)

    def row(what: str, count: int, params: float, step: Callable[[], object]) -> dict:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = mean_seconds(step, cfg.timing_repeats, cfg.timing_warmup)
        measured = {"what": what, "models": count, "params_millions": params, "ms_per_image": 1000 * seconds}
        return measured | ({"peak_gpu_memory_mb": peak_memory_mb(device)} if device.type == "cuda" else {})

    rows = [row(spec.candidate, 1, parameter_count(model) / 1e6, ensemble_step([model], image, rules=()))
            for spec, model in zip(specs, models)]
    rows.append(row("Ensemble (forwards + 5 rules)", len(models), sum(r["params_millions"] for r in rows),
                    ensemble_step(models, image, cfg.threshold)))
    locator = Learned.load(study.layout.learned).two_stage_locator if study.layout.learned.is_file() else None
    two_stage = TwoStage.load(study, data, locator) if locator else None
    if two_stage is not None:  # on a real radiograph: on noise the locator may find nothing, and the crop model not run
        radiograph = torch.from_numpy(np.array(load_split(data.d1, "test", size).images[:1, None])).to(device)
        step = two_stage.timing_step(models, members_validation_dsc(study, specs), radiograph)
        rows.append(row(f"Two-stage ({rule_name(two_stage.locator)} + crop model)", len(models) + 1,
                        rows[-1]["params_millions"] + parameter_count(two_stage.model) / 1e6, step))
    table = pd.DataFrame(rows)
    if device.type != "cuda":
        table["process_peak_rss_mb"] = peak_memory_mb(device)
    table["device"] = describe(device)
    table["image_size"] = f"{size[0]}x{size[1]}"
    atomic.write_csv(study.layout.timing, table)
    return table
