"""Benchmark (issue 10): pseudo-labeling cases/min through the Ray Data actor pool vs a plain Python loop.

Every configuration runs :class:`raysemi.inference.predictor.PseudoLabeler` (T MC-dropout passes,
sliding window, files written) on the same generated cases, with a checkpoint of an untrained tiny
model (the work per case does not depend on the weights):

- **plain loop** (baseline): one ``PseudoLabeler`` built in the process and called per case;
- **Ray, 1 actor** and **Ray, 2 actors**: :func:`raysemi.inference.batch.run_batch_inference`
  with ``train.inference_actors`` = 1 or 2, on a local Ray with as many CPUs as the machine.

Threads are set the same way everywhere: ``OMP_NUM_THREADS`` (which torch reads, and which Ray
leaves alone when it is set) = CPUs / processes doing inference, so every configuration runs
``os.cpu_count()`` torch threads in total: the plain loop and 1 actor get all CPUs, each of 2 actors
gets half. (Giving each of 2 actors all CPUs would oversubscribe the cores.) Each case's result
records the torch threads and process that computed it.

Each configuration runs in its own subprocess; the timing covers building the labeler(s) (model
load; for Ray also the actor pool) and all cases, and excludes ``ray.init``. The plain loop runs
first and last and the baseline is the mean of the two, so that a machine load that drifts does
not favour either side.

Usage::

    python benchmarks/pseudo_label.py [--quick] [--out benchmarks/out/pseudo_label.json]

Issue 10 sets no target here; the ratios to the plain loop are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    benchmark_parser,
    compare,
    env_without_ray_address,
    fill_size_defaults,
    machine_info,
    run_child,
    write_report,
)
from raysemi.inference.predictor import PseudoLabeler

NAME = "pseudo_label"


class ThreadReportingPseudoLabeler(PseudoLabeler):
    """The PseudoLabeler, plus the torch threads and process id in each result (for the report)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        import torch

        out = super().__call__(batch)
        extra = {"torch_threads": torch.get_num_threads(), "pid": os.getpid()}
        out["result_json"] = [json.dumps({**json.loads(text), **extra}) for text in out["result_json"]]
        return out


def make_config(args: argparse.Namespace, actors: int, storage: str) -> Any:
    from raysemi.config import RaysemiConfig

    return RaysemiConfig.from_dict({
        "data": {"root": args.data or "unused", "patch_size": [args.patch] * 3},
        "model": {"preset": "tiny", "mc_passes": args.passes, "sw_batch_size": args.sw_batch_size},
        "train": {"storage_path": storage, "inference_actors": actors},
    })


# ------------------------------------------------------------------------------------------------
# Child side
# ------------------------------------------------------------------------------------------------
def _rows(data: str) -> list[dict[str, Any]]:
    from raysemi.data.brats import discover_cases
    from raysemi.inference.batch import case_rows

    return case_rows(discover_cases(data))


def _summary(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    errors = [r for r in results if r.get("error")]
    return {
        "cases": len(results),
        "failed": len(errors),
        "first_error": errors[0]["error"] if errors else None,
        "seconds": seconds,
        "cases_per_min": 60 * len(results) / seconds,
        "torch_threads": sorted({r["torch_threads"] for r in results if "torch_threads" in r}),
        "processes": len({r["pid"] for r in results if "pid" in r}),
    }


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    """One labeler in this process, called once per case."""
    rows = _rows(args.data)
    cfg = make_config(args, 1, args.work)
    started = time.perf_counter()
    labeler = ThreadReportingPseudoLabeler(args.checkpoint, cfg.to_dict(), str(Path(args.work) / "pseudo"))
    results = []
    for row in rows:
        out = labeler({key: np.array([value]) for key, value in row.items()})
        results.extend(json.loads(text) for text in out["result_json"])
    return _summary(results, time.perf_counter() - started)


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    """The actor pool of ``raysemi run``'s pseudo-labeling step."""
    import ray

    from raysemi.inference.batch import run_batch_inference

    rows = _rows(args.data)
    cfg = make_config(args, args.actors, args.work)
    ray.init(num_cpus=max(os.cpu_count() or 1, args.actors), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    results = run_batch_inference(
        ThreadReportingPseudoLabeler, rows, cfg,
        {"checkpoint_dir": args.checkpoint, "cfg": cfg.to_dict(), "out_dir": str(Path(args.work) / "pseudo")},
    )
    seconds = time.perf_counter() - started
    ray.shutdown()
    return _summary(results, seconds)


CHILD_MODES = {"plain": run_plain, "ray": run_ray}


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------
def save_untrained_checkpoint(args: argparse.Namespace, directory: Path) -> None:
    """A checkpoint of a freshly initialised tiny model, loadable by ``load_model``."""
    import torch

    from raysemi.model import build_model_from_config
    from raysemi.train.checkpoint import TrainState, save_checkpoint

    cfg = make_config(args, 1, str(directory))
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model)
    save_checkpoint(directory, model, None, None, TrainState(), {"config": cfg.to_dict(), "role": "teacher"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, help="cases to pseudo-label (default 8; quick 3)")
    parser.add_argument("--size", type=int, help="generated volume side (default 96; quick 48)")
    parser.add_argument("--patch", type=int, help="sliding-window roi side = patch size (default 64; quick 32)")
    parser.add_argument("--passes", type=int, default=8, help="MC-dropout passes T")
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward call")
    parser.add_argument("--data", help="existing data folder (default: generate into a temporary folder)")
    parser.add_argument("--child", choices=sorted(CHILD_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fill_size_defaults(args, quick=dict(cases=3, size=48, patch=32), full=dict(cases=8, size=96, patch=64))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        from raysemi.atomic import atomic_write_json

        atomic_write_json(args.child_out, CHILD_MODES[args.child](args))
        return

    cpus = os.cpu_count() or 1
    machine_before = machine_info()
    with tempfile.TemporaryDirectory(prefix="raysemi-bench-pseudo-") as tmp:
        tmp_dir = Path(tmp)
        if args.data is None:
            from raysemi.data.synth import synth_dataset

            args.data = str(tmp_dir / "cases")
            synth_dataset(args.data, args.cases, (args.size,) * 3, seed=0, sites=("A",), workers=min(2, cpus))
        checkpoint = tmp_dir / "checkpoint"
        save_untrained_checkpoint(args, checkpoint)

        def measure(label: str, mode: str, actors: int) -> dict[str, Any]:
            threads = max(1, cpus // actors)
            print(f"{label}: {actors} process(es) x {threads} torch thread(s) ...", flush=True)
            work = tmp_dir / label
            result_path = tmp_dir / f"{label}.json"
            child = ["--child", mode, "--child-out", str(result_path), "--data", args.data, "--checkpoint",
                     str(checkpoint), "--work", str(work), "--actors", str(actors), "--patch", str(args.patch),
                     "--passes", str(args.passes), "--sw-batch-size", str(args.sw_batch_size)]
            result, run = run_child(Path(__file__), child, result_path, tmp_dir / f"{label}.log",
                                    env=env_without_ray_address(OMP_NUM_THREADS=str(threads)))
            print(f"  {result['cases_per_min']:.2f} cases/min ({result['failed']} failed; torch threads "
                  f"{result['torch_threads']} in {result['processes']} process(es))", flush=True)
            return {**result, "actors": actors, "omp_num_threads": threads, "memory": run.memory,
                    "process_wall_s": run.wall_s}

        # The plain loop runs first and last: a machine load that drifts does not favour either side.
        results = {
            "plain_before": measure("plain_before", "plain", 1),
            "ray_1_actor": measure("ray_1_actor", "ray", 1),
            "ray_2_actors": measure("ray_2_actors", "ray", 2),
            "plain_after": measure("plain_after", "plain", 1),
        }

    notes = [
        f"T={args.passes} MC passes, sliding window roi {args.patch}^3, sw_batch_size {args.sw_batch_size}, "
        f"{args.cases} cases of {args.size}^3, untrained tiny model.",
        f"torch threads per process = {cpus} CPUs / processes doing inference (OMP_NUM_THREADS); "
        "the timing includes model loading (and the actor pool's start) but not ray.init.",
    ]
    notes += [f"WARNING: {name}: {r['failed']} case(s) failed: {r['first_error']}"
              for name, r in results.items() if r["failed"]]
    for note in notes[2:]:
        print(note)
    print("\nResults:")
    plain = (results["plain_before"]["cases_per_min"] + results["plain_after"]["cases_per_min"]) / 2
    baseline = "plain Python loop (mean of before/after)"
    comparisons = [
        compare("Ray Data actor pool, 1 actor", results["ray_1_actor"]["cases_per_min"], baseline, plain, "cases/min"),
        compare("Ray Data actor pool, 2 actors", results["ray_2_actors"]["cases_per_min"], baseline, plain,
                "cases/min"),
    ]
    settings = {k: v for k, v in vars(args).items()
                if k not in ("child", "child_out", "out", "checkpoint", "work", "actors", "data")}
    machine = {**machine_before, "load_average_after": machine_info()["load_average"]}
    write_report(args.out, NAME, args.quick, settings, results, comparisons, notes, machine=machine)


if __name__ == "__main__":
    sys.exit(main())
