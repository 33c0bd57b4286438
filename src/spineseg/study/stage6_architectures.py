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
unpruned baseline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import matplotlib.pyplot as plt
import pandas as pd
import torch

from spineseg import atomic, pruning
from spineseg.data import load_split
from spineseg.device import pick_device
from spineseg.encoders import ARCHITECTURES, combination_problem
from spineseg.names import METRICS
from spineseg.stats import PATIENT_KEYS, format_wilcoxon, one_vs_rest, wilcoxon_family
from spineseg.study.artifacts import ATTENTION, DECODERS, OPTIMISERS, PRUNING, read_table
from spineseg.study.config import Stage2
from spineseg.study.figures import save
from spineseg.study.records import PruningResult, Stage6Choices
from spineseg.study.session import Study, StudyData
from spineseg.study.store import RunSpec, load_trained, score_split
from spineseg.study.tables import metric_table, write_table
from spineseg.study.training import load_stage_metrics, load_stage_runs, run_spec, train_and_collect
from spineseg.timing import mean_seconds
from spineseg.train import TrainSettings, fit

BASELINE = {"decoder": "unet", "optimizer": "adam", "attention": False, "pruning": 0.0}


def section(study: Study) -> Stage2:
    """Stage 2's training settings, with what the `architectures` section sets instead."""
    arch = study.cfg.architectures
    overrides = {k: getattr(arch, k) for k in ("repeats", "image_size", "batch_size", "lr", "max_epochs", "patience")
                 if getattr(arch, k) is not None}
    return study.cfg.stage2.model_copy(update=overrides)


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


def stage6_frames(study: Study) -> dict[str, pd.DataFrame]:
    """The per-image test metrics of each comparison that has run."""
    frames = {}
    for stage in (DECODERS, OPTIMISERS, ATTENTION, PRUNING):
        path = study.layout.stage_metrics(stage)
        if path.is_file():
            frames[stage] = load_stage_metrics(study, stage)
    return frames


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



TABLE_METRICS = (*METRICS, "ap")
STAGE6_TABLES = {DECODERS: "table14", OPTIMISERS: "table15", ATTENTION: "table16", PRUNING: "table17"}
STAGE6_CAPTIONS = {
    "table14": "Table 14. Decoders × encoders (Adam, no attention), {dataset}: seven metrics and mAP (%)",
    "table15": "Table 15. Optimisers on the best decoder–encoder pair ({pair}), {dataset} (%)",
    "table16": "Table 16. The pair {pair} without and with scSE attention in its decoder, {dataset} (%)",
    "table17": "Table 17. Gradient-sensitivity pruning of {pair}, then fine-tuning: size, CPU time at {timing}, "
               "DSC before and after fine-tuning, {dataset} (metrics after fine-tuning, %)",
}


def stage6_tables(study: Study) -> dict[str, pd.DataFrame]:
    """Tables 14–17 per test set, and the Wilcoxon tests of every row against its baseline."""
    frames, picked = stage6_frames(study), chosen(study)
    tables, families = {}, []
    for stage, frame in frames.items():
        if stage == PRUNING:
            frame = frame[frame["phase"] == "after fine-tuning"]
        for dataset in sorted(frame["dataset"].unique()):
            name = STAGE6_TABLES[stage] + ("" if dataset == "d1" else f"_{dataset}")
            order = list(dict.fromkeys(frame["group"]))
            table = metric_table(frame, dataset, order, metrics=TABLE_METRICS)
            if stage == PRUNING:
                table = _pruning_columns(study, frames[PRUNING], dataset).join(table)
            tables[name] = table
        pairs = decoder_baselines(frame) if stage == DECODERS else one_vs_rest(baseline_group(stage, study), frame["group"].unique())
        if pairs:
            families.append(wilcoxon_family(frame, [(b, a) for a, b in pairs] if stage != DECODERS else pairs,
                                            family=STAGE6_TABLES[stage], pair_on=PATIENT_KEYS))
    if picked is not None and picked.skipped:
        tables["table14_skipped"] = pd.DataFrame({"reason": picked.skipped})
    if families:
        tables["table14_17_wilcoxon"] = format_wilcoxon(pd.concat(families, ignore_index=True))
    captions = stage6_captions(study)
    for name, table in tables.items():
        write_table(study, table, name, captions.get(name))
    return tables


def _pruning_columns(study: Study, frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    runs = load_stage_runs(study, PRUNING).set_index("group")
    before = frame[(frame["phase"] == "before fine-tuning") & (frame["dataset"] == dataset)].groupby("group")["dsc"].mean()
    after = frame[(frame["phase"] == "after fine-tuning") & (frame["dataset"] == dataset)].groupby("group")["dsc"].mean()
    return pd.DataFrame({"Parameters (M)": runs["parameters"] / 1e6, "Size (MB)": runs["size_mb"], "CPU ms": runs["cpu_ms"],
                         "DSC before FT": 100 * before, "DSC after FT": 100 * after}).round(2)


def stage6_captions(study: Study) -> dict[str, str]:
    picked, arch = chosen(study), study.cfg.architectures
    pair = pair_name(*picked.best_pair) if picked else "the best pair"
    attention_pair = pair_name(*picked.attention_pair) if picked and picked.attention_pair else pair
    timing = "×".join(map(str, arch.timing_size))
    out = {}
    for name in STAGE6_TABLES.values():
        for dataset, label in (("d1", "dataset 1 test"), ("d2", "dataset 2")):
            key = name + ("" if dataset == "d1" else f"_{dataset}")
            out[key] = STAGE6_CAPTIONS[name].format(dataset=label, pair=attention_pair if name == "table16" else pair,
                                                    timing=timing)
    out["table14_skipped"] = "Decoder–encoder pairs smp cannot build, and why"
    out["table14_17_wilcoxon"] = ("Wilcoxon tests by patient (Holm) of Tables 14–17 against the baseline: U-Net with the "
                                  "same encoder, Adam, no attention, unpruned")
    return out


def pruning_figure(study: Study) -> plt.Figure:
    """DSC against file size before and after fine-tuning; where the two coincide (the unpruned model) the hollow
    markers of one and the filled ones of the other stay both visible, and DSC keeps its 0–100 % scale."""
    runs = load_stage_runs(study, PRUNING)
    frame = load_stage_metrics(study, PRUNING)
    d1 = frame[frame["dataset"] == "d1"]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    styles = {"before fine-tuning": dict(ls="--", marker="o", ms=8, mfc="none"),
              "after fine-tuning": dict(ls="-", marker="s", ms=4)}
    for phase, style in styles.items():
        dsc = d1[d1["phase"] == phase].groupby("group")["dsc"].mean().reindex(runs["group"])
        ax.plot(runs["size_mb"], 100 * dsc.to_numpy(), label=phase, **style)
    ax.set_ylim(0, 100)
    fractions = ax.secondary_xaxis("top")  # each point's pruned fraction, clear of the lines
    fractions.set_xticks(list(runs["size_mb"]), list(runs["group"]), fontsize=6)
    fractions.set_xlabel("pruned fraction", fontsize=7)
    ax.set_xlabel("model file (MB)")
    ax.set_ylabel("mean DSC, dataset 1 test (%)")
    ax.set_title("Gradient-sensitivity pruning: DSC against size", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def stage6_figures(study: Study) -> dict[str, plt.Figure]:
    figures = {}
    if study.layout.runs_table(PRUNING).is_file():
        figures["pruning_dsc_vs_size"] = pruning_figure(study)
    for name, figure in figures.items():
        save(figure, study, name)
    return figures
