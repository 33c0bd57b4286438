"""The ensemble's cost per image (the article's inference time and peak memory): each member alone, the
whole ensemble with its five rules, the two-stage variant when stage 4 put it in the running, and the located
variant (locator and crop model) when the profile trains a locator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from spineseg import atomic
from spineseg.data import load_split
from spineseg.device import describe, pick_device
from spineseg.models import parameter_count
from spineseg.names import LOCATED, rule_name
from spineseg.saved_models import load_model
from spineseg.study.core.records import Learned
from spineseg.study.core.session import Study, StudyData
from spineseg.study.stages.located import Located
from spineseg.study.stages.stage3_final import ensemble_members
from spineseg.study.stages.two_stage import TwoStage
from spineseg.timing import ensemble_step, mean_seconds, peak_memory_mb


def measure_inference(study: Study, data: StudyData) -> pd.DataFrame:
    """ms per image for each stage-3 model alone (named as in the tables, binary and level-aware apart) and for
    the whole ensemble (forwards + the five rules). On CUDA each row has its own peak memory; a CPU process has
    one peak (resident memory of models, data and Python together), reported as that, an upper bound."""
    cfg = study.cfg.stage4
    device = pick_device(study.cfg.device)
    members = ensemble_members(study, data).members
    models = [load_model(study.layout.store / member.folder, device)[1] for member in members]
    size = cfg.timing_size
    image = torch.from_numpy(np.random.default_rng(0).random((1, 1, *size), dtype=np.float32)).to(device)

    def row(what: str, count: int, params: float, step: Callable[[], object]) -> dict:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = mean_seconds(step, cfg.timing_repeats, cfg.timing_warmup)
        measured = {"what": what, "models": count, "params_millions": params, "ms_per_image": 1000 * seconds}
        return measured | ({"peak_gpu_memory_mb": peak_memory_mb(device)} if device.type == "cuda" else {})

    rows = [row(member.name, 1, parameter_count(model) / 1e6, ensemble_step([model], image, rules=()))
            for member, model in zip(members, models)]
    rows.append(row("Ensemble (forwards + 5 rules)", len(models), sum(r["params_millions"] for r in rows),
                    ensemble_step(models, image, cfg.threshold)))
    locator = Learned.load(study.layout.learned).two_stage_locator if study.layout.learned.is_file() else None
    two_stage = TwoStage.load(study, data, locator) if locator else None
    if two_stage is not None:  # on a real radiograph: on noise the locator may find nothing, and the crop model not run
        radiograph = torch.from_numpy(np.array(load_split(data.d1, "test", size).images[:1, None])).to(device)
        step = two_stage.timing_step(models, np.array([member.validation_dsc for member in members]), radiograph)
        rows.append(row(f"Two-stage ({rule_name(two_stage.locator)} + crop model)", len(models) + 1,
                        rows[-1]["params_millions"] + parameter_count(two_stage.crop.model) / 1e6, step))
    located = Located.load(study, data)
    if located is not None:
        radiograph = torch.from_numpy(np.array(load_split(data.d1, "test", size).images[:1, None])).to(device)
        locator = located.locator()
        outline = parameter_count(located.crop.model) / 1e6 if located.crop is not None else 0.0
        rows.append(row(rule_name(LOCATED), 1 + (located.crop is not None),
                        parameter_count(locator.model) / 1e6 + outline, located.timing_step(locator, radiograph)))
    table = pd.DataFrame(rows)
    if device.type != "cuda":
        table["process_peak_rss_mb"] = peak_memory_mb(device)
    table["device"] = describe(device)
    table["image_size"] = f"{size[0]}x{size[1]}"
    atomic.write_csv(study.layout.timing, table)
    return table
