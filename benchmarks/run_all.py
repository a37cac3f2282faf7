"""Run raysemi's benchmarks, each in its own subprocess, and collect one report.

Writes ``benchmarks/results.json`` (every benchmark's JSON, its exit code and wall time, and the
machine) and ``benchmarks/results.md`` (a Markdown table: benchmark, measurement, baseline, ratio,
target, met?, plus the machine it was measured on). With ``--quick`` every benchmark runs its tiny
smoke-test sizes and the report goes to ``results-quick.json`` / ``results-quick.md`` instead, so a
smoke test never overwrites the measured numbers.

Usage::

    python benchmarks/run_all.py [--quick] [--only data_pipeline train_step ...] [--collect]

``--collect`` runs nothing and builds the report from the JSONs that earlier runs of the single
scripts left in ``benchmarks/out/`` (each row then says which machine and load it was measured at).

A benchmark that fails is recorded as failed (with the tail of its log) and the others still run.
``data_efficiency`` and ``domain_shift`` (study benchmarks: many trainings) run when their scripts
exist. Per-benchmark JSONs and logs go to ``benchmarks/out/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import BENCHMARKS_DIR, OUT_DIR, REPO_ROOT, env_without_ray_address, machine_info, machine_line
from raysemi.atomic import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Benchmark:
    """How to run one benchmark script.

    Attributes:
        script: file name in ``benchmarks/``.
        quick_args: arguments for a smoke test (``--quick`` for the scripts that have it).
        args: arguments of the full run.
        study: the script takes ``--out DIR`` (its default folder: ``out/<name>``, ``out/<name>-quick``)
            rather than a JSON path; its result JSON is looked up in that folder.
        optional: skipped without error when the script does not exist.
    """

    script: str
    quick_args: tuple[str, ...] = ("--quick",)
    args: tuple[str, ...] = ()
    study: bool = False
    optional: bool = False


BENCHMARKS: dict[str, Benchmark] = {
    # uncertainty.py (issue 3) has no --quick: smaller inputs and one repeat instead.
    "uncertainty": Benchmark("uncertainty.py", quick_args=("--repeats", "1", "--patch", "32", "--volume", "48",
                                                           "--roi", "32")),
    "data_pipeline": Benchmark("data_pipeline.py"),
    "train_step": Benchmark("train_step.py"),
    "pseudo_label": Benchmark("pseudo_label.py"),
    "memory": Benchmark("memory.py"),
    "profile_hot_paths": Benchmark("profile_hot_paths.py", quick_args=("--quick", "--compare-whole-passes"),
                                   args=("--cases", "4", "--compare-whole-passes")),
    "data_efficiency": Benchmark("data_efficiency.py", study=True, optional=True),
    "domain_shift": Benchmark("domain_shift.py", study=True, optional=True),
}


def run_streamed(command: list[str], log_path: Path, prefix: str) -> int:
    """Run ``command`` from the repository root, echoing its output (prefixed) and saving it to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
        env=env_without_ray_address(),
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(f"[{prefix}] {line}")
            sys.stdout.flush()
        return child.wait()


def study_result_json(folder: Path, name: str) -> Path | None:
    """The result JSON a study benchmark left in its folder (``<name>.json``, ``results.json``, ``summary.json``)."""
    for candidate in (f"{name}.json", "results.json", "summary.json"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def result_path_of(name: str, benchmark: Benchmark, quick: bool) -> Path | None:
    """Where the benchmark's own run leaves its JSON (None for a study folder without one)."""
    suffix = "-quick" if quick else ""
    if benchmark.study:
        return study_result_json(OUT_DIR / f"{name}{suffix}", name)
    return OUT_DIR / f"{name}{suffix}.json"


def collect_benchmark(name: str, benchmark: Benchmark, quick: bool) -> dict[str, Any]:
    """The JSON an earlier run of this benchmark left in ``benchmarks/out/``, without running it."""
    path = result_path_of(name, benchmark, quick)
    if path is None or not path.is_file():
        return {"status": "missing", "script": str(BENCHMARKS_DIR / benchmark.script), "reason": "no result JSON to collect"}
    return {"status": "ok", "collected": True, "json": str(path), "report": json.loads(path.read_text())}


def run_benchmark(name: str, benchmark: Benchmark, quick: bool) -> dict[str, Any]:
    """Run one benchmark; returns status, exit code, wall time, the JSON's path and its content."""
    script = BENCHMARKS_DIR / benchmark.script
    if not script.is_file():
        return {"status": "missing", "script": str(script)}
    suffix = "-quick" if quick else ""
    command = [sys.executable, str(script), *(benchmark.quick_args if quick else benchmark.args)]
    if benchmark.study:
        result_dir = OUT_DIR / f"{name}{suffix}"  # the study scripts' own default folder
    else:
        result_path = OUT_DIR / f"{name}{suffix}.json"
        command += ["--out", str(result_path)]
    log_path = OUT_DIR / "logs" / f"{name}{suffix}.log"
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    exit_code = run_streamed(command, log_path, name)
    entry: dict[str, Any] = {"exit_code": exit_code, "wall_s": time.perf_counter() - started, "log": str(log_path)}
    if benchmark.study:
        result_path = study_result_json(result_dir, name)
    if exit_code != 0 or result_path is None or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.is_file() else ""
        return {**entry, "status": "failed", "log_tail": tail}
    return {**entry, "status": "ok", "json": str(result_path), "report": json.loads(result_path.read_text())}


# ------------------------------------------------------------------------------------------------
# The Markdown table
# ------------------------------------------------------------------------------------------------
def uncertainty_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for uncertainty.py's JSON (it predates the shared ``comparisons`` layout)."""
    rows = []
    for key, label in (("patch", "single patch"), ("sliding_window", "sliding window, whole volume")):
        part = report.get("results", {}).get(key)
        if not part:
            continue
        # The script's ratio uses each variant's fastest run when it records one, else the medians.
        statistic = "min" if "batched_min_s" in part else "median"
        rows.append({
            "measurement": f"T={report.get('passes')} MC passes batched, {label} ({statistic})",
            "value": 1 / part[f"batched_{statistic}_s"],
            "baseline": "T sequential passes",
            "baseline_value": 1 / part[f"sequential_{statistic}_s"],
            "unit": "calls/s",
            "ratio": part["ratio_sequential_over_batched"],
            "target": None,
            "met": None,
        })
    return rows


def table_rows(name: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    if entry["status"] != "ok":
        return []
    report = entry["report"]
    if report.get("comparisons"):
        return report["comparisons"]
    if name == "uncertainty" and "comparisons" not in report:
        return uncertainty_rows(report)
    # A study writes its own tables next to its JSON (``<name>.md``); point there.
    result = Path(entry["json"])
    table = result.with_suffix(".md")
    where = _committed_report(name, table if table.is_file() else result)
    return [{"measurement": f"see `{where.relative_to(REPO_ROOT) if where.is_relative_to(REPO_ROOT) else where}`",
             "value": None, "baseline": "", "baseline_value": None, "unit": "", "ratio": None, "target": None,
             "met": None}]


def _number(value: Any, unit: str) -> str:
    """3 significant digits, without exponent notation for large numbers (``2637 MiB``, ``0.295 steps/s``)."""
    if value is None:
        return ""
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def _machine_text(info: dict[str, Any] | None) -> str:
    """``machine_line`` for the shared layout; the raw fields for an older JSON that predates it."""
    if not info:
        return "machine not recorded"
    if "cpu_model" in info or "load_average" in info:
        return machine_line(info)
    return ", ".join(f"{key} {value}" for key, value in info.items() if key != "platform")


def _committed_report(name: str, fallback: Path) -> Path:
    """A study's committed report under ``benchmarks/results/<name>/`` when there is one (``out/`` is not in git)."""
    committed = BENCHMARKS_DIR / "results" / name / fallback.name
    return committed if committed.is_file() else fallback


def markdown_report(entries: dict[str, dict[str, Any]], machine: dict[str, Any], quick: bool) -> str:
    lines = [
        "# raysemi benchmark results" + (" (QUICK smoke-test sizes: not a measurement)" if quick else ""),
        "",
        f"Measured on: {machine_line(machine)}.",
        "",
        "Ratio = measurement / baseline, both measured in the same run. Targets come from the issues;",
        "timings are never asserted. Details, settings and notes per benchmark: `benchmarks/results"
        + ("-quick" if quick else "") + ".json`.",
        "",
        "| benchmark | measurement | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in entries.items():
        if entry["status"] == "missing":
            continue
        if entry["status"] != "ok":
            lines.append(f"| {name} | FAILED (exit {entry.get('exit_code')}, log `{entry.get('log')}`) | | | | |")
            continue
        for row in table_rows(name, entry):
            measurement = row["measurement"] + (f": {_number(row['value'], row['unit'])}"
                                                if row.get("value") is not None else "")
            baseline = row["baseline"] + (f": {_number(row['baseline_value'], row['unit'])}"
                                          if row.get("baseline_value") is not None else "")
            ratio = "" if row.get("ratio") is None else f"{row['ratio']:.2f}"
            met = {True: "yes", False: "no", None: ""}[row.get("met")]
            lines.append(f"| {name} | {measurement} | {baseline} | {ratio} | {row.get('target') or ''} | {met} |")
    collected = [(name, entry["report"].get("machine")) for name, entry in entries.items() if entry.get("collected")]
    if collected:
        lines += ["", "Collected from separate runs (`--collect`); each was measured on:", ""]
        lines += [f"- {name}: {_machine_text(info)}" for name, info in collected]
    notes = [(name, note) for name, entry in entries.items() if entry["status"] == "ok"
             for note in entry["report"].get("notes", [])]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {name}: {note}" for name, note in notes]
    missing = [name for name, entry in entries.items() if entry["status"] == "missing"]
    if missing:
        lines += ["", f"Not run (script or result JSON not present): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark at its smoke-test sizes")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: build the report from the JSONs earlier runs left in benchmarks/out/")
    args = parser.parse_args(argv)

    machine = machine_info()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries = {}
    for name in args.only or BENCHMARKS:
        run = collect_benchmark if args.collect else run_benchmark
        entries[name] = run(name, BENCHMARKS[name], args.quick)
        if entries[name]["status"] == "missing" and not BENCHMARKS[name].optional:
            print(f"WARNING: {entries[name]['script']} does not exist", flush=True)

    suffix = "-quick" if args.quick else ""
    machine["load_average_after"] = machine_info()["load_average"]
    results = {"quick": args.quick, "started": started, "machine": machine, "benchmarks": entries}
    atomic_write_json(BENCHMARKS_DIR / f"results{suffix}.json", results)
    markdown = markdown_report(entries, machine, args.quick)
    atomic_write_text(BENCHMARKS_DIR / f"results{suffix}.md", markdown)
    print("\n" + markdown)
    print(f"wrote {BENCHMARKS_DIR / f'results{suffix}.json'} and {BENCHMARKS_DIR / f'results{suffix}.md'}")
    failed = [name for name, entry in entries.items() if entry["status"] == "failed"]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
