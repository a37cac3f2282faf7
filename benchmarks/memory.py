"""Benchmark (issue 10): peak memory of ``raysemi run`` (driver plus all Ray processes) at two data sizes.

``raysemi run`` runs as a subprocess that starts its own local Ray (``RAY_ADDRESS`` unset), so the
driver, gcs_server, raylet, dashboard and every Ray worker (training workers, Ray Data tasks, the
inference actors, the pool actor) are its descendants. Their summed memory is sampled every 0.2 s
(:class:`_common.ProcessTreeMemory`: RSS, which counts shared pages once per process, and PSS,
which splits them). Both runs use the same small settings (1 teacher epoch, 1 stage of 1 epoch,
tiny model, object store capped at 1 GB as in the demo config); only the number of cases differs.
The small data set is the first cases of the large one (links to the same folders).

Usage::

    python benchmarks/memory.py [--quick] [--out benchmarks/out/memory.json]

Target (issue 10, printed, never asserted): peak memory at the large case count <= 1.25x that at
the small one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from _common import (
    benchmark_parser,
    compare,
    env_without_ray_address,
    fill_size_defaults,
    machine_info,
    run_measured,
    write_report,
)

NAME = "memory"


def run_config(data_root: Path, storage: Path, run_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Explicit tiny settings (independent of the demo config, which changes with the demo)."""
    return {
        "data": {"root": str(data_root), "labeled_fraction": 0.25, "validation_fraction": 0.2, "seed": 0,
                 "patch_size": [args.patch] * 3, "patches_per_volume": 2, "object_store_memory_gb": 1.0},
        "model": {"preset": "tiny", "mc_passes": args.passes, "sw_batch_size": 2},
        "curriculum": {"stages": 1, "epochs_per_stage": 1},
        "train": {"storage_path": str(storage), "run_name": run_name, "num_workers": 1, "epochs": 1,
                  "batch_size": 2, "val_max_cases": 2},
        "tracking": {"uri": f"sqlite:///{storage / 'mlflow.db'}", "experiment": "raysemi-memory-benchmark"},
    }


def link_subset(source: Path, target: Path, count: int) -> Path:
    """``target`` holding links to the first ``count`` case folders of ``source`` (sorted by id)."""
    target.mkdir(parents=True)
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))[:count]
    for folder in folders:
        (target / folder.name).symlink_to(folder, target_is_directory=True)
    return target


def measure_run(cases: int, data_root: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``raysemi run`` on ``data_root`` in ``work``; returns peak memory, wall time and exit code."""
    work.mkdir(parents=True)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(run_config(data_root, work / "runs", f"memory_{cases}", args)))
    command = [sys.executable, "-m", "raysemi.cli", "run", "--config", str(config_path)]
    env = env_without_ray_address()
    env.pop("MLFLOW_TRACKING_URI", None)  # tracking stays in the work folder
    print(f"raysemi run on {cases} cases ...", flush=True)
    run = run_measured(command, work / "run.log", env=env, cwd=work, timeout_s=args.timeout)
    if run.returncode != 0:
        raise RuntimeError(f"raysemi run on {cases} cases failed (exit {run.returncode}):\n{run.output_tail}")
    print(f"  peak RSS {run.memory['peak_rss_mib']:.0f} MiB, peak PSS {run.memory['peak_pss_mib']:.0f} MiB, "
          f"{run.wall_s:.0f} s, at most {run.memory['peak_processes']} processes", flush=True)
    return {"cases": cases, "wall_s": run.wall_s, **run.memory}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, help="small data set (default 20; quick 8)")
    parser.add_argument("--cases-large", type=int, help="large data set (default 80; quick 16)")
    parser.add_argument("--size", type=int, help="generated volume side (default 64; quick 48)")
    parser.add_argument("--patch", type=int, help="patch side (default 48; quick 32)")
    parser.add_argument("--passes", type=int, help="MC-dropout passes (default 4; quick 2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    args = parser.parse_args(argv)
    fill_size_defaults(
        args,
        quick=dict(cases=8, cases_large=16, size=48, patch=32, passes=2),
        full=dict(cases=20, cases_large=80, size=64, patch=48, passes=4),
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine_before = machine_info()
    with tempfile.TemporaryDirectory(prefix="raysemi-bench-memory-") as tmp:
        tmp_dir = Path(tmp)
        from raysemi.data.synth import synth_dataset

        all_cases = tmp_dir / "cases_large"
        started = time.perf_counter()
        synth_dataset(all_cases, args.cases_large, (args.size,) * 3, seed=0, sites=("A",),
                      workers=min(2, os.cpu_count() or 1))
        print(f"generated {args.cases_large} cases of {args.size}^3 in {time.perf_counter() - started:.0f} s",
              flush=True)
        small_cases = link_subset(all_cases, tmp_dir / "cases_small", args.cases)
        results = {
            "small": measure_run(args.cases, small_cases, tmp_dir / "run_small", args),
            "large": measure_run(args.cases_large, all_cases, tmp_dir / "run_large", args),
        }

    print("\nResults:")
    comparisons = [
        compare(f"raysemi run peak RSS (tree), {args.cases_large} cases", results["large"]["peak_rss_mib"],
                f"{args.cases} cases", results["small"]["peak_rss_mib"], "MiB", target=1.25, higher_is_better=False),
        compare(f"raysemi run peak PSS (tree), {args.cases_large} cases", results["large"]["peak_pss_mib"],
                f"{args.cases} cases", results["small"]["peak_pss_mib"], "MiB", target=1.25, higher_is_better=False),
    ]
    notes = [
        "Memory is summed over the `raysemi run` process and all its descendants (the local Ray it starts).",
        "RSS counts shared pages (torch libraries in every worker, the object store) once per process; "
        "PSS shares them out, so it is the better estimate of what the run occupies.",
        f"Wall time: {results['small']['wall_s']:.0f} s at {args.cases} cases, "
        f"{results['large']['wall_s']:.0f} s at {args.cases_large} cases.",
    ]
    settings = {**vars(args), "config": run_config(Path("<data>"), Path("<work>"), "memory_<cases>", args)}
    settings.pop("out")
    machine = {**machine_before, "load_average_after": machine_info()["load_average"]}
    write_report(args.out, NAME, args.quick, settings, results, comparisons, notes, machine=machine)


if __name__ == "__main__":
    sys.exit(main())
