"""Benchmarks (not tests): inference, aggregation, training throughput and the studies' wall time.

Everything is measured in one process, one after another, so ratios hold on a noisy machine.
Results go to ``runs/bench/report.md`` and ``report.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spineseg import atomic
from spineseg.augment import augment_batch, paper_augmentation
from spineseg.data.synthetic import generate
from spineseg.device import configure_threads, describe, pick_device
from spineseg.ensemble import combine
from spineseg.names import EXTRA_RULES, RULES
from spineseg.saved_models import build_segmenter
from spineseg.study.core.artifacts import NOTEBOOKS, Layout, bench_dir
from spineseg.study.core.records import Selection
from spineseg.timing import ensemble_step, mean_seconds, peak_memory_mb
from spineseg.train import Trainer

# When a profile has no stage-3 models yet, time these ten (a plausible top ten of the paper's list).
DEFAULT_TEN = ["ResNet34", "ResNet50", "SEResNet34", "SEResNet50", "ResNeXt50", "DenseNet121", "MobileNetV2",
               "EfficientNetB0", "EfficientNetB2", "EfficientNetB4"]
TRAINING_ENCODERS = ("ResNet34", "MobileNetV2")
PRECISION_ENCODER = "MobileNetV2"  # one of the `quick` profile's stage-2 encoders


def _binary_unet(encoder: str):
    """The network the benchmarks time: the article's U-Net with `encoder`, binary output, untrained."""
    return build_segmenter(encoder, "unet", "binary", coordinates=False, attention=False)


def _ensemble_encoders(project: Path, profile: str) -> tuple[list[str], str]:
    selection = Layout(project, profile).selection
    if selection.is_file():
        chosen = Selection.load(selection).encoders
        if len(chosen) >= 2:
            return chosen, f"the `{profile}` profile's stage-3 encoders"
    return DEFAULT_TEN, "ten default encoders (no stage-3 selection found)"


def _phantom_probs(n_models: int, n_images: int, size: int, seed: int = 0) -> np.ndarray:
    """Model-like probability maps: the true mask of synthetic images, blurred and jittered per model."""
    from scipy import ndimage

    masks = np.stack([s.mask for s in generate("d1", n_images, seed=seed, size=size)]).astype(np.float32)
    rng = np.random.default_rng(seed)
    probs = []
    for _ in range(n_models):
        shifted = ndimage.shift(masks, (0, *rng.integers(-3, 4, size=2)), order=0)
        probs.append(np.clip(ndimage.gaussian_filter(shifted, (0, 2, 2)) + rng.normal(0, 0.05, shifted.shape), 0, 1))
    return np.stack(probs).astype(np.float32)


def inference_bench(encoders: list[str], device: torch.device, size: int, repeats: int, batches=(1, 2, 4)) -> dict:
    models = [_binary_unet(name).to(device).eval() for name in encoders]
    rows = []
    for name, model in zip(encoders, models):
        per_batch = {}
        for batch in batches:
            image = torch.rand(batch, 1, size, size, device=device)
            per_batch[batch] = 1000 * mean_seconds(ensemble_step([model], image, rules=()), repeats) / batch
        best = min(per_batch, key=per_batch.get)
        rows.append({"model": name, "ms_batch1": per_batch[1], "ms_best": per_batch[best], "best_batch": best})
    image = torch.rand(1, 1, size, size, device=device)
    forwards = [ensemble_step([m], image, rules=()) for m in models]
    singles = 1000 * mean_seconds(lambda: [forward() for forward in forwards], repeats)
    ensemble = 1000 * mean_seconds(ensemble_step(models, image), repeats)
    return {"per_model": rows, "sum_of_single_forwards_ms": singles, "ensemble_ms": ensemble,
            "ratio": ensemble / singles, "target_ratio": 1.10, "peak_memory_mb": peak_memory_mb(device)}


def aggregation_bench(size: int, n_models: int, batch: int, repeats: int) -> list[dict]:
    probs = _phantom_probs(n_models, batch, size)
    rows = []
    for method in (*RULES, *EXTRA_RULES):
        weights = np.linspace(0.8, 1.0, n_models) if method == "weighted" else None
        one = 1000 * mean_seconds(lambda: combine(probs[:, 0], method, 0.5, weights), repeats)
        many = 1000 * mean_seconds(lambda: combine(probs, method, 0.5, weights), max(1, repeats // 2), warmup=0)
        rows.append({"method": method, "ms_one_image": one, f"ms_batch_{batch}": many, "ms_per_image_in_batch": many / batch})
    return rows


def training_bench(device: torch.device, size: int, steps: int, batch_size: int = 4) -> list[dict]:
    """`fit`'s own step fed by the real pipeline (in-memory data + augmentation + batching) vs fixed arrays."""
    samples = list(generate("d1", 32, seed=0, size=size))
    images = np.stack([s.image for s in samples]).astype(np.float32) / 255
    masks = np.stack([s.mask for s in samples]).astype(np.uint8)
    augmentation = paper_augmentation(seed=0)
    rows = []
    for name in TRAINING_ENCODERS:
        trainer = Trainer(_binary_unet(name).train(), device, lr=1e-4)
        draws = itertools.count()

        def next_batch():
            index = np.random.default_rng(next(draws)).choice(len(images), batch_size, replace=False)
            return augment_batch(augmentation, images[index], masks[index])

        fed = mean_seconds(lambda: trainer.step(*next_batch()), steps)
        in_memory = mean_seconds(lambda: trainer.step(images[:batch_size], masks[:batch_size]), steps)
        data_only = mean_seconds(next_batch, steps * 4)
        rows.append({"encoder": name, "image_size": size, "batch_size": batch_size,
                     "ms_step_pipeline": 1000 * fed, "ms_step_in_memory": 1000 * in_memory,
                     "ms_data_only": 1000 * data_only, "ratio": fed / in_memory, "target_ratio": 1.10})
    return rows


def precision_bench(device: torch.device, size: int, steps: int, epochs: int, batch_size: int = 4) -> dict:
    """bf16 against fp32: the time of `fit`'s step, and the validation DSC of one encoder trained both ways."""
    samples = list(generate("d1", 48, seed=0, size=size))
    images = np.stack([s.image for s in samples]).astype(np.float32) / 255
    masks = np.stack([s.mask for s in samples]).astype(np.uint8)
    rows = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        trainer = Trainer(_binary_unet(PRECISION_ENCODER).train(), device, lr=3e-4, precision=precision)
        step = mean_seconds(lambda: trainer.step(images[:batch_size], masks[:batch_size]), steps)
        rows[precision] = {"ms_step": 1000 * step, "val_dsc": _trained_dsc(images, masks, precision, epochs, device)}
    return {"encoder": PRECISION_ENCODER, "image_size": size, "per_precision": rows,
            "ratio_bf16_to_fp32": rows["bf16"]["ms_step"] / rows["fp32"]["ms_step"], "target_ratio": 0.65,
            "val_dsc_gap_points": 100 * (rows["bf16"]["val_dsc"] - rows["fp32"]["val_dsc"])}


def _trained_dsc(images: np.ndarray, masks: np.ndarray, precision: str, epochs: int, device: torch.device) -> float:
    import tempfile

    from spineseg.data import Split
    from spineseg.train import TrainSettings, fit

    train = Split("d1", "train", tuple(map(str, range(40))), images[:40], masks[:40])
    val = Split("d1", "val", tuple(map(str, range(8))), images[40:], masks[40:])
    torch.manual_seed(0)
    model = _binary_unet(PRECISION_ENCODER)
    settings = TrainSettings(batch_size=4, lr=3e-4, max_epochs=epochs, patience=epochs, augment=True, seed=0,
                             precision=precision)
    with tempfile.TemporaryDirectory() as folder:
        return fit(model, train, val, settings, Path(folder), device).best_val_dsc


def torch_aggregation_bench(size: int, n_models: int, repeats: int, device: torch.device, forward_ms: float) -> dict:
    """The article's five rules on the device holding the probabilities, against M forward passes."""
    from spineseg.ensemble_torch import combine as combine_on_device

    probs = torch.from_numpy(_phantom_probs(n_models, 1, size)).to(device)
    per_rule = {rule: 1000 * mean_seconds(lambda: combine_on_device(probs, rule), repeats) for rule in RULES}
    total = sum(per_rule.values())
    return {"device": describe(device), "per_rule_ms": per_rule, "all_rules_ms": total,
            "forwards_ms": forward_ms, "fraction_of_forwards": total / forward_ms, "target_fraction": 0.10}


def predict_bench(encoders: list[str], device: torch.device, size: int, n_images: int) -> dict:
    """`spineseg predict` on a folder of PNGs (reading, every member, soft voting, writing) against the
    members' forward passes alone on the same images."""
    import tempfile

    from PIL import Image

    from spineseg.study.inference.apply import Ensemble, InferenceOptions, Member, predict_files

    models = [_binary_unet(name).to(device).eval() for name in encoders]
    members = [Member(name, model, (size, size)) for name, model in zip(encoders, models)]
    samples = list(generate("d1", n_images, seed=1, size=size))
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "in"
        inputs.mkdir()
        for sample in samples:
            Image.fromarray(sample.image).save(inputs / f"{sample.id}.png")
        batch = torch.from_numpy(np.stack([s.image for s in samples]).astype(np.float32)[:, None] / 255).to(device)
        forwards = [ensemble_step([m], batch[k:k + 4], rules=()) for m in models for k in range(0, n_images, 4)]
        forward_s = mean_seconds(lambda: [f() for f in forwards], 1)
        started = time.perf_counter()
        predict_files(Ensemble(members), inputs, Path(folder) / "out", InferenceOptions(str(device)), log=lambda message: None)
        pipeline_s = time.perf_counter() - started
    return {"images": n_images, "models": len(models), "image_size": size, "forwards_s": forward_s,
            "predict_s": pipeline_s, "throughput_ratio": forward_s / pipeline_s, "target_ratio": 0.90}


def dask_bench(project: Path, quick: bool = False) -> dict:
    """The smoke profile's stage-2 grid on 1 and on 2 Dask workers (1 thread each), and the cost of a task;
    `quick` trains each run of the grid for one epoch instead of the profile's two."""
    import shutil
    import tempfile

    from distributed import Client, LocalCluster

    from spineseg.study.core.config import ExecutorSection
    from spineseg.study.core.executors import DaskExecutor
    from spineseg.study.core.session import open_study
    from spineseg.study.runs.store import run_all
    from spineseg.study.stages.stage0_data import prepare_data
    from spineseg.study.stages.stage2_selection import stage2_specs

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder)
        shutil.copytree(project / "params", copy / "params")
        (copy / "pyproject.toml").write_text("")
        study = open_study("smoke", {"threads": 1, **({"stage2.max_epochs": 1, "stage2.patience": 1} if quick else {})}, copy)
        data = prepare_data(study)
        specs = stage2_specs(study, data)
        seconds = {}
        for workers in (1, 2):
            executor = DaskExecutor(ExecutorSection(kind="dask", workers=workers, threads_per_worker=1))
            started = time.perf_counter()
            run_all(specs, data, copy / f"store{workers}", device="cpu", executor=executor, log=lambda message: None)
            seconds[workers] = time.perf_counter() - started
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        client.gather(client.map(int, range(20)))  # warm-up
        started = time.perf_counter()
        client.gather(client.map(int, range(200), pure=False))
        overhead = (time.perf_counter() - started) / 200
    return {"runs": len(specs), "seconds_1_worker": seconds[1], "seconds_2_workers": seconds[2],
            "ratio": seconds[2] / seconds[1], "target_ratio": 0.60, "ms_per_task_overhead": 1000 * overhead}


def study_wall_times(project: Path) -> list[dict]:
    rows = []
    for profile, target in (("smoke", 5), ("quick", 45)):
        layout = Layout(project, profile)
        seconds = {}
        for name in NOTEBOOKS:
            path = layout.notebook_timing(name)
            if path.is_file():
                seconds[name] = json.loads(path.read_text())["seconds"]
        if seconds:
            total = sum(seconds.values())
            rows.append({"profile": profile, **{k: round(v, 1) for k, v in seconds.items()},
                         "total_min": round(total / 60, 2), "target_min": target,
                         "complete": len(seconds) == len(NOTEBOOKS)})
    return rows


def _markdown(report: dict) -> str:
    def table(rows) -> str:
        return pd.DataFrame(rows).round(3).to_markdown(index=False) if rows else "_not measured_"

    inf = report["inference"]
    lines = [
        "# spineseg benchmarks", "",
        f"Device: {report['device']} · torch {report['torch']} · threads {report['threads']} · {report['platform']}", "",
        f"## 1. Inference at {report['size']}² ({inf['encoders_from']})", "", table(inf["per_model"]), "",
        f"Ensemble (forwards + 5 rules): **{inf['ensemble_ms']:.1f} ms** per image; sum of single forwards "
        f"{inf['sum_of_single_forwards_ms']:.1f} ms; ratio **{inf['ratio']:.3f}** (target ≤ {inf['target_ratio']}). "
        f"Peak memory {inf['peak_memory_mb']:.0f} MB. Paper: 226 ms (10 models), 22–26 ms per model, ≤ 6 GB on an RTX 4060 Ti.", "",
        f"## 2. Aggregation alone (M = {report['n_models']}, {report['size']}²)", "", table(report["aggregation"]), "",
        "## 3. Training step: real data pipeline vs tensors in memory", "", table(report["training"]), "",
        "## 4. Study wall time per stage (s), from the runs' timing records", "", table(report["studies"]), "",
        f"## 5. bf16 against fp32 ({report['precision']['encoder']}, {report['precision']['image_size']}²)", "",
        table([{"precision": k, **v} for k, v in report["precision"]["per_precision"].items()]), "",
        f"bf16 step / fp32 step: **{report['precision']['ratio_bf16_to_fp32']:.2f}** (target ≤ 0.65 where the hardware "
        f"delivers); validation DSC gap {report['precision']['val_dsc_gap_points']:+.2f} points. `precision: auto` "
        f"uses bf16 on a CPU only where it is faster and within 1 point.", "",
        f"## 6. The five rules on the device ({report['torch_aggregation']['device']}), M = {report['n_models']}", "",
        table([report["torch_aggregation"]["per_rule_ms"]]), "",
        f"All five: {report['torch_aggregation']['all_rules_ms']:.1f} ms against {report['torch_aggregation']['forwards_ms']:.1f} ms "
        f"of forwards: **{report['torch_aggregation']['fraction_of_forwards']:.3f}** (target ≤ 0.10 on a GPU).", "",
        "## 7. `spineseg predict` throughput", "", table([report["predict"]]), "",
        "## 8. The smoke stage-2 grid on Dask (1 thread per worker)", "", table([report["dask"]]), "",
    ]
    return "\n".join(lines)


def run_bench(project: Path, profile: str = "quick", quick: bool = False, size: int = 512) -> dict:
    threads = configure_threads(0)
    device = pick_device("auto")
    repeats = 2 if quick else 5
    encoders, source = _ensemble_encoders(project, profile)
    if quick:
        encoders = encoders[:3]
    print(f"[bench] 1/4 inference of {len(encoders)} models at {size}² on {device} ...", flush=True)
    inference = inference_bench(encoders, device, size, repeats)
    inference["encoders_from"] = source
    print("[bench] 2/8 aggregation, 3/8 training steps, 4/8 study timings ...", flush=True)
    report = {
        "device": describe(device) + ("" if device.type == "cuda" else f", {platform.processor() or platform.machine()}"),
        "torch": torch.__version__, "threads": threads, "platform": platform.platform(), "size": size,
        "n_models": len(encoders), "inference": inference,
        "aggregation": aggregation_bench(size, len(encoders), batch=4, repeats=repeats),
        "training": training_bench(device, 128 if device.type == "cpu" else 256, steps=3 if quick else 8),
        "studies": study_wall_times(project),
    }
    print("[bench] 5/8 bf16 against fp32 ...", flush=True)
    report["precision"] = precision_bench(device, 96 if quick else 128, steps=3 if quick else 8, epochs=1 if quick else 8)
    print("[bench] 6/8 the rules on the device, 7/8 predict throughput ...", flush=True)
    forward_ms = inference["sum_of_single_forwards_ms"]
    report["torch_aggregation"] = torch_aggregation_bench(size, len(encoders), repeats, device, forward_ms)
    report["predict"] = predict_bench(encoders, device, size, n_images=4 if quick else 12)
    print("[bench] 8/8 the smoke grid on Dask ...", flush=True)
    report["dask"] = dask_bench(project, quick)
    out = bench_dir(project)
    atomic.write_json(out / "report.json", report)
    text = _markdown(report)
    atomic.write_text(out / "report.md", text)
    print(text)
    return report
