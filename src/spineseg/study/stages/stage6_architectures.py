"""Stage 6: the neighbouring studies, on this study's data, splits, metrics, run store and statistics.

Questions from two neighbouring papers — LinkNet-152 on CT (Dastgir et al., Sci Rep 15, 13102, 2025):
decoders, encoders, optimisers, attention and gradient-sensitivity pruning; U-Net vs HRNet vs
EfficientNet on lumbar MRI — asked of dataset 1 (dataset 2 as external test when present):

1. decoders × encoders (Adam, no attention) → Table 14; the best pair by mean validation DSC goes on;
2. optimisers on the best pair → Table 15;
3. the best pair with and without scSE attention in its decoder → Table 16 (U-Net and U-Net++ take it:
   when the best decoder does not, the best attention-capable pair is used, and the table says so);
4. the best pair's model pruned by gradient sensitivity at each fraction p and fine-tuned at a reduced
   learning rate → Table 17 (parameters, file size, CPU ms at the timing size, DSC before and after).

Every table has the seven metrics plus mAP: here the pixel-level average precision of the probability
map (the models are binary), with Wilcoxon tests (Holm) against the U-Net / Adam / no-attention /
unpruned baseline. The tables and the pruning figure: `spineseg.study.report.architectures`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch

from spineseg import atomic, pruning
from spineseg.data import load_split
from spineseg.device import pick_device
from spineseg.encoders import ARCHITECTURES, combination_problem
from spineseg.study.core.artifacts import ATTENTION, DECODERS, OPTIMISERS, PRUNING, read_table
from spineseg.study.core.config import Stage2
from spineseg.study.core.records import PruningResult, Stage6Choices
from spineseg.study.core.session import Study, StudyData
from spineseg.study.runs.store import RunSpec, load_trained, score_split
from spineseg.study.runs.training import load_stage_runs, run_spec, train_and_collect
from spineseg.timing import mean_seconds
from spineseg.train import TrainSettings, fit

BASELINE = {"decoder": "unet", "optimizer": "adam", "attention": False, "pruning": 0.0}


def section(study: Study) -> Stage2:
    """Stage 2's training settings, with what the `architectures` section sets instead."""
    return study.cfg.stage2.model_copy(update=study.cfg.architectures.training)


def pair_name(decoder: str, encoder: str) -> str:
    return f"{ARCHITECTURES[decoder]} + {encoder}"


def _spec(study: Study, data: StudyData, decoder: str, encoder: str, seed: int, optimizer: str = "adam",
          attention: bool = False) -> RunSpec:
    s = section(study)
    return run_spec(study, data, "stage6", encoder, seed, s, augment=s.augment, pretrained=s.pretrained,
                    architecture=decoder, weights_path=s.weights_path.get(encoder, ""), optimizer=optimizer,
                    attention=attention)


def decoder_grid(study: Study, data: StudyData) -> tuple[list[RunSpec], dict[str, str]]:
    """Every decoder × encoder smp can build, and why the others are left out."""
    arch, specs, skipped = study.cfg.architectures, [], {}
    for decoder in arch.decoders:
        for encoder in arch.encoders:
            problem = combination_problem(encoder, decoder)
            if problem:
                skipped[pair_name(decoder, encoder)] = problem
                continue
            specs += [_spec(study, data, decoder, encoder, seed) for seed in range(section(study).repeats)]
    return specs, skipped


def best_pair(study: Study, attention_capable: bool = False) -> tuple[str, str]:
    """The (decoder, encoder) with the best mean validation DSC in the decoder grid."""
    runs = load_stage_runs(study, DECODERS)
    if attention_capable:
        runs = runs[[combination_problem(e, a, attention=True) is None for e, a in zip(runs["encoder"], runs["architecture"])]]
    means = runs.groupby(["architecture", "encoder"], sort=False)["best_val_dsc"].mean()
    return means.idxmax() if len(means) else (BASELINE["decoder"], study.cfg.architectures.encoders[0])


def run_stage6(study: Study, data: StudyData) -> Stage6Choices:
    """Train the four comparisons (finished runs are skipped) and return what was chosen, skipped and measured."""
    specs, skipped = decoder_grid(study, data)
    train_and_collect(study, data, DECODERS, specs, lambda s: pair_name(s.architecture, s.encoder), hflip=False)
    decoder, encoder = best_pair(study)
    repeats = range(section(study).repeats)
    arch = study.cfg.architectures
    optimiser_specs = [_spec(study, data, decoder, encoder, seed, optimizer) for optimizer in arch.optimizers for seed in repeats]
    train_and_collect(study, data, OPTIMISERS, optimiser_specs, lambda s: s.train.optimizer, hflip=False)
    attention_pair = None
    if arch.attention:
        attention_pair = ((decoder, encoder) if combination_problem(encoder, decoder, attention=True) is None
                          else best_pair(study, attention_capable=True))
        attention_specs = [_spec(study, data, *attention_pair, seed, attention=flag) for flag in (False, True) for seed in repeats]
        train_and_collect(study, data, ATTENTION, attention_specs, lambda s: "scSE" if s.attention else "none", hflip=False)
    baseline = _spec(study, data, decoder, encoder, 0)
    choices = Stage6Choices((decoder, encoder), skipped, attention_pair, tuple(run_pruning(study, data, baseline)))
    choices.save(study.layout.stage6_choices)
    return choices


def pruning_group(fraction: float) -> str:
    """How Table 17 names a pruning fraction."""
    return f"p = {fraction:.2f}"


@dataclass(frozen=True)
class _Pruned:
    """One pruning fraction of one baseline run, fine-tuned with `settings`; its folder names all three."""

    baseline: RunSpec
    fraction: float
    settings: TrainSettings

    @property
    def group(self) -> str:
        return pruning_group(self.fraction)

    @property
    def folder_name(self) -> str:
        key = hashlib.sha1(json.dumps([self.baseline.key(), self.fraction, asdict(self.settings)], sort_keys=True).encode())
        return f"{self.baseline.folder_name()}-p{self.fraction:.3f}-{key.hexdigest()[:8]}"


def run_pruning(study: Study, data: StudyData, baseline: RunSpec) -> list[PruningResult]:
    """Prune the best pair's trained model at every fraction, measure it, fine-tune it, measure it again."""
    arch, device = study.cfg.architectures, pick_device(study.cfg.device)
    fractions = sorted({0.0, *arch.pruning})
    train = load_split(data.d1, "train", baseline.image_size)
    val = load_split(data.d1, "val", baseline.image_size)
    rows, frames = [], []
    # the baseline's own settings (crops, coordinates, precision, optimiser) at the fine-tuning schedule
    settings = replace(baseline.train, lr=baseline.train.lr * arch.finetune_lr_factor, max_epochs=arch.finetune_epochs,
                       patience=arch.finetune_epochs, seed=0)
    for fraction in fractions:
        pruned = _Pruned(baseline, fraction, settings)
        folder = study.layout.pruned_run(pruned.folder_name)
        done = folder / "summary.json"
        if done.is_file():
            rows.append(PruningResult.load(done))
            frames.append(read_table(folder / "metrics.csv"))
            continue
        model = load_trained(study.layout.store, baseline, device)
        pruning.prune(model, fraction, val.images, model.objective.targets(val), device, baseline.train.batch_size)
        before = _test_metrics(model, baseline, data, device).assign(group=pruned.group, phase="before fine-tuning")
        fit(model, train, val, settings, folder, device, desc=f"pruned {pruned.group}")
        after = _test_metrics(model, baseline, data, device).assign(group=pruned.group, phase="after fine-tuning")
        size = pruning.save(model, folder / "pruned.pt")
        cpu_model = model.to("cpu").eval()
        image = torch.rand(1, 1, *arch.timing_size)
        with torch.inference_mode():
            ms = 1000 * mean_seconds(lambda: cpu_model.region(image), 3)
        row = PruningResult(fraction, pruned.group, pruning.parameters(model), size / 2**20, ms, arch.timing_size)
        frame = pd.concat([before, after], ignore_index=True)
        atomic.write_csv(folder / "metrics.csv", frame)
        row.save(done)
        rows.append(row)
        frames.append(frame)
    atomic.write_csv(study.layout.stage_metrics(PRUNING), pd.concat(frames, ignore_index=True))
    atomic.write_csv(study.layout.runs_table(PRUNING), pd.DataFrame([asdict(row) for row in rows]))
    return rows


def _test_metrics(model, spec: RunSpec, data: StudyData, device: torch.device) -> pd.DataFrame:
    frames = []
    for name, folder, split in data.eval_splits():
        if split != "test":
            continue
        frame = score_split(model, spec, folder, split, device).metrics
        frame.insert(0, "dataset", name)
        frame.insert(0, "run", 0)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def chosen(study: Study) -> Stage6Choices | None:
    """What stage 6 chose, once it has run."""
    path = study.layout.stage6_choices
    return Stage6Choices.load(path) if path.is_file() else None


def baseline_group(stage: str, study: Study) -> str:
    """The group each comparison's Wilcoxon tests are against."""
    if stage == OPTIMISERS:
        return BASELINE["optimizer"]
    if stage == ATTENTION:
        return "none"
    if stage == PRUNING:
        return pruning_group(0.0)
    return ""


def decoder_baselines(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Table 14's pairs: every decoder against the U-Net with the same encoder."""
    pairs = []
    for group in frame["group"].unique():
        decoder, _, encoder = group.partition(" + ")
        unet = pair_name(BASELINE["decoder"], encoder)
        if decoder != ARCHITECTURES[BASELINE["decoder"]] and unet in set(frame["group"]):
            pairs.append((group, unet))
    return pairs
