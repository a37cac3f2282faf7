"""Curriculum schedule: admitted counts, selection in both modes, validation."""

from __future__ import annotations

import pytest

from raysemi.semi.curriculum import CurriculumSchedule


@pytest.mark.parametrize(
    ("n_unlabeled", "expected_counts"),
    [
        (6, [1, 2, 3, 4, 5, 6]),
        (10, [2, 4, 5, 7, 9, 10]),  # ceil(10/6)=2, ceil(20/6)=4, 5, ceil(40/6)=7, ceil(50/6)=9, 10
        (1, [1, 1, 1, 1, 1, 1]),
        (0, [0, 0, 0, 0, 0, 0]),
    ],
)
def test_default_fractions_admit_ceil_s_over_six(n_unlabeled, expected_counts):
    schedule = CurriculumSchedule()
    assert [schedule.admitted_count(stage, n_unlabeled) for stage in range(1, 7)] == expected_counts


@pytest.mark.parametrize(("fraction", "n_unlabeled", "expected"), [(0.07, 100, 7), (0.14, 100, 14), (0.55, 100, 55)])
def test_float_error_does_not_admit_an_extra_scan(fraction, n_unlabeled, expected):
    assert fraction * n_unlabeled > expected  # the float product overshoots: a bare ceil would say expected + 1
    schedule = CurriculumSchedule(stages=2, fractions=[fraction, 1.0])
    assert schedule.admitted_count(1, n_unlabeled) == expected


RANKED = [("c", 0.9), ("a", 0.8), ("e", 0.8), ("b", 0.5), ("d", 0.1)]


def test_fraction_mode_selects_the_top_of_the_ranking():
    schedule = CurriculumSchedule(stages=3, fractions=[0.4, 0.6, 1.0])
    assert schedule.select(1, RANKED) == ["c", "a"]
    assert schedule.select(2, RANKED) == ["c", "a", "e"]
    assert schedule.select(3, RANKED) == ["c", "a", "e", "b", "d"]


def test_threshold_mode_selects_every_scan_at_or_above_the_stage_threshold():
    schedule = CurriculumSchedule(stages=3, mode="threshold", thresholds=[0.85, 0.5, 0.0])
    assert schedule.select(1, RANKED) == ["c"]
    assert schedule.select(2, RANKED) == ["c", "a", "e", "b"]  # 0.5 >= 0.5 is admitted
    assert schedule.select(3, RANKED) == ["c", "a", "e", "b", "d"]


def test_select_rejects_an_unsorted_ranking():
    with pytest.raises(ValueError, match="highest first"):
        CurriculumSchedule().select(1, [("a", 0.1), ("b", 0.9)])


@pytest.mark.parametrize("stage", [0, 7, -1])
def test_stage_out_of_range_names_the_valid_range(stage):
    schedule = CurriculumSchedule(stages=6)
    with pytest.raises(ValueError, match=r"1\.\.6"):
        schedule.admitted_count(stage, 10)
    with pytest.raises(ValueError, match=r"1\.\.6"):
        schedule.select(stage, RANKED)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": 0}, "stages"),
        ({"mode": "ranked"}, "mode"),
        ({"stages": 3, "fractions": [0.5, 1.0]}, "expected 3 values"),
        ({"stages": 3, "fractions": [0.0, 0.5, 1.0]}, r"stage 1 has 0.0"),
        ({"stages": 3, "fractions": [0.2, 0.5, 1.2]}, r"stage 3 has 1.2"),
        ({"stages": 3, "fractions": [0.5, 0.4, 1.0]}, "nondecreasing"),
        ({"stages": 3, "mode": "threshold"}, "needs thresholds"),
        ({"stages": 3, "mode": "threshold", "thresholds": [0.9, 0.5]}, "expected 3 values"),
        ({"stages": 3, "mode": "threshold", "thresholds": [0.5, 0.7, 0.1]}, "nonincreasing"),
        ({"stages": 3, "mode": "threshold", "thresholds": [1.5, 0.7, 0.1]}, r"stage 1 has 1.5"),
    ],
)
def test_invalid_schedules_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurriculumSchedule(**kwargs)
