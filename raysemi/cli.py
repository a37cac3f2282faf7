"""``raysemi`` command line: one subcommand per workflow step.

Every command that reads a config takes ``--config FILE`` and repeated ``--set dotted.key=value``.
Errors raised on purpose (bad data, bad config) print one clear message and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from raysemi.errors import RaysemiError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (defaults when omitted)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set loss.tau_high=0.3 (repeatable)",
    )


def _config(args: argparse.Namespace):
    from raysemi.config import load_config

    return load_config(args.config, args.overrides)


# -- commands ---------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from raysemi.data.synth import synth_dataset

    sites: list[str] | dict[str, int]
    if args.site_counts:
        sites = {}
        for item in args.site_counts:
            name, _, count = item.partition("=")
            if not count.isdigit():
                raise RaysemiError(f"--site-counts {item!r}: expected SITE=COUNT, e.g. A=8")
            sites[name] = int(count)
        cases = None
    else:
        sites, cases = args.sites, args.cases
    spacing = None if args.spacing is None else (args.spacing if len(args.spacing) == 3 else args.spacing * 3)
    folders = synth_dataset(
        args.out, cases, tuple(args.shape), spacing=spacing, seed=args.seed, sites=sites, png=args.png,
        workers=args.workers,
    )
    print(f"wrote {len(folders)} cases to {args.out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from raysemi.data.brats import discover_cases, validate_cases
    from raysemi.evaluation.report import markdown_table

    cases = discover_cases(args.root, site_map=args.site_map)
    problems = validate_cases(cases)
    rows = [[p.case_id, p.file, p.field, p.problem] for items in problems.values() for p in items]
    bad = sum(1 for items in problems.values() if items)
    if rows:
        print(markdown_table(["case", "file", "field", "problem"], rows))
    print(f"\n{len(cases)} cases checked, {bad} with problems, {len(cases) - bad} ok")
    return 1 if bad else 0


def cmd_split(args: argparse.Namespace) -> int:
    from raysemi.data.brats import discover_cases, make_split

    cfg = _config(args)
    cases = discover_cases(args.root or cfg.data.root, site_map=cfg.data.site_map)
    split = make_split(
        cases, cfg.data.labeled_fraction, cfg.data.validation_fraction, cfg.data.seed,
        labeled_sites=cfg.data.labeled_sites, unlabeled_sites=cfg.data.unlabeled_sites,
        validation_sites=cfg.data.validation_sites, max_labeled=cfg.data.max_labeled,
    )
    out = Path(args.out)
    split.write_manifest(out)
    print(
        f"{len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled "
        f"({len(split.hidden_truth)} with hidden truth), {len(split.validation)} validation -> {out}"
    )
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from raysemi.train.pipeline import train_teacher_command

    train_teacher_command(_config(args))
    return 0


def cmd_train_baseline(args: argparse.Namespace) -> int:
    from raysemi.train.baselines import train_baseline_command

    train_baseline_command(_config(args), args.method)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raysemi.train.semi_pipeline import run_command

    run_command(_config(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raysemi.demo import demo

    demo(_config(args), cases=args.cases, shape=tuple(args.shape), teacher_only=args.teacher_only)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
    return 0


# -- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysemi",
        description="Semi-supervised brain tumour segmentation (uncertainty-guided teacher-student) on Ray.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str, config: bool = True):
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(func=func)
        if config:
            _add_config_args(command)
        return command

    synth = add("synth", cmd_synth, "write generated BraTS-layout cases on the MNI152 anatomy (multi-site)", config=False)
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--cases", type=int, default=8, help="number of cases (round-robin over --sites)")
    synth.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"))
    synth.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel size in mm (1 or 3 values; default: the site's)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sites", nargs="+", default=["A"], help="acquisition sites, e.g. A B")
    synth.add_argument("--site-counts", nargs="+", default=None, metavar="SITE=N", help="cases per site, e.g. A=16 B=32")
    synth.add_argument("--png", action="store_true", help="also write a montage PNG per case")
    synth.add_argument("--workers", type=int, default=1, help="processes")

    validate = add("validate", cmd_validate, "check every case in a folder; exits non-zero on any problem", config=False)
    validate.add_argument("root", help="folder of cases")
    validate.add_argument("--site-map", default=None, help="CSV case_id,site")

    split = add("split", cmd_split, "write the labeled/unlabeled/validation split manifest")
    split.add_argument("--root", default=None, help="folder of cases (default: data.root)")
    split.add_argument("--out", default="manifest.json")

    add("train-teacher", cmd_train_teacher, "train the supervised teacher on Ray Train (resumable)")
    add("run", cmd_run, "teacher -> pseudo-labels -> curriculum stages -> evaluation (resumable)")
    baseline = add("train-baseline", cmd_train_baseline, "train a baseline on the same split: supervised-only or Mean Teacher")
    baseline.add_argument("--method", required=True, choices=["supervised", "mean-teacher"])

    demo = add("demo", cmd_demo, "generate demo data and run the pipeline on it")
    demo.add_argument("--cases", type=int, default=20)
    demo.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("X", "Y", "Z"))
    demo.add_argument("--teacher-only", action="store_true", help="stop after the teacher")

    add("config", cmd_config, "print the resolved config (defaults + file + --set)")

    for register in _EXTRA_COMMANDS:
        register(sub, add)
    return parser


# Later modules register their subcommands here (tune, predict, evaluate, suggest-labels).
_EXTRA_COMMANDS: list[Callable] = []


def _register_inference(sub, add) -> None:
    # Imported when the parser is built, not when cli is imported.
    from raysemi.inference.commands import register

    register(sub, add)


_EXTRA_COMMANDS.append(_register_inference)


def _register_tune(sub, add) -> None:
    from raysemi.tune import register

    register(sub, add)


_EXTRA_COMMANDS.append(_register_tune)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except RaysemiError as exc:
        print(f"raysemi {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
