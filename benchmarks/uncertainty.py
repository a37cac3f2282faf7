"""Benchmark: T batched MC-dropout passes vs T sequential passes (tiny preset).

Both variants run the same code (:func:`mc_predict` / :func:`mc_sliding_window`) and differ only in
``max_batch``: ``None`` puts all T passes of a patch into one forward call, ``1`` makes T calls of
batch 1. Cases: a single patch, and a whole volume by sliding window (every window gets T passes).

Usage::

    python benchmarks/uncertainty.py [--out benchmarks/out/uncertainty.json] [--passes 8] [--repeats 5]

Prints ``sequential_time / batched_time`` (fastest runs) per case and writes the timings and
machine info as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import monai
import torch

from raysemi.atomic import atomic_write_json
from raysemi.model import build_model
from raysemi.semi.uncertainty import mc_predict, mc_sliding_window


def _time_once(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _compare(name: str, make_run: Callable[[int | None], Callable[[], object]], warmup: int,
             repeats: int, details: dict) -> dict:
    """Time the batched (max_batch=None) and sequential (max_batch=1) variants of one case.

    The two variants alternate, so that a change in machine load during the benchmark hits both
    alike. The ratio uses the fastest run of each (the one least disturbed by other processes);
    the medians are reported too.
    """
    batched_run, sequential_run = make_run(None), make_run(1)
    for _ in range(warmup):
        batched_run()
        sequential_run()
    batched, sequential = [], []
    for _ in range(repeats):
        batched.append(_time_once(batched_run))
        sequential.append(_time_once(sequential_run))
    ratio = min(sequential) / min(batched)
    print(f"{name}: batched min {min(batched):.3f} s (median {statistics.median(batched):.3f}), "
          f"sequential min {min(sequential):.3f} s (median {statistics.median(sequential):.3f}), "
          f"sequential/batched = {ratio:.2f}", flush=True)
    return {**details, "batched_s": batched, "sequential_s": sequential,
            "batched_min_s": min(batched), "sequential_min_s": min(sequential),
            "batched_median_s": statistics.median(batched),
            "sequential_median_s": statistics.median(sequential),
            "ratio_sequential_over_batched": ratio,
            "ratio_of_medians": statistics.median(sequential) / statistics.median(batched)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/uncertainty.json", help="JSON result path")
    parser.add_argument("--passes", type=int, default=8, help="MC-dropout passes T")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    parser.add_argument("--patch", type=int, default=64, help="patch side")
    parser.add_argument("--volume", type=int, default=96, help="whole-volume side (sliding window)")
    parser.add_argument("--roi", type=int, default=64, help="sliding-window roi side")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model("tiny")
    patch = torch.randn(1, 4, args.patch, args.patch, args.patch)
    volume = torch.randn(1, 4, args.volume, args.volume, args.volume)
    load_before = os.getloadavg()

    results = {
        "patch": _compare(
            f"patch {tuple(patch.shape)}",
            lambda max_batch: lambda: mc_predict(model, patch, args.passes, max_batch=max_batch),
            args.warmup, args.repeats, {"input_shape": list(patch.shape)},
        ),
        "sliding_window": _compare(
            f"sliding window {tuple(volume.shape)}, roi {args.roi}",
            lambda max_batch: lambda: mc_sliding_window(
                model, volume, (args.roi,) * 3, args.passes, sw_batch_size=1, overlap=0.5,
                max_batch=max_batch),
            args.warmup, args.repeats,
            {"input_shape": list(volume.shape), "roi_size": [args.roi] * 3, "sw_batch_size": 1,
             "overlap": 0.5, "mode": "gaussian"},
        ),
    }
    report = {
        "benchmark": "mc_dropout_batched_vs_sequential",
        "preset": "tiny",
        "passes": args.passes,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            # Other processes on the machine inflate and blur the timings; recorded to judge that.
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "results": results,
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
