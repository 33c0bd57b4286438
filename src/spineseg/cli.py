"""Command line: ``spineseg data synth|aasce``, ``spineseg run``, ``spineseg bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spineseg.errors import SpinesegError


def _synth(args) -> None:
    from spineseg.data.synthetic import synthesize

    for name, folder in synthesize(args.out, seed=args.seed, size=args.size, force=args.force).items():
        print(f"{name}: {folder}")


def _aasce(args) -> None:
    from spineseg.data.aasce import convert

    for name, folder in convert(args.src, args.out, splits=args.splits.split(","), size=args.size, seed=args.seed,
                                force=args.force).items():
        print(f"{name}: {folder}")


def _run(args) -> None:
    from spineseg.study.config import parse_override
    from spineseg.study.runner import parse_stages, run_study
    from spineseg.study.session import find_project

    overrides = dict(parse_override(text) for text in args.set or [])
    run_study(find_project(), args.profile, parse_stages(args.stages), overrides)


def _bench(args) -> None:
    from spineseg.study.bench import run_bench
    from spineseg.study.session import find_project

    run_bench(find_project(), profile=args.profile, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spineseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make or convert datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the embedded synthetic datasets d1 and d2")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=512)
    synth.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    synth.set_defaults(func=_synth)
    aasce = data.add_parser("aasce", help="convert AASCE/BoostNet radiographs into Th8–Th11 datasets")
    aasce.add_argument("--src", required=True, type=Path, help="the boostnet_labeldata folder")
    aasce.add_argument("--out", required=True, type=Path)
    aasce.add_argument("--splits", default="training,test")
    aasce.add_argument("--size", type=int, default=512)
    aasce.add_argument("--seed", type=int, default=0)
    aasce.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    aasce.set_defaults(func=_aasce)

    run = commands.add_parser("run", help="execute the study notebooks with papermill")
    run.add_argument("--profile", default="quick")
    run.add_argument("--stages", help="e.g. 2,3 or 1-4 (default: all)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a profile value, e.g. stage2.repeats=3")
    run.set_defaults(func=_run)

    bench = commands.add_parser("bench", help="inference, aggregation and training benchmarks")
    bench.add_argument("--profile", default="quick", help="whose stage-3 models and run timings to measure")
    bench.add_argument("--quick", action="store_true", help="fewer repeats (a fast check)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SpinesegError as exc:  # the user's input; anything else is a bug and keeps its traceback
        print(f"spineseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nspineseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
