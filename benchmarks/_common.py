"""Helpers shared by raysemi's benchmark scripts (plain Python; no benchmark imports another's code).

- :func:`benchmark_parser`: the options every script has (``--quick``, ``--out``).
- :func:`machine_info`: what the numbers were measured on (CPU, RAM, library versions, load, date).
- :func:`compare`: one measurement against a baseline measured in the same run, printed and returned
  as a row of the report table (``run_all.py`` turns these rows into ``results.md``).
- :class:`ProcessTreeMemory` and :func:`run_measured`: peak memory of a subprocess and all its
  descendants. A local Ray instance started by a driver is a tree below it (gcs_server, raylet,
  dashboard, and ``ray::`` workers below the raylet), so this counts the driver plus every worker
  and nothing from other Ray instances on the machine.
- :func:`write_report`: the JSON result, with machine info, written atomically.

Timings are never asserted: the scripts print ratios and whether a target is met, and the JSON
records the load average so that a number taken on a busy machine can be recognised as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

try:
    import psutil
except ImportError:  # psutil ships inside Ray's thirdparty_files, which ``import ray`` puts on sys.path
    import ray  # noqa: F401

    import psutil

from raysemi.atomic import atomic_write_json

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
OUT_DIR = BENCHMARKS_DIR / "out"
MIB = 1024**2


def benchmark_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--quick`` and ``--out`` (default ``benchmarks/out/<name>.json``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in minutes, not a measurement")
    parser.add_argument("--out", type=Path, default=OUT_DIR / f"{name}.json", help="JSON result path")
    return parser


def fill_size_defaults(args: argparse.Namespace, quick: dict[str, Any], full: dict[str, Any]) -> None:
    """Set the size options left at None: the smoke-test sizes with ``--quick``, else the measured ones."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def cpu_model_name() -> str:
    """The ``model name`` line of /proc/cpuinfo (the processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose speed the benchmarks measure (imported lazily, missing ones skipped)."""
    versions = {"python": platform.python_version()}
    for module_name in ("torch", "ray", "monai", "nibabel", "numpy", "mlflow"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        versions[module_name] = getattr(module, "__version__", "unknown")
    return versions


def machine_info() -> dict[str, Any]:
    """CPU count and model, RAM, GPU (if any), library versions, torch threads, load average and date."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model_name(),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Other processes inflate and blur timings; a high load average marks a number as unreliable.
        "load_average": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One human-readable line describing the machine."""
    versions = info.get("versions", {})
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    libs = ", ".join(f"{k} {versions[k]}" for k in ("torch", "ray", "monai") if k in versions)
    return (
        f"{info.get('cpu_count')} CPUs ({info.get('cpu_model')}), {info.get('ram_gib')} GiB RAM{gpu}; {libs}; "
        f"load average {', '.join(f'{x:.1f}' for x in info.get('load_average', []))}; {info.get('date')}"
    )


def compare(
    measurement: str,
    value: float,
    baseline: str,
    baseline_value: float,
    unit: str,
    target: float | None = None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """Print and return ``value / baseline_value`` with its target.

    Args:
        measurement: what ``value`` is (``"Ray Data stream, steady state"``).
        value: the measured number.
        baseline: what ``baseline_value`` is, measured in the same run.
        unit: unit of both numbers.
        target: the ratio to reach; None when the issue sets none.
        higher_is_better: the target is ``ratio >= target`` (throughput) or ``ratio <= target`` (memory).

    Returns:
        A row of the report: measurement, value, baseline, baseline_value, unit, ratio, target (text)
        and met (None without a target).
    """
    ratio = value / baseline_value if baseline_value else float("nan")
    target_text = None if target is None else f"{'>=' if higher_is_better else '<='} {target:g}x"
    met = None
    if target is not None and ratio == ratio:
        met = bool(ratio >= target) if higher_is_better else bool(ratio <= target)
    verdict = "" if target is None else f" (target {target_text}: {'met' if met else 'NOT met'})"
    print(f"  {measurement}: {value:.4g} {unit} vs {baseline}: {baseline_value:.4g} {unit} "
          f"-> ratio {ratio:.3f}{verdict}", flush=True)
    return {
        "measurement": measurement,
        "value": value,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "unit": unit,
        "ratio": ratio,
        "target": target_text,
        "met": met,
    }


def write_report(
    path: Path,
    benchmark: str,
    quick: bool,
    settings: dict[str, Any],
    results: dict[str, Any],
    comparisons: list[dict[str, Any]],
    notes: Iterable[str] = (),
    machine: dict[str, Any] | None = None,
) -> None:
    """Write the benchmark's JSON atomically and say where.

    The layout is shared by all of raysemi's benchmarks, so ``run_all.py`` reads any of them:
    ``benchmark``, ``quick``, ``machine``, ``settings``, ``results`` (free form), ``comparisons``
    (rows from :func:`compare`) and ``notes``.
    """
    report = {
        "benchmark": benchmark,
        "quick": quick,
        "machine": machine or machine_info(),
        "settings": settings,
        "results": results,
        "comparisons": comparisons,
        "notes": list(notes),
    }
    atomic_write_json(path, report)
    print(f"wrote {path}", flush=True)


def env_without_ray_address(**extra: str) -> dict[str, str]:
    """This process's environment minus RAY_ADDRESS (a child starts its own local Ray), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------
# Memory of a process tree
# ------------------------------------------------------------------------------------------------
class ProcessTreeMemory:
    """Samples the summed memory of a process and all its descendants in a background thread.

    RSS counts a page once per process that maps it, so shared libraries (torch in every Ray worker)
    and the shared-memory object store are counted several times; PSS splits each shared page between
    the processes that map it and so adds up to what the tree really occupies. Both are recorded.

    Finding the descendants means reading every process's /proc entry, and PSS means reading each
    process's smaps_rollup: both cost far more than RSS (/proc/<pid>/statm). So the tree is found
    again and PSS read every ``full_every`` samples (a new process is seen at most that late; Ray's
    workers live for seconds to minutes), and RSS is read every ``interval`` seconds, which keeps the
    sampler's own CPU use small on a 2-core machine.

    Args:
        pid: the root process.
        interval: seconds between RSS samples.
        full_every: find the tree again and read PSS every this many samples.
    """

    def __init__(self, pid: int, interval: float = 0.2, full_every: int = 5) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.full_every = full_every
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0
        self._processes: list[psutil.Process] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        """One sample of the tree (processes that exit mid-sample are skipped)."""
        full = self.samples % self.full_every == 0
        if full:
            self._processes = self._tree()
        rss = pss = 0
        for process in self._processes:
            try:
                if full:
                    info = process.memory_full_info()
                    rss += info.rss
                    pss += info.pss
                else:
                    rss += process.memory_info().rss
            except psutil.Error:
                continue
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(self._processes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> "ProcessTreeMemory":
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling; returns peaks in MiB, the sample count and the most processes seen at once."""
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_mib": self.peak_rss / MIB,
            "peak_pss_mib": self.peak_pss / MIB,
            "samples": self.samples,
            "peak_processes": self.peak_processes,
        }


@dataclass
class MeasuredRun:
    """A finished subprocess with its wall time, peak tree memory and the tail of its output."""

    command: list[str]
    returncode: int
    wall_s: float
    memory: dict[str, Any]
    output_tail: str


def run_measured(
    command: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
    interval: float = 0.2,
) -> MeasuredRun:
    """Run ``command`` while sampling the memory of its process tree; output goes to ``log_path``.

    The output goes to a file rather than a pipe so that a chatty child never blocks on a full pipe.
    On timeout the child's whole tree is killed (children first) and the return code is -9.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        sampler = ProcessTreeMemory(child.pid, interval=interval).start()
        try:
            returncode = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(child.pid)
            returncode = -9
        finally:
            memory = sampler.stop()
    wall = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    return MeasuredRun(command, returncode, wall, memory, text[-4000:])


def _kill_tree(pid: int) -> None:
    """Kill a process we started and its descendants (by id, children first)."""
    try:
        root = psutil.Process(pid)
        for process in reversed(root.children(recursive=True)):
            process.kill()
        root.kill()
    except psutil.Error:
        pass


def run_child(script: Path, child_args: list[str], result_path: Path, log_path: Path,
              env: dict[str, str] | None = None, timeout_s: float | None = None) -> tuple[dict[str, Any], MeasuredRun]:
    """Run ``script`` in child mode (it writes its result JSON to ``result_path``) under memory sampling.

    Raises:
        RuntimeError: when the child fails, with the tail of its output.
    """
    run = run_measured([sys.executable, str(script), *child_args], log_path, env=env, timeout_s=timeout_s)
    if run.returncode != 0 or not result_path.is_file():
        raise RuntimeError(
            f"{script.name} {' '.join(child_args)} failed (exit {run.returncode}); log {log_path}:\n{run.output_tail}"
        )
    return json.loads(result_path.read_text()), run
