"""Evaluation reports: per-case metrics and their summary as CSV, JSON and Markdown.

``write_reports`` writes three views of the same numbers, each atomically:

- ``<stem>.csv``: one row per case (``case_id`` first, then every field in order of first
  appearance), then four summary rows whose ``case_id`` is ``mean``, ``median``, ``std`` and ``n``.
  Missing values and NaN are empty cells.
- ``<stem>.json``: ``{"cases": [row, ...], "summary": {"mean": {...}, "median": {...},
  "std": {...}, "n": {...}}}``; NaN is written as ``null`` so that the file is strict JSON.
- ``<stem>.md``: a summary table (Dice and HD95 mean ± std and median per region and class),
  a table of any other numeric metric, and the per-case table.

Summary statistics come from :func:`raysemi.evaluation.metrics.summarise` (NaN ignored,
population std).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from raysemi.atomic import atomic_write_json, atomic_write_text
from raysemi.errors import DataError
from raysemi.evaluation.metrics import (
    CLASSES,
    HD95_KEYS,
    METRIC_KEYS,
    REGIONS,
    metric_label,
    summarise,
)

_SUMMARY_ROWS = ("mean", "median", "std", "n")
_MISSING = "n/a"

# Rows of the summary table: (structure label, labels it is made of, Dice key, HD95 key).
_STRUCTURE_ROWS = [
    *((f"{name} region", "+".join(map(str, labels)), f"dice_region_{name}", f"hd95_region_{name}")
      for name, labels in REGIONS.items()),
    *((f"{name.replace('_', '/')} class", "+".join(map(str, labels)), f"dice_class_{name}",
       f"hd95_class_{name}") for name, labels in CLASSES.items()),
    ("Mean of regions", "", "dice_mean_regions", None),
    ("Mean of classes", "", "dice_mean_classes", None),
]

# Row order of the comparison table: the paper's per-class Dice first, then regions, means, HD95.
_COMPARISON_ORDER = (
    *(f"dice_class_{name}" for name in CLASSES),
    *(f"dice_region_{name}" for name in REGIONS),
    "dice_mean_classes",
    "dice_mean_regions",
    *(f"hd95_class_{name}" for name in CLASSES),
    *(f"hd95_region_{name}" for name in REGIONS),
)


def write_reports(rows: Sequence[Mapping[str, Any]], out_dir: str | Path,
                  stem: str = "metrics") -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.json`` and ``<stem>.md`` for per-case metrics.

    Args:
        rows: one mapping per case with a ``case_id`` and metric keys, e.g. the dicts from
            :func:`~raysemi.evaluation.metrics.brats_metrics` plus ``case_id``.
        out_dir: folder to write into (created if missing).
        stem: file name without extension.

    Returns:
        ``{"csv": path, "json": path, "md": path}``.

    Raises:
        DataError: no rows, a row without ``case_id``, a repeated ``case_id``, or a metric value
            that is not a number.
    """
    _check_rows(rows)
    summary = summarise(rows)
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    atomic_write_text(paths["csv"], _csv_text(rows, summary))
    atomic_write_json(paths["json"], {
        "cases": [{key: _json_value(value) for key, value in row.items()} for row in rows],
        "summary": {name: {key: _json_value(value) for key, value in values.items()}
                    for name, values in summary.items()},
    })
    atomic_write_text(paths["md"], _markdown_report(rows, summary, title=stem))
    return paths


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table.

    Args:
        headers: column titles.
        rows: cells per row, each row as long as ``headers``. Floats are written with 4
            decimals, ``None`` and NaN as ``n/a``, anything else with ``str``; ``|`` is escaped.

    Returns:
        The table, one line per row, ending with a newline.
    """
    lines = [_markdown_row(headers), "|" + "|".join(" --- " for _ in headers) + "|"]
    for index, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row {index} has {len(row)} cells, expected {len(headers)}")
        lines.append(_markdown_row([_format_cell(cell) for cell in row]))
    return "\n".join(lines) + "\n"


def comparison_table(named: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table comparing models, one column per model (e.g. the paper's teacher vs student).

    Args:
        named: ``{model name: {metric key: value}}``, e.g.
            ``{"teacher": summary["mean"], "student": summary["mean"]}``.

    Returns:
        One row per metric present in any model: per-class Dice (NCR/NET, ED, ET), region Dice
        (ET, TC, WT), their means, HD95 per class and region, then other keys in order of first
        appearance. A metric a model lacks shows ``n/a``. Dice has 4 decimals, HD95 2 (mm).
    """
    present: list[str] = []
    for metrics in named.values():
        for key in metrics:
            if key not in present:
                present.append(key)
    ordered = [key for key in _COMPARISON_ORDER if key in present]
    ordered += [key for key in present if key not in ordered]
    rows = [[metric_label(key), *(_format_metric(key, metrics.get(key)) for metrics in named.values())]
            for key in ordered]
    return markdown_table(["Metric", *named], rows)


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        raise DataError("write_reports: no cases to report (rows is empty)")
    seen: set[str] = set()
    for index, row in enumerate(rows):
        case_id = row.get("case_id")
        if not case_id:
            raise DataError(f"write_reports: row {index} has no 'case_id' (keys: {sorted(row)})")
        if case_id in seen:
            raise DataError(f"write_reports: case {case_id!r} appears more than once")
        seen.add(case_id)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = ["case_id"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def _csv_text(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, float]]) -> str:
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    for name in _SUMMARY_ROWS:
        writer.writerow([name, *(_csv_cell(summary[name].get(column)) for column in columns[1:])])
    return buffer.getvalue()


def _markdown_report(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, float]],
                     title: str) -> str:
    mean, median, std, count = (summary[name] for name in _SUMMARY_ROWS)
    parts = [
        f"# {title}\n",
        f"{len(rows)} cases. Dice in [0, 1]; HD95 in mm (MONAI: larger of the two directed 95th "
        "percentiles of surface distances). Empty masks: both empty -> Dice 1, HD95 0; one empty "
        "-> Dice 0, HD95 373.13. Mean ± population std over cases.\n",
        "## Summary\n",
    ]
    structure_rows = [
        [structure, labels, _mean_std(dice_key, mean, std), _format_metric(dice_key, median.get(dice_key)),
         _mean_std(hd_key, mean, std) if hd_key else "", _format_metric(hd_key, median.get(hd_key)) if hd_key else "",
         count.get(dice_key, 0)]
        for structure, labels, dice_key, hd_key in _STRUCTURE_ROWS
        if dice_key in mean or (hd_key and hd_key in mean)
    ]
    parts.append(markdown_table(
        ["Structure", "Labels", "Dice mean ± std", "Dice median", "HD95 mean ± std (mm)", "HD95 median (mm)", "n"],
        structure_rows))
    other_keys = [key for key in mean if key not in METRIC_KEYS]
    if other_keys:
        parts.append("\n## Other metrics\n")
        parts.append(markdown_table(
            ["Metric", "mean ± std", "median", "n"],
            [[key, _mean_std(key, mean, std), _format_metric(key, median[key]), count[key]] for key in other_keys]))
    metric_columns = [key for key in METRIC_KEYS if key in mean] + other_keys
    parts.append("\n## Per case\n")
    parts.append(markdown_table(
        ["case_id", *(metric_label(key) for key in metric_columns)],
        [[row["case_id"], *(_format_metric(key, row.get(key)) for key in metric_columns)] for row in rows]))
    return "\n".join(parts)


def _is_hd95(key: str | None) -> bool:
    return key is not None and (key in HD95_KEYS or key.startswith("hd95"))


def _format_metric(key: str | None, value: Any) -> str:
    value = _json_value(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}" if _is_hd95(key) else f"{value:.4f}"
    return str(value)


def _mean_std(key: str, mean: Mapping[str, float], std: Mapping[str, float]) -> str:
    if key not in mean or math.isnan(mean[key]):
        return _MISSING
    return f"{_format_metric(key, mean[key])} ± {_format_metric(key, std[key])}"


def _format_cell(cell: Any) -> str:
    cell = _json_value(cell)
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return _MISSING
    if isinstance(cell, float):
        return f"{cell:.4f}"
    return str(cell)


def _markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _csv_cell(value: Any) -> str:
    value = _json_value(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: the CSV reloads to the same numbers
    return str(value)


def _json_value(value: Any) -> Any:
    """Plain JSON types: numpy and torch scalars -> Python numbers, NaN -> None."""
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
