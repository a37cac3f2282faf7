"""Evaluation: BraTS metrics (Dice, HD95 per region and class), reports and plots."""

from raysemi.evaluation.metrics import (
    CLASSES,
    DICE_KEYS,
    HD95_EMPTY,
    HD95_KEYS,
    METRIC_KEYS,
    REGIONS,
    STRUCTURES,
    brats_metrics,
    dice_per_region,
    metric_label,
    structure_masks,
    summarise,
)
from raysemi.evaluation.report import comparison_table, markdown_table, write_reports

__all__ = [
    "CLASSES",
    "DICE_KEYS",
    "HD95_EMPTY",
    "HD95_KEYS",
    "METRIC_KEYS",
    "REGIONS",
    "STRUCTURES",
    "brats_metrics",
    "comparison_table",
    "dice_per_region",
    "markdown_table",
    "metric_label",
    "structure_masks",
    "summarise",
    "write_reports",
]
