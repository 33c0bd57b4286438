"""Command line: ``spineseg data synth|aasce|nnunet``, ``spineseg run``, ``spineseg predict``, ``spineseg export``,
``spineseg report``, ``spineseg bench``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from spineseg.errors import ConfigError, SpinesegError
from spineseg.names import EXTRA_RULES, RULES

UNWRITABLE = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("spineseg")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _profile_help(default: str | None = "quick") -> str:
    """The --profile help: the profiles of the project this runs in (params/*.yaml), and the default."""
    from spineseg.study.core.artifacts import known_profiles
    from spineseg.study.core.session import find_project

    try:
        profiles = known_profiles(find_project())
    except ConfigError:  # outside a project: the names would be a guess
        profiles = "the names of params/*.yaml"
    return f"one of: {profiles}" + (f" (default: {default})" if default else "")


def _size(text: str):
    """``512`` or ``512x192`` (height × width)."""
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: use a number of pixels, or HEIGHTxWIDTH like 512x192") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"size {text!r}: use a number of pixels, or HEIGHTxWIDTH like 512x192")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _synth(args) -> None:
    from spineseg.data.synthetic import synthesize

    for name, folder in synthesize(args.out, seed=args.seed, size=args.size, force=args.force).items():
        print(f"{name}: {folder}")


def _aasce(args) -> None:
    from spineseg.data.aasce import convert

    for name, folder in convert(args.src, args.out, splits=args.splits.split(","), size=args.size, seed=args.seed,
                                force=args.force, later_batch=args.later_batch).items():
        print(f"{name}: {folder}")


def _nnunet(args) -> None:
    from spineseg.data.nnunet import export_nnunet
    from spineseg.study.stages.stage0_data import prepare_data

    data = prepare_data(_study(args))  # the study's datasets, made or converted once, as every stage sees them
    print(export_nnunet(data.d1, args.out, data.d2, dataset_id=args.dataset_id))


def _run(args) -> None:
    from spineseg.study.core.config import parse_override
    from spineseg.study.core.session import find_project
    from spineseg.study.runner import parse_stages, run_study

    overrides = dict(parse_override(text) for text in args.set or [])
    # how the study runs, never what it finds: the profile's own folder, no variant (`artifacts.HOW_NOT_WHAT`)
    overrides |= {key: value for key, value in (("threads", args.threads), ("device", args.device)) if value is not None}
    run_study(find_project(), args.profile, parse_stages(args.stages), overrides, in_place=args.in_place)


def _study(args):
    """The profile's study in --project (or the project this command runs in), at its thread count."""
    from spineseg.device import configure_threads
    from spineseg.study.core.session import find_project, open_study

    try:
        project = find_project(args.project)
    except ConfigError as exc:
        bundle = ", or predict with a bundle: --model FILE.zip" if args.command == "predict" else ""
        raise ConfigError(f"{exc}; name the project with --project DIR{bundle}") from None
    study = open_study(args.profile or "quick", project_dir=project)
    configure_threads(study.cfg.threads)  # this entry point's one setting of torch's threads
    return study


def _predict(args) -> int:
    from contextlib import nullcontext

    from spineseg.study.inference.apply import InferenceOptions, check_folders, check_variant, predict_with
    from spineseg.study.inference.bundle import open_bundle

    if args.model and (args.profile or args.project):
        raise ConfigError("--model runs a bundle on its own: leave out --profile and --project")
    # everything the command line alone decides is checked before a study or a bundle (minutes to unpack) is read
    check_variant(args.rule, args.two_stage, args.located)
    InferenceOptions(args.device or "auto", "auto", args.tta, args.batch_size, args.threshold, args.any_modality)
    check_folders(args.input, args.out)
    study = None if args.model else _study(args)
    if study is not None:  # the study's own run folders; a bundle needs none of the study's records or training code
        from spineseg.study.deployment import study_ensemble
    with open_bundle(args.model) if args.model else nullcontext(study_ensemble(study)) as found:
        device = args.device or (study.cfg.device if study else "auto")
        options = InferenceOptions(device, found.precision, args.tta, args.batch_size, args.threshold, args.any_modality)
        report = predict_with(found, args.input, args.out, options, args.rule, args.probabilities, args.two_stage,
                              args.located)
    return 1 if report.failed else 0  # some radiographs could not be segmented: the exit says so (see --help)


def _export(args) -> None:
    from spineseg.study.deployment import export_bundle

    print(export_bundle(_study(args), args.out, force=args.force))


def _report(args) -> None:
    from spineseg.study.core.session import find_project
    from spineseg.study.report.pages import write_report

    for path in write_report(find_project(), args.profile, args.out, progress=True):
        print(path)


def _results(args) -> None:
    """Keep a run's results file in the repository and render the README's block from it (no number by hand)."""
    import shutil

    from spineseg.errors import StageOrderError
    from spineseg.study.core.artifacts import Layout
    from spineseg.study.core.session import find_project
    from spineseg.study.report.results import render, update_readme

    project = find_project()
    kept = args.keep
    if args.profile:
        produced = Layout(project, args.profile).results("json")
        if not produced.is_file():
            raise StageOrderError(f"{produced} is missing: run `spineseg run --profile {args.profile}` first (stage 5 writes it)")
        if kept is None:
            print(render(json.loads(produced.read_text())), end="")
            return
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced, kept)
    if kept is None:
        raise StageOrderError("spineseg results: give --profile (a run's results) or --keep (a kept results file)")
    if not kept.is_file():
        raise ConfigError(f"--keep {kept}: no such results file")
    if args.readme:
        print(f"{args.readme}: {'updated' if update_readme(args.readme, kept) else 'already as rendered'} from {kept}")
    else:
        print(render(json.loads(kept.read_text())), end="")


def _bench(args) -> None:
    from spineseg.study.bench import run_bench
    from spineseg.study.core.session import find_project

    run_bench(find_project(), profile=args.profile, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spineseg", description=__doc__,
                                     epilog="exit status: 0 done; 1 done, but some radiographs could not be segmented "
                                            "(predict); 2 an error in what was asked (one line says which); 130 Ctrl-C")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make or convert datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the embedded synthetic datasets d1 and d2")
    synth.add_argument("--out", required=True, type=Path, help="the folder to write d1/ and d2/ to")
    synth.add_argument("--seed", type=int, default=0, help="the radiographs' random seed (default: 0)")
    synth.add_argument("--size", type=int, default=512, help="the images' side in pixels (default: 512)")
    synth.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    synth.set_defaults(func=_synth)
    aasce = data.add_parser("aasce", help="convert AASCE/BoostNet radiographs into Th8–Th11 datasets")
    aasce.add_argument("--src", required=True, type=Path, help="the boostnet_labeldata folder")
    aasce.add_argument("--out", required=True, type=Path, help="the folder to write the datasets to")
    aasce.add_argument("--splits", default="training,test",
                       help="the source splits to convert: training (split by patient into d1) and test (test-only d2); default: training,test")
    aasce.add_argument("--size", type=_size, default=(512, 192),
                       help="HEIGHTxWIDTH (default 512x192, close to the radiographs' aspect) or one side for squares")
    aasce.add_argument("--seed", type=int, default=0, help="the seed of the patient split (default: 0)")
    aasce.add_argument("--later-batch", type=float, default=0.0,
                       help="hold out this share of the training split, its latest acquisitions, as a test set of its own")
    aasce.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    aasce.set_defaults(func=_aasce)
    nnunet = data.add_parser("nnunet", help="write a study's datasets as an nnU-Net v2 raw dataset (its split as fold 0)")
    nnunet.add_argument("--profile", default="quick", help=_profile_help())
    nnunet.add_argument("--project", type=Path, help="the project folder (default: the one this runs in)")
    nnunet.add_argument("--out", required=True, type=Path, help="nnUNet_raw: Dataset<id>_SpineTh8Th11/ is written in it")
    nnunet.add_argument("--dataset-id", type=int, default=501, help="nnU-Net's dataset id, 500–999 for your own (default: 501)")
    nnunet.set_defaults(func=_nnunet)

    run = commands.add_parser("run", help="execute the study notebooks with papermill")
    run.add_argument("--profile", default="quick", help=_profile_help() + "; smoke is a ~10-minute first look")
    run.add_argument("--stages", help="e.g. 2,3 or 1-4 (default: all)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a profile value, e.g. stage2.repeats=3")
    run.add_argument("--threads", type=int, metavar="N",
                     help="torch threads (default: the profile's; 0 = every core), e.g. 1 to leave the machine usable")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the profile's, usually auto)")
    run.add_argument("--in-place", action="store_true",
                     help="write into runs/<profile> even when --set changes results (default: runs/<profile>+<hash>)")
    run.set_defaults(func=_run)

    predict = commands.add_parser("predict", help="segment Th8–Th11 on new radiographs with a study's ensemble or a bundle")
    predict.add_argument("-m", "--model", type=Path, help="a bundle from `spineseg export` (.zip or its unpacked folder): "
                                                    "runs anywhere, without the project")
    predict.add_argument("--profile", help="the study whose stage-3 models to use, " + _profile_help() + "; run it first")
    predict.add_argument("--project", type=Path, help="the project folder of --profile (default: the one this runs in)")
    predict.add_argument("-i", "--input", required=True, type=Path, help="a PNG, JPEG or DICOM file, or a folder of them")
    predict.add_argument("-o", "--out", required=True, type=Path,
                         help="the folder for masks/, overlays/ and predictions.csv")
    predict.add_argument("--rule", help=f"ensemble rule, one of {', '.join((*RULES, *EXTRA_RULES))} (default: what "
                                        "stage 4 chose on validation, the located or two-stage variant included; with "
                                        "--two-stage, the locator stage 4 chose; not with --located)")
    predict.add_argument("--threshold", type=float, help="T (default: the study's stage4.threshold)")
    predict.add_argument("--tta", action=argparse.BooleanOptionalAction,
                         help="also predict each mirror image, and average (default: as the study's stage 3 did, "
                              "stage3.tta_hflip; --no-tta to skip it)")
    predict.add_argument("--probabilities", action="store_true", help="also write 16-bit probability maps")
    predict.add_argument("--batch-size", type=int, default=4, help="images a member reads at once (default: 4)")
    predict.add_argument("--two-stage", action="store_true",
                         help="let the study's crop model outline the region in a box around the rule's mask")
    predict.add_argument("--located", action="store_true",
                         help="the located variant: the crop model outlines the four vertebrae the study's locator names "
                              "(also writes their centres and chains.csv)")
    predict.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the profile's; auto for a bundle)")
    predict.add_argument("--any-modality", action="store_true",
                         help="also read DICOMs that are not projection radiographs (CR, DX, RG)")
    predict.set_defaults(func=_predict)

    export = commands.add_parser("export", help="write a study's ensemble as a bundle that `predict --model` runs anywhere")
    export.add_argument("--profile", default="quick", help=_profile_help())
    export.add_argument("--project", type=Path, help="the project folder (default: the one this runs in)")
    export.add_argument("--out", required=True, type=Path, help="the bundle, a .zip file")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.set_defaults(func=_export)

    report = commands.add_parser("report", help="the rendered study as HTML without code, for readers")
    report.add_argument("--profile", default="quick", help=_profile_help())
    report.add_argument("-o", "--out", type=Path, help="the folder to write the pages to (default: runs/<profile>/report/)")
    report.set_defaults(func=_report)

    results = commands.add_parser("results", help="a run's headline numbers: print them, keep the file, render the README")
    results.add_argument("--profile", help="the run whose runs/<profile>/results.json to read (stage 5 writes it)")
    results.add_argument("--keep", type=Path, help="the kept copy, e.g. docs/results/aasce.json (with --profile: "
                                                 "copied there; without: read from there)")
    results.add_argument("--readme", type=Path, help="fill this README's <!-- results:<name> --> block from --keep")
    results.set_defaults(func=_results)

    bench = commands.add_parser("bench", help="inference, aggregation and training benchmarks")
    bench.add_argument("--profile", default="quick", help="whose stage-3 models and run timings to measure, " + _profile_help())
    bench.add_argument("--quick", action="store_true", help="fewer repeats (a fast check)")
    bench.set_defaults(func=_bench)
    return parser


def _quiet_shutdown() -> None:
    """After Ctrl-C, background tasks of the notebook client may still fail as the kernel goes away;
    their reports ("Task exception was never retrieved", "Kernel died") would bury the one line that matters."""
    import logging
    import threading

    logging.getLogger("asyncio").disabled = True
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except SpinesegError as exc:  # the user's input; anything else is a bug and keeps its traceback
        print(f"spineseg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        # the machine's state, not a bug: a read-only or full disk, a folder of another account. Every write is
        # atomic (`spineseg.atomic`), so what was written before stays whole.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"spineseg: error: cannot write{where}: {exc.strerror}; files written before are complete", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _quiet_shutdown()
        print("\nspineseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return status or 0
