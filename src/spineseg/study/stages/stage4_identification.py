"""Stage 4's identification table: per image, did each member's and each rule's mask land on Th8–Th11?

A mask one level off still overlaps three of the four vertebrae and keeps a DSC near 0.75: the DSC
alone hides the failure a reader most needs counted. Where the dataset has level labels
(`spineseg.identification`), every member and rule gets the levels it covered, the criteria a constant
cannot pass that way (identified strictly, centres identified) and its failure class, and the level-aware
members their level accuracy and panoptic quality. Beside them stand the references every method must beat
or explain: the two position priors fitted on dataset 1's training label maps (the same answer for every
image), the locator's own centres and, where the profile trains it, the nnU-Net peer (`stages.nnunet`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spineseg.data import load_split
from spineseg.identification import (
    centre_errors,
    centre_failure,
    identification_table,
    level_accuracy,
    panoptic_quality,
    vertebra_centres,
)
from spineseg.metrics import ARTICLE_THRESHOLD, dice
from spineseg.names import LOCATOR, PRIOR_BAND, PRIOR_MEAN
from spineseg.position_prior import PositionPrior
from spineseg.study.core.session import Study, StudyData
from spineseg.study.stages.ensemble_inputs import EnsembleInputs
from spineseg.study.stages.located import Located


def position_prior(data: StudyData, grid: tuple[int, int]) -> PositionPrior:
    """The position priors of dataset 1's training label maps on `grid`."""
    return PositionPrior.fit(load_split(data.d1, "train", grid, labels=True).labels)


def references_of(study: Study, data: StudyData, inputs: EnsembleInputs, located: Located | None, dataset: str,
                  split: str) -> list[tuple[str, str, np.ndarray, list[np.ndarray] | None]]:
    """(group, kind, masks, centres) of the references: the two position priors and, with a locator, its centres."""
    shape = inputs.masks.shape[1:]
    prior = position_prior(data, shape)
    count = len(inputs.ids)
    references = [(PRIOR_BAND, "prior", np.broadcast_to(prior.band_mask(shape), inputs.masks.shape), None),
                  (PRIOR_MEAN, "prior", np.broadcast_to(prior.mean_mask(shape), inputs.masks.shape),
                   [prior.region_centres(shape)] * count)]
    if located is not None:
        chains = located.chains(inputs, dataset, split)
        references.append((LOCATOR, "locator", np.zeros(inputs.masks.shape, dtype=bool),
                           [chain.region_centres() for chain in chains]))
    return references


def identification(inputs: EnsembleInputs, masks: dict[str, np.ndarray], dataset: str,
                   references: list[tuple[str, str, np.ndarray, list[np.ndarray] | None]] = ()) -> pd.DataFrame:
    """One row per image and per member model (its mask as stages 1–3 score it), rule (its mask at the rule's T)
    or reference (`references_of`, and the peer: a locator without a mask is scored by its centres alone)."""
    frames = []
    groups = [(name, "model", probs > ARTICLE_THRESHOLD, levels, None)
              for name, probs, levels in zip(inputs.names, inputs.probs, inputs.levels)]
    groups += [(rule, "rule", mask, None, None) for rule, mask in masks.items()]
    groups += [(group, kind, mask, None, centres) for group, kind, mask, centres in references]
    for group, kind, predicted, levels, centres in groups:
        frame = identification_table(predicted, inputs.labels, centres)
        frame.insert(0, "dsc", dice(predicted, inputs.masks))
        if kind == "locator":  # no mask: the centre criterion alone, and its own failure class
            frame["failure"] = [centre_failure(errors) for errors in _centre_errors(centres, inputs.labels)]
            frame[["dsc", "identified", "identified_strict", "precision_region"]] = np.nan
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


def _centre_errors(centres: list[np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
    return [centre_errors(named, vertebra_centres(label_map)) for named, label_map in zip(centres, labels)]
