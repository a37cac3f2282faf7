"""Benchmark (issue 4): training patches/s of the Ray Data stream vs a MONAI Dataset + torch DataLoader.

Three ways to read the same generated cases, each in a fresh subprocess whose whole process tree
(driver, DataLoader workers, or the local Ray instance with its workers) is sampled for memory:

- **Ray Data**: :func:`raysemi.data.pipeline.training_dataset` + ``iter_torch_batches`` (as the
  training loop consumes it, ``prefetch_batches=2``), on a local Ray with ``--workers`` CPUs.
- **DataLoader** (baseline): ``monai.data.Dataset`` over the same (case, repeat) rows in the same
  order, whose transform is :func:`raysemi.data.pipeline.patches_for_row`, the very function Ray's
  ``flat_map`` runs (decode, preprocess, sample patches: identical work per case), read by a torch
  ``DataLoader(num_workers=--workers)``, and re-batched into ``--batch-size`` patches.
- **Decode only**: :func:`raysemi.data.nifti.load_case_arrays` per case, in one process and with
  the DataLoader's workers: the ceiling any patch pipeline over these files can reach
  (cases/s x patches per volume = patches/s).

The DataLoader runs before and after Ray and the baseline is the mean of the two, so that a
machine load that drifts does not favour either side. Throughput is counted after the first batch
(the steady state a long training stream sees); the time to the first batch is reported separately.
Peak memory of the Ray Data stream is measured at ``--cases`` and ``--cases-large`` cases: whole
volumes never enter the object store, so it should hardly grow with the number of cases.

Usage::

    python benchmarks/data_pipeline.py [--quick] [--out benchmarks/out/data_pipeline.json]

Targets (issue 4, printed, never asserted): Ray Data >= 0.8x the DataLoader's patches/s; peak
memory at the large case count <= 1.25x that at the small one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator

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

NAME = "data_pipeline"
OBJECT_STORE_GB = 1.0  # as jobs/configs/demo.yaml


# ------------------------------------------------------------------------------------------------
# Child side: one configuration, run in its own process
# ------------------------------------------------------------------------------------------------
def _cases(data_dir: str, count: int):
    from raysemi.data.brats import discover_cases

    cases = discover_cases(data_dir)[:count]
    if len(cases) < count:
        raise SystemExit(f"{data_dir} holds {len(cases)} cases, {count} requested")
    return cases


def _spec(args: argparse.Namespace):
    from raysemi.data.pipeline import PatchSpec

    return PatchSpec(patch_size=(args.patch,) * 3, patches_per_volume=args.patches_per_volume,
                     foreground_ratio=0.67, augment=True, seed=0)


def _consume(batches: Iterable[dict[str, Any]], started: float) -> dict[str, Any]:
    """Pull every batch; patches/s counted from the first batch on (start-up reported apart)."""
    patches = batches_seen = 0
    first_at = None
    first_patches = 0
    shape = None
    for batch in batches:
        size = int(batch["image"].shape[0])
        shape = list(batch["image"].shape[1:])
        patches += size
        batches_seen += 1
        if first_at is None:
            first_at, first_patches = time.perf_counter(), size
    ended = time.perf_counter()
    if first_at is None:
        raise RuntimeError("the stream yielded no batch")
    steady_s = ended - first_at
    return {
        "patches": patches,
        "batches": batches_seen,
        "patch_shape": shape,
        "first_batch_s": first_at - started,
        "total_s": ended - started,
        "steady_s": steady_s,
        "steady_patches_per_s": (patches - first_patches) / steady_s if steady_s > 0 else float("nan"),
        "overall_patches_per_s": patches / (ended - started),
    }


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray Data stream as the training loop reads it."""
    import ray

    from raysemi.data.pipeline import TrainingItem, configure_data_context, training_dataset

    items = [TrainingItem(case) for case in _cases(args.data, args.cases)]
    ray.init(num_cpus=args.workers, include_dashboard=False, object_store_memory=int(OBJECT_STORE_GB * 1024**3))
    configure_data_context(OBJECT_STORE_GB)
    started = time.perf_counter()
    dataset = training_dataset(items, _spec(args), args.repeats)
    batches = dataset.iter_torch_batches(batch_size=args.batch_size, drop_last=False, prefetch_batches=2)
    result = _consume(batches, started)
    ray.shutdown()
    return result


def _rows_like_training_dataset(items: list, seed: int, repeats: int) -> list[dict[str, Any]]:
    """The (case, repeat) rows in the order :func:`training_dataset` visits them (same seeded permutations)."""
    rows = []
    for repeat in range(repeats):
        order = np.random.default_rng([seed, repeat]).permutation(len(items))
        rows.extend(items[i].to_row(repeat) for i in order)
    return rows


def _first(items: list[Any]) -> Any:
    """DataLoader collate for batch_size=1: the item itself (a list of patch dicts)."""
    return items[0]


def _rebatch(per_case: Iterable[list[dict[str, Any]]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Patches of successive cases -> batches of ``batch_size`` torch tensors (as iter_torch_batches gives)."""
    import torch

    def collate(patches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(np.stack([p[key] for p in patches])) for key in patches[0]}

    buffer: list[dict[str, Any]] = []
    for patches in per_case:
        buffer.extend(patches)
        while len(buffer) >= batch_size:
            yield collate(buffer[:batch_size])
            del buffer[:batch_size]
    if buffer:
        yield collate(buffer)


def run_dataloader(args: argparse.Namespace) -> dict[str, Any]:
    """MONAI Dataset + torch DataLoader doing exactly the work of the Ray stream's flat_map."""
    import functools

    import monai.data
    import torch

    from raysemi.data.pipeline import TrainingItem, patches_for_row

    spec = _spec(args)
    items = [TrainingItem(case) for case in _cases(args.data, args.cases)]
    rows = _rows_like_training_dataset(items, spec.seed, args.repeats)
    dataset = monai.data.Dataset(rows, transform=functools.partial(patches_for_row, spec=asdict(spec)))
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=_first, num_workers=args.workers)
    return _consume(_rebatch(loader, args.batch_size), started)


class _DecodeOnly:
    """A map-style dataset whose item is one decoded case (only its shape leaves the worker)."""

    def __init__(self, cases: list) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> list[int]:
        from raysemi.data.nifti import load_case_arrays

        return list(load_case_arrays(self.cases[index], with_seg=True).image.shape)


def run_decode(args: argparse.Namespace) -> dict[str, Any]:
    """nibabel decode of every case: in this process, then with ``--workers`` DataLoader workers."""
    import torch

    cases = _cases(args.data, args.cases)
    decode = _DecodeOnly(cases)
    started = time.perf_counter()
    for index in range(len(decode)):
        decode[index]
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(decode, batch_size=None, num_workers=args.workers)
    for _ in loader:
        pass
    parallel_s = time.perf_counter() - started
    return {
        "cases": len(cases),
        "single_process_cases_per_s": len(cases) / single_s,
        "parallel_cases_per_s": len(cases) / parallel_s,
        "single_process_s": single_s,
        "parallel_s": parallel_s,
    }


CHILD_MODES = {"ray": run_ray, "dataloader": run_dataloader, "decode": run_decode}


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--cases", type=int,
                        help="cases for throughput and the small memory point (default 20; quick 6)")
    parser.add_argument("--cases-large", type=int, help="cases for the large memory point (default 80; quick 24)")
    parser.add_argument("--size", type=int, help="generated volume side (default 96; quick 48)")
    parser.add_argument("--patch", type=int, help="patch side (default 64; quick 32)")
    parser.add_argument("--patches-per-volume", type=int, default=4, help="patches per case per pass")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per batch")
    parser.add_argument("--repeats", type=int,
                        help="passes over the cases, in every configuration (default 2; quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray CPUs")
    parser.add_argument("--data", help="existing data folder (default: generate into a temporary folder)")
    parser.add_argument("--child", choices=sorted(CHILD_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fill_size_defaults(
        args,
        quick=dict(cases=6, cases_large=24, size=48, patch=32, repeats=1),
        full=dict(cases=20, cases_large=80, size=96, patch=64, repeats=2),
    )
    return args


def mean_of_runs(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The baseline: the mean of the runs before and after, for every number both have (memory: the larger peak)."""
    merged: dict[str, Any] = {}
    for key, value in before.items():
        if key == "memory":
            merged[key] = {k: max(v, after[key][k]) for k, v in value.items()}
        elif isinstance(value, float):
            merged[key] = (value + after[key]) / 2
        else:
            merged[key] = value
    return merged


def child_args(args: argparse.Namespace, mode: str, data: str, cases: int, out: Path) -> list[str]:
    return [
        "--child", mode, "--child-out", str(out), "--data", data, "--cases", str(cases),
        "--patch", str(args.patch), "--patches-per-volume", str(args.patches_per_volume),
        "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--workers", str(args.workers),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        from raysemi.atomic import atomic_write_json

        atomic_write_json(args.child_out, CHILD_MODES[args.child](args))
        return

    machine_before = machine_info()
    with tempfile.TemporaryDirectory(prefix="raysemi-bench-data-") as tmp:
        tmp_dir = Path(tmp)
        data = args.data
        if data is None:
            from raysemi.data.synth import synth_dataset

            data = str(tmp_dir / "cases")
            started = time.perf_counter()
            synth_dataset(data, args.cases_large, (args.size,) * 3, seed=0, sites=("A",), workers=args.workers)
            print(f"generated {args.cases_large} cases of {args.size}^3 in {time.perf_counter() - started:.0f} s",
                  flush=True)

        def measure(mode: str, cases: int) -> dict[str, Any]:
            print(f"{mode} over {cases} cases ...", flush=True)
            result_path = tmp_dir / f"{mode}_{cases}.json"
            result, run = run_child(Path(__file__), child_args(args, mode, data, cases, result_path), result_path,
                                    tmp_dir / f"{mode}_{cases}.log", env=env_without_ray_address())
            return {**result, "memory": run.memory, "process_wall_s": run.wall_s}

        # DataLoader before and after Ray: a machine load that drifts does not favour either side.
        results = {"decode": measure("decode", args.cases), "dataloader_before": measure("dataloader", args.cases)}
        results["ray"] = measure("ray", args.cases)
        results["dataloader_after"] = measure("dataloader", args.cases)
        results["ray_large"] = measure("ray", args.cases_large)
        results["dataloader"] = mean_of_runs(results["dataloader_before"], results["dataloader_after"])

    expected = args.cases * args.patches_per_volume * args.repeats
    notes = [
        "Throughput counts patches after the first batch; first_batch_s is the start-up "
        "(Ray: dataset planning and the first flat_map task; DataLoader: worker start and first case).",
        "Decode-only patches/s = decoded cases/s x patches per volume: "
        "no patch pipeline over these files can be faster.",
        "Memory is the sum over the child process tree (Ray: driver, gcs_server, raylet, dashboard, workers).",
    ]
    for name in ("dataloader_before", "dataloader_after", "ray"):
        if results[name]["patches"] != expected:
            notes.append(f"WARNING: {name} yielded {results[name]['patches']} patches, expected {expected} "
                         "(a case failed to load? see the child log)")
            print(notes[-1])
    ppv = args.patches_per_volume
    print(f"\nResults ({args.cases} cases of {args.size}^3, patch {args.patch}^3, {ppv} patches/case, "
          f"{args.repeats} pass(es), {args.workers} workers):")
    comparisons = [
        compare("Ray Data stream, steady state", results["ray"]["steady_patches_per_s"],
                f"DataLoader(num_workers={args.workers}), steady state (mean of before/after)",
                results["dataloader"]["steady_patches_per_s"], "patches/s", target=0.8),
        compare("Ray Data stream, including start-up", results["ray"]["overall_patches_per_s"],
                f"DataLoader(num_workers={args.workers}), including start-up",
                results["dataloader"]["overall_patches_per_s"], "patches/s"),
        compare("Ray Data stream, steady state", results["ray"]["steady_patches_per_s"],
                f"decode only ({args.workers} workers), the ceiling",
                results["decode"]["parallel_cases_per_s"] * ppv, "patches/s"),
        compare(f"Ray Data peak RSS (tree), {args.cases_large} cases", results["ray_large"]["memory"]["peak_rss_mib"],
                f"{args.cases} cases", results["ray"]["memory"]["peak_rss_mib"], "MiB", target=1.25,
                higher_is_better=False),
        compare(f"Ray Data peak PSS (tree), {args.cases_large} cases", results["ray_large"]["memory"]["peak_pss_mib"],
                f"{args.cases} cases", results["ray"]["memory"]["peak_pss_mib"], "MiB", target=1.25,
                higher_is_better=False),
        compare(f"Ray Data peak RSS (tree), {args.cases} cases", results["ray"]["memory"]["peak_rss_mib"],
                "DataLoader peak RSS (tree)", results["dataloader"]["memory"]["peak_rss_mib"], "MiB"),
    ]
    print(f"  time to first batch: Ray {results['ray']['first_batch_s']:.1f} s, "
          f"DataLoader {results['dataloader']['first_batch_s']:.1f} s")
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_out", "out")}
    settings["object_store_gb"] = OBJECT_STORE_GB
    machine = {**machine_before, "load_average_after": machine_info()["load_average"]}
    write_report(args.out, NAME, args.quick, settings, results, comparisons, notes, machine=machine)


if __name__ == "__main__":
    sys.exit(main())
