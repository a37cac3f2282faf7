"""Which ranked unlabeled scans each curriculum stage admits.

METHOD.md, "Progressive curriculum": S stages (default 6). In ``"fraction"`` mode stage s admits
the top ⌈f_s · N⌉ scans of the current confidence ranking, with cumulative fractions
f = (1/S, 2/S, ..., 1) by default. In ``"threshold"`` mode it admits every scan with
confidence C ≥ τ_C(s). Stages are numbered from 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

CurriculumMode = Literal["fraction", "threshold"]

# f·N is rounded to this many decimals before the ceiling, so that float error such as
# 0.07 * 100 = 7.000000000000001 admits 7 scans, not 8.
_COUNT_DECIMALS = 9


class CurriculumSchedule:
    """Stage -> admitted scans.

    Args:
        stages: number of stages S (>= 1).
        mode: "fraction" (top ⌈f_s·N⌉ of the ranking) or "threshold" (C ≥ τ_C(s)).
        fractions: S cumulative fractions, each in (0, 1], nondecreasing; default s/S.
            Used in "fraction" mode, validated whenever given.
        thresholds: S confidence thresholds, each in [0, 1], nonincreasing (later stages admit
            more). Required in "threshold" mode, validated whenever given.
    """

    def __init__(
        self,
        stages: int = 6,
        mode: CurriculumMode = "fraction",
        fractions: Sequence[float] | None = None,
        thresholds: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
            raise ValueError(f"curriculum stages must be an integer >= 1; got {stages!r}")
        if mode not in ("fraction", "threshold"):
            raise ValueError(f"curriculum mode must be 'fraction' or 'threshold'; got {mode!r}")
        self.stages = stages
        self.mode: CurriculumMode = mode
        if fractions is None:
            fractions = [stage / stages for stage in range(1, stages + 1)]
        self.fractions = _checked_fractions(fractions, stages)
        self.thresholds = _checked_thresholds(thresholds, stages) if thresholds is not None else None
        if mode == "threshold" and self.thresholds is None:
            raise ValueError("curriculum mode 'threshold' needs thresholds (one per stage)")

    def __repr__(self) -> str:
        return (
            f"CurriculumSchedule(stages={self.stages}, mode={self.mode!r}, "
            f"fractions={self.fractions}, thresholds={self.thresholds})"
        )

    def _check_stage(self, stage: int) -> None:
        if not isinstance(stage, int) or isinstance(stage, bool) or not 1 <= stage <= self.stages:
            raise ValueError(f"curriculum stage must be an integer in 1..{self.stages}; got {stage!r}")

    def admitted_count(self, stage: int, n_unlabeled: int) -> int:
        """⌈f_s · N⌉: how many of N ranked scans the fraction schedule admits at ``stage``."""
        self._check_stage(stage)
        if n_unlabeled < 0:
            raise ValueError(f"n_unlabeled must be >= 0; got {n_unlabeled}")
        return math.ceil(round(self.fractions[stage - 1] * n_unlabeled, _COUNT_DECIMALS))

    def threshold(self, stage: int) -> float:
        """τ_C(s), the confidence a scan needs at ``stage`` in threshold mode."""
        self._check_stage(stage)
        if self.thresholds is None:
            raise ValueError("this schedule has no thresholds (mode 'fraction' without thresholds)")
        return self.thresholds[stage - 1]

    def select(self, stage: int, ranked: Sequence[tuple[str, float]]) -> list[str]:
        """Case ids admitted at ``stage``.

        Args:
            stage: 1-based stage.
            ranked: (case_id, confidence) pairs sorted by confidence, highest first.

        Returns:
            The admitted case ids, in ranking order.
        """
        self._check_stage(stage)
        confidences = [confidence for _, confidence in ranked]
        if any(later > earlier for earlier, later in zip(confidences, confidences[1:])):
            raise ValueError("ranked must be sorted by confidence, highest first")
        if self.mode == "fraction":
            return [case_id for case_id, _ in ranked[: self.admitted_count(stage, len(ranked))]]
        needed = self.threshold(stage)
        return [case_id for case_id, confidence in ranked if confidence >= needed]


def _checked_fractions(fractions: Sequence[float], stages: int) -> tuple[float, ...]:
    fractions = tuple(float(value) for value in fractions)
    if len(fractions) != stages:
        raise ValueError(f"curriculum fractions: expected {stages} values (one per stage), got {len(fractions)}")
    for index, value in enumerate(fractions, start=1):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"curriculum fractions: stage {index} has {value}, expected a value in (0, 1]")
    for index in range(1, stages):
        if fractions[index] < fractions[index - 1]:
            raise ValueError(
                f"curriculum fractions must be nondecreasing (cumulative); stage {index + 1} has "
                f"{fractions[index]} < stage {index}'s {fractions[index - 1]}"
            )
    return fractions


def _checked_thresholds(thresholds: Sequence[float], stages: int) -> tuple[float, ...]:
    thresholds = tuple(float(value) for value in thresholds)
    if len(thresholds) != stages:
        raise ValueError(f"curriculum thresholds: expected {stages} values (one per stage), got {len(thresholds)}")
    for index, value in enumerate(thresholds, start=1):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"curriculum thresholds: stage {index} has {value}, expected a value in [0, 1]")
    for index in range(1, stages):
        if thresholds[index] > thresholds[index - 1]:
            raise ValueError(
                f"curriculum thresholds must be nonincreasing (later stages admit more); stage {index + 1} has "
                f"{thresholds[index]} > stage {index}'s {thresholds[index - 1]}"
            )
    return thresholds
