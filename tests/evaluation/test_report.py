"""Reports: CSV/JSON/Markdown written atomically, reloading to the same numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from raysemi.errors import DataError
from raysemi.evaluation.metrics import brats_metrics
from raysemi.evaluation.report import comparison_table, markdown_table, write_reports

ROWS = [
    {"case_id": "BraTS2021_00000", "dice_region_ET": 0.7, "hd95_region_ET": 2.0, "dice_class_ED": 0.9},
    {"case_id": "BraTS2021_00001", "dice_region_ET": 0.8, "hd95_region_ET": 3.0, "dice_class_ED": math.nan},
]


def test_writes_csv_json_and_markdown(tmp_path: Path) -> None:
    paths = write_reports(ROWS, tmp_path / "results")

    assert paths == {"csv": tmp_path / "results" / "metrics.csv", "json": tmp_path / "results" / "metrics.json",
                     "md": tmp_path / "results" / "metrics.md"}
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["metrics.csv", "metrics.json", "metrics.md"]


def test_json_reloads_to_the_same_numbers(tmp_path: Path) -> None:
    paths = write_reports(ROWS, tmp_path, stem="teacher")

    report = json.loads(paths["json"].read_text())

    assert report["cases"][0] == ROWS[0]
    assert report["cases"][1]["dice_class_ED"] is None  # NaN -> null: strict JSON
    assert report["summary"]["mean"]["dice_region_ET"] == pytest.approx(0.75)
    assert report["summary"]["std"]["dice_region_ET"] == pytest.approx(0.05)  # population std
    assert report["summary"]["median"]["hd95_region_ET"] == pytest.approx(2.5)
    assert report["summary"]["mean"]["dice_class_ED"] == pytest.approx(0.9)  # NaN ignored
    assert report["summary"]["n"]["dice_class_ED"] == 1


def test_csv_has_cases_then_summary_rows(tmp_path: Path) -> None:
    paths = write_reports(ROWS, tmp_path)

    with open(paths["csv"], newline="") as handle:
        table = list(csv.DictReader(handle))

    assert [row["case_id"] for row in table] == ["BraTS2021_00000", "BraTS2021_00001", "mean", "median", "std", "n"]
    assert float(table[0]["dice_region_ET"]) == 0.7  # full precision round trip
    assert table[1]["dice_class_ED"] == ""  # NaN -> empty cell
    assert float(table[2]["hd95_region_ET"]) == pytest.approx(2.5)
    assert float(table[4]["dice_region_ET"]) == pytest.approx(np.std([0.7, 0.8]))
    assert table[5]["dice_region_ET"] == "2"


def test_markdown_contains_the_summary_row(tmp_path: Path) -> None:
    paths = write_reports(ROWS, tmp_path)

    text = paths["md"].read_text()

    assert "| ET region | 3 | 0.7500 ± 0.0500 | 0.7500 | 2.50 ± 0.50 | 2.50 | 2 |" in text
    assert "| ED class | 2 | 0.9000 ± 0.0000 | 0.9000 |" in text
    assert "BraTS2021_00001" in text  # per-case table


def test_reports_from_brats_metrics(tmp_path: Path) -> None:
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    ref[3:7, 3:7, 3:7] = 3
    rows = [
        {"case_id": "perfect", **brats_metrics(ref, ref)},
        {"case_id": "shifted", **brats_metrics(np.roll(ref, 1, axis=2), ref, spacing=(1.0, 1.0, 2.5))},
    ]

    paths = write_reports(rows, tmp_path)
    report = json.loads(paths["json"].read_text())

    # Dice: 1 and 0.75 (hand values, see test_metrics); HD95: 0 and 2.5 mm.
    assert report["summary"]["mean"]["dice_region_WT"] == pytest.approx(0.875)
    assert report["summary"]["mean"]["hd95_region_WT"] == pytest.approx(1.25)
    assert "| WT region | 1+2+3 | 0.8750 ± 0.1250 |" in paths["md"].read_text()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "no cases"),
        ([{"dice_region_ET": 0.5}], "row 0 has no 'case_id'"),
        ([{"case_id": "a", "dice_region_ET": 0.5}, {"case_id": "a", "dice_region_ET": 0.6}], "'a' appears more"),
    ],
)
def test_bad_rows_raise_data_error(tmp_path: Path, rows: list[dict], message: str) -> None:
    with pytest.raises(DataError, match=message):
        write_reports(rows, tmp_path)
    assert not any(tmp_path.iterdir())


def test_markdown_table_formats_cells() -> None:
    table = markdown_table(["name", "value", "n"], [["a|b", 0.123456, 3], ["c", math.nan, None]])

    assert table == (
        "| name | value | n |\n"
        "| --- | --- | --- |\n"
        "| a\\|b | 0.1235 | 3 |\n"
        "| c | n/a | n/a |\n"
    )


def test_comparison_table_orders_classes_first_and_marks_missing() -> None:
    table = comparison_table({
        "teacher": {"dice_region_WT": 0.9, "dice_class_ET": 0.0, "hd95_region_WT": 4.123},
        "student": {"dice_region_WT": 0.92, "dice_class_ET": 0.62},
    })

    lines = table.splitlines()
    assert lines[0] == "| Metric | teacher | student |"
    assert lines[2] == "| Dice ET class | 0.0000 | 0.6200 |"
    assert lines[3] == "| Dice WT region | 0.9000 | 0.9200 |"
    assert lines[4] == "| HD95 WT region (mm) | 4.12 | n/a |"
    assert len(lines) == 5
