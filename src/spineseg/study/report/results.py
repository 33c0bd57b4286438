"""The study's headline numbers as one file the README quotes: ``results.json`` (and a readable ``results.md``).

Stage 5 writes it from the tables and records the run produced — identification and DSC of the chosen models,
rules and references with their patient-cluster intervals, the declared endpoint's tests, the wall time of
each stage, the commit and the data fingerprint — so that no number reaches the README by hand:
`render` turns a results file into the README's section, and a test checks that the README holds exactly
what `render` makes of the file kept under ``docs/results/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from spineseg import atomic
from spineseg.errors import StageOrderError
from spineseg.identification import FAILURES
from spineseg.names import LOCATED, LOCATOR, NNUNET, PRIOR_BAND, PRIOR_MEAN, rule_name
from spineseg.study.core.artifacts import NOTEBOOKS, SCRATCH_TWINS, read_table
from spineseg.study.core.records import Learned
from spineseg.study.core.session import Study, StudyData
from spineseg.study.report.tables import identification_summary, load_identification
from spineseg.study.runs.store import read_summary
from spineseg.study.stages.located import locator_spec
from spineseg.study.stages.nnunet import NnUNetPeer
from spineseg.study.stages.two_stage import crop_spec

FORMAT = "spineseg-results/1"
DATASETS = {"d1": "dataset-1 test (random split)", "d2": "dataset 2"}
CRITERIA = (("identified_strict", "Identified strictly"), ("centres_identified", "Centres identified"), ("dsc", "DSC"))


def collect(study: Study, data: StudyData) -> dict:
    """The headline numbers of a finished study, from its files."""
    frame = load_identification(study)
    if frame is None or not study.layout.learned.is_file():
        raise StageOrderError(f"no identification table or learned.json under {study.layout.run_dir}: run stages 4 and 5 first")
    learned = Learned.load(study.layout.learned)
    shown = {"best single model (validation)": ("model", learned.best_model),
             f"best rule (validation): {rule_name(learned.best_rule)}": ("rule", learned.best_rule),
             rule_name(LOCATED): ("rule", LOCATED), rule_name(NNUNET): ("peer", NNUNET), rule_name(LOCATOR): ("locator", LOCATOR),
             rule_name(PRIOR_MEAN): ("prior", PRIOR_MEAN), rule_name(PRIOR_BAND): ("prior", PRIOR_BAND)}
    datasets = {}
    for dataset, part in frame.groupby("dataset"):
        methods, seen = {}, set()
        for label, (kind, group) in shown.items():
            method = part[(part["kind"] == kind) & (part["group"] == group)]
            if method.empty or (kind, group) in seen:  # the chosen rule is the located variant: one row, the chosen
                continue
            seen.add((kind, group))
            row = identification_summary(method, study.cfg.analysis.n_boot).iloc[0]
            methods[label] = {key: _with_interval(row, name) for key, name in CRITERIA if name in row and pd.notna(row[name])}
            methods[label] |= {"images": int(len(method)), "patients": int(method["patient"].nunique())}
        datasets[dataset] = {"description": _description(study, dataset), "methods": methods}
    return {"format": FORMAT, "profile": study.name, "primary_endpoint": study.cfg.analysis.primary_endpoint,
            "best_rule": learned.best_rule, "best_model": learned.best_model, "datasets": datasets,
            "failures": _failures(study, [rule_name(learned.best_rule), learned.best_model]),
            "locator": _locator(study, data), "endpoint": _endpoint(study), "pretraining": _pretraining(study),
            "peer": _peer(study, data), "training_minutes": _training_minutes(study, data),
            "stage_minutes": _stage_minutes(study),
            "provenance": _provenance(study) | {"data": data.fingerprint}}


def _with_interval(row: pd.Series, name: str) -> dict:
    value = {"mean": round(float(row[name]), 1)}
    if f"{name} CI low" in row:
        value |= {"ci": [round(float(row[f"{name} CI low"]), 1), round(float(row[f"{name} CI high"]), 1)]}
    return value


def _description(study: Study, dataset: str) -> str:
    if dataset == "d2" and study.cfg.data.source == "aasce" and study.cfg.data.later_batch:
        return f"dataset 2: the later batch (latest {study.cfg.data.later_batch:.0%} of the training split by acquisition day)"
    return DATASETS.get(dataset, dataset)


def _failures(study: Study, labels: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """What kind of wrong the validation-chosen rule and model are on each test set (% of images, 05's taxonomy)."""
    found = {}
    for dataset in DATASETS:
        path = study.layout.table(f"identification_failures_{dataset}", "csv")
        if path.is_file():
            table = read_table(path).set_index("Unnamed: 0")
            found[dataset] = {label: table.loc[label].round(1).to_dict() for label in dict.fromkeys(labels) if label in table.index}
    return found


def _locator(study: Study, data: StudyData) -> dict:
    """How the locator was trained and which checkpoint validation chose."""
    spec = locator_spec(study, data)
    files = spec.files(study.layout.store) if spec else None
    if files is None or not files.summary.is_file():
        return {}
    run = read_summary(files)
    return {"encoder": run["encoder"], "image_size": run["image_size"], "augmentation": run["augmentation"],
            "best_epoch": run["best_epoch"], "epochs_run": run["epochs_run"], "max_epochs": run["max_epochs"],
            "validation_identified": round(100 * run["best_val_dsc"], 1), "minutes": round(run["seconds"] / 60, 1)}


def _peer(study: Study, data: StudyData) -> dict:
    """The nnU-Net peer's plan, budget and minutes (`spineseg.nnunet_peer`), and the study's best rule against it on
    DSC (Wilcoxon by patient; its identification test is in the endpoint's family)."""
    peer = NnUNetPeer.load(study, data)
    if peer is None:
        return {}
    found = peer.summary()
    path = study.layout.table("wilcoxon", "csv")
    if path.is_file():
        tests = read_table(path)
        tests = tests[(tests["family"] == "best rule vs nnU-Net") & (tests["metric"] == "dsc")]
        columns = ["dataset", "a", "b", "n", "median_diff", "effect_size", "p", "p_holm_all"]
        found["dsc_tests"] = tests[columns].round({"median_diff": 4, "effect_size": 4}).to_dict(orient="records")
    return found


def _training_minutes(study: Study, data: StudyData) -> dict[str, float]:
    """Minutes each group of the study's own trainings took (each run's own wall time, however often the stages
    were rerun): the budget the nnU-Net peer is measured against."""
    minutes = {}
    for stage in ("stage1", "stage2", SCRATCH_TWINS, "stage3"):
        path = study.layout.runs_table(stage)
        if path.is_file():
            minutes[stage] = round(float(read_table(path)["seconds"].sum()) / 60, 1)
    for name, spec in (("locator", locator_spec(study, data)), ("crop model", crop_spec(study, data))):
        if spec is not None and spec.files(study.layout.store).summary.is_file():
            minutes[name] = round(read_summary(spec.files(study.layout.store))["seconds"] / 60, 1)
    return minutes


def _endpoint(study: Study) -> list[dict]:
    path = study.layout.table("identification_endpoint", "csv")
    return read_table(path).to_dict(orient="records") if path.is_file() else []


def _pretraining(study: Study) -> dict:
    """05's pre-trained vs from-scratch comparison (`spineseg.study.report.pretraining`), where the profile trains twins."""
    means, tests = study.layout.table("pretraining", "csv"), study.layout.table("pretraining_wilcoxon", "csv")
    if not means.is_file():
        return {}
    arms = read_table(means).rename(columns={"Unnamed: 0": "arm"})
    kept = [c for c in ("arm", "runs", "val_dsc", "test_dsc_d1", "test_dsc_d2", "identified_d1") if c in arms]
    found = {"arms": arms[kept].round(2).to_dict(orient="records")}
    if tests.is_file():
        table = read_table(tests)
        kept = [c for c in ("dataset", "a", "b", "n", "median_diff", "effect_size", "p", "p_holm") if c in table]
        found["tests"] = table[kept].to_dict(orient="records")
    return found


def _stage_minutes(study: Study) -> dict[str, float]:
    minutes = {}
    for name in NOTEBOOKS:
        path = study.layout.notebook_timing(name)
        if path.is_file():
            minutes[name] = round(json.loads(path.read_text())["seconds"] / 60, 1)
    return minutes


def _provenance(study: Study) -> dict:
    """What made the results: the commit, machine and threads that executed the analysis notebook."""
    path = study.layout.provenance
    sections = json.loads(path.read_text()) if path.is_file() else {}
    analysis = sections.get("05_analysis", next(iter(sections.values()), {}))
    found = {key: analysis.get(key) for key in ("git_commit", "git_modified", "machine", "threads")}
    # a stage rerun later (stage 5 alone, say) runs at a later commit than the training it reports
    return found | {"stage_commits": {name: section.get("git_commit") for name, section in sections.items()}}


def write(study: Study, data: StudyData) -> dict:
    """results.json and results.md in the study's folder; returns the results."""
    results = collect(study, data)
    atomic.write_json(study.layout.results("json"), results)
    atomic.write_text(study.layout.results("md"), render(results))
    return results


def _value(value: dict | None) -> str:
    if not value:
        return "—"
    interval = f" [{value['ci'][0]:.1f}, {value['ci'][1]:.1f}]" if "ci" in value else ""
    return f"{value['mean']:.1f}{interval}"


def render(results: dict) -> str:
    """The README's results section for one results file (Markdown)."""
    if results.get("format") != FORMAT:
        raise StageOrderError(f"not a {FORMAT} file (format {results.get('format')!r})")
    lines = []
    for dataset, part in results["datasets"].items():
        lines += [f"**{part['description']}**", "",
                  "| | identified strictly (%) | centres identified (%) | DSC (%) | images / patients |",
                  "|---|---:|---:|---:|---:|"]
        chosen = rule_name(results["best_rule"])
        for method, values in sorted(part["methods"].items(), key=lambda item: _method_rank(item[0])):
            if method == chosen and f"best rule (validation): {chosen}" in part["methods"]:
                continue  # the same rows (files written before `collect` kept one)
            lines.append(f"| {method} | {_value(values.get('identified_strict'))} | {_value(values.get('centres_identified'))} "
                         f"| {_value(values.get('dsc'))} | {values['images']} / {values['patients']} |")
        lines.append("")
        failures = results.get("failures", {}).get(dataset, {})
        for method, kinds in sorted(failures.items(), key=lambda item: item[0] != chosen):  # the chosen rule first
            wrong = ", ".join(f"{kind} {kinds[kind]:.1f}" for kind in sorted(kinds, key=_failure_rank)
                              if kind != "identified" and kinds[kind] > 0)
            lines.append(f"- What kind of wrong, {method} (% of images): {wrong or 'none'}.")
        if failures:
            lines.append("")
    locator = results.get("locator")
    if locator:
        height, width = locator["image_size"]
        lines.append(f"- The locator: {locator['encoder']} at {height} × {width}, {locator['augmentation']} augmentation, "
                     f"{locator['minutes']:.1f} min; the checkpoint of epoch {locator['best_epoch']} of "
                     f"{locator['epochs_run']} (of at most {locator['max_epochs']}), chosen on validation, where its "
                     f"centres identified {locator['validation_identified']:.1f} %.")
    for row in results["endpoint"]:
        versus = [f"{row['Best rule']} − {name}: {row[f'Δ rule − {arm} (pp)']:+.1f} pp [{row[f'Δ rule − {arm} (pp) CI low']:.1f}, "
                  f"{row[f'Δ rule − {arm} (pp) CI high']:.1f}], r = {row[f'r rule vs {arm} (rank-biserial)']:.2f}, "
                  f"p = {row[f'p rule vs {arm} (Wilcoxon by patient, Holm)']}"
                  for arm, name in (("model", row["Best model"]), ("prior", "mean-position prior"), ("peer", "nnU-Net"))
                  if f"Δ rule − {arm} (pp)" in row]
        lines.append(f"- Primary endpoint, identified strictly ({row['Dataset']}): {'; '.join(versus)}.")
    pretraining = results.get("pretraining") or {}
    if pretraining.get("arms"):
        lines += ["", "Pre-trained vs from scratch (stage 2, the same encoder, settings and epochs):", "",
                  "| | validation DSC | test DSC, dataset 1 | test DSC, dataset 2 | identified, dataset 1 (coverage) |",
                  "|---|---:|---:|---:|---:|"]
        for arm in pretraining["arms"]:
            cells = [arm.get(key) for key in ("val_dsc", "test_dsc_d1", "test_dsc_d2", "identified_d1")]
            lines.append(f"| {arm['arm']} | " + " | ".join("—" if c is None or c != c else f"{c:.1f}" for c in cells) + " |")
        for test in pretraining.get("tests", []):
            lines.append(f"- {test['a']} − {test['b']} ({test['dataset']}, test DSC): median per patient "
                         f"{test['median_diff']}, r = {test['effect_size']}, p = {test['p']}"
                         f"{'' if 'p_holm' not in test else ' (Holm over the table: ' + str(test['p_holm']) + ')'}, "
                         f"n = {test['n']} patients.")
        lines.append("")
    peer = results.get("peer")
    if peer:
        lines.append(_peer_line(peer, results.get("training_minutes") or {}))
    minutes = results["stage_minutes"]
    if minutes:
        stages = ", ".join(f"{name.split('_', 1)[0]} {value:.1f}" for name, value in minutes.items())
        lines.append(f"- Wall time (min) of the stages timed when this file was written (stage 5 writes it): {stages}; "
                     f"{sum(minutes.values()):.1f} in all.")
    provenance = results["provenance"]
    lines.append(f"- {_commits(provenance)}{' (modified)' if provenance['git_modified'] else ''}, "
                 f"{provenance['machine']}, {provenance['threads']} threads, data {provenance['data']}.")
    return "\n".join(lines) + "\n"


def _peer_line(peer: dict, training: dict[str, float]) -> str:
    budget, minutes = peer["budget"], peer["minutes"]
    height, width = peer["patch_size"]
    own = (f"; the study's own trainings took {sum(training.values()):.1f} min ("
           + ", ".join(f"{name} {value:.1f}" for name, value in training.items()) + ")") if training else ""
    tests = "".join(f"; best rule − nnU-Net, DSC ({test['dataset']}, exploratory): median per patient "
                    f"{test['median_diff']:+.3f}, r = {test['effect_size']:.2f}, p = {test['p']:.3g} (Holm over the "
                    f"secondary family: {test['p_holm_all']:.3g}), n = {test['n']} patients"
                    for test in peer.get("dsc_tests", []))
    return (f"- The peer, nnU-Net v2 {peer['nnunetv2']} ({peer['configuration']}, its own plan: patch {height} × {width}, "
            f"batch {peer['batch_size']}): {budget['epochs']} epochs × {budget['iterations']} batches = "
            f"{peer['batches'] * peer['batch_size']:,} patches seen ({peer['training_cases']} training images), "
            f"{minutes['train']:.1f} min of training on {peer['device']} with {peer['threads']} threads "
            f"(+ {minutes['plan_and_preprocess']:.1f} min planning, {minutes['predict']:.1f} min predicting "
            f"{peer['test_cases']} test images with its mirroring){own}{tests}.")


# the order the README shows: the validation-chosen model and rule, the located variant, the peer, the locator, the priors
SHOWN_ORDER = ("best single model", "best rule", rule_name(LOCATED), rule_name(NNUNET), rule_name(LOCATOR),
               rule_name(PRIOR_MEAN), rule_name(PRIOR_BAND))


def _method_rank(label: str) -> int:
    """A results file's JSON keeps its keys sorted: the README's rows come in `SHOWN_ORDER` whatever it holds."""
    return next((rank for rank, start in enumerate(SHOWN_ORDER) if label.startswith(start)), len(SHOWN_ORDER))


def _failure_rank(kind: str) -> int:
    return FAILURES.index(kind) if kind in FAILURES else len(FAILURES)


def _commits(provenance: dict) -> str:
    """'Commit X', or, where the stages ran at several commits, each commit with the stages it ran."""
    stages: dict[str, list[str]] = {}
    for name, commit in (provenance.get("stage_commits") or {}).items():
        stages.setdefault(str(commit)[:10], []).append(name.split("_", 1)[0])
    if len(stages) <= 1:
        return f"Commit {str(provenance['git_commit'])[:10]}"
    return "Commits " + ", ".join(f"{commit} (stages {', '.join(names)})" for commit, names in stages.items())


def readme_block(results_file: Path) -> str:
    """The marked README block of one kept results file: what `render` makes of it, between its two markers."""
    name = Path(results_file).stem
    return f"<!-- results:{name} -->\n{render(json.loads(Path(results_file).read_text()))}<!-- /results:{name} -->"


def update_readme(readme: Path, results_file: Path) -> bool:
    """Replace the README's block for `results_file` with its rendering; True when the README changed."""
    name = Path(results_file).stem
    text = Path(readme).read_text()
    pattern = re.compile(rf"<!-- results:{re.escape(name)} -->.*?<!-- /results:{re.escape(name)} -->", re.DOTALL)
    if not pattern.search(text):
        raise StageOrderError(f"{readme} has no <!-- results:{name} --> … <!-- /results:{name} --> block to fill")
    updated = pattern.sub(lambda _: readme_block(results_file), text)
    if updated != text:
        atomic.write_text(readme, updated)
    return updated != text
