"""Figures: learning curves, segmentation overlays, Dice per stage, data efficiency, comparisons.

Every function builds a :class:`matplotlib.figure.Figure` and renders it with the Agg canvas
(``FigureCanvasAgg``), never through ``pyplot``. That is the Agg backend without switching
matplotlib's global backend: safe in Ray workers and threads and next to a user's interactive
session, no window opens and no figure stays alive in pyplot's registry. Each PNG is written
atomically (:mod:`raysemi.atomic`) at :data:`DPI` dots per inch with a fixed figure size (given
per function, in inches), so a PNG is exactly ``inches * DPI`` pixels; every function returns the
path it wrote.

Segmentations use the usual BraTS colours (:data:`LABEL_COLOURS`): NCR/NET red, ED green,
ET yellow, blended over the MRI with opacity :data:`OVERLAY_ALPHA`.

Slices are axial (the last array axis, Z, of an RAS array) and drawn as ``image[:, :, z].T`` with
``origin="lower"``: anterior is up and the patient's right is on the image's right
(neurological convention).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from raysemi.atomic import atomic_path
from raysemi.errors import DataError
from raysemi.evaluation.metrics import DICE_KEYS, metric_label

DPI = 100
"""Dots per inch of every PNG."""

MODALITY_NAMES = ("T1", "T1ce", "T2", "FLAIR")
"""Display names of the image channels, in raysemi's modality order (t1, t1ce, t2, flair)."""

LABEL_COLOURS: dict[int, tuple[float, float, float]] = {
    1: (1.0, 0.0, 0.0),  # NCR/NET: red
    2: (0.0, 1.0, 0.0),  # ED: green
    3: (1.0, 1.0, 0.0),  # ET: yellow
}
"""RGB colour of each internal label in overlays (BraTS convention)."""

LABEL_NAMES = {1: "NCR/NET", 2: "ED", 3: "ET"}

OVERLAY_ALPHA = 0.45
"""Opacity of the label colours over the MRI: the anatomy stays visible under the tumour."""

_UNCERTAINTY_SHOWN_FROM = 0.05  # below this the heat map is transparent, so the brain shows through
_WINDOW_PERCENTILES = (1.0, 99.0)
_PANEL_INCHES = (3.0, 3.2)  # width, height of one image panel in segmentation_overlay
_STAGE_BOUNDARY_STYLE = {"color": "red", "linestyle": "--", "linewidth": 1.0}


def learning_curves(history: Sequence[Mapping[str, Any]], out_png: str | Path,
                    keys: Sequence[str] | None = None,
                    stage_boundaries: Sequence[float] | None = None) -> Path:
    """Loss and metric curves over epochs, with dashed red lines where curriculum stages begin.

    Keys are split into panels: keys containing ``loss``, keys starting with ``dice``, and any
    other (learning rate, HD95, ...); a panel appears only when it has a key. Each series is drawn
    at the epochs where it has a finite value, so validation every k epochs is fine.

    Args:
        history: one mapping per logged epoch, each with ``epoch`` and metric values.
        out_png: PNG to write.
        keys: metric keys to draw; ``None`` draws every numeric key except ``epoch`` and ``stage``.
        stage_boundaries: epochs at which a new stage begins (the paper's Figure 5).

    Returns:
        ``out_png``. Figure: 5.5 in wide per panel, 4 in tall.

    Raises:
        DataError: an entry without a numeric ``epoch``, or a requested key in no entry.
    """
    for index, entry in enumerate(history):
        if not _is_number(entry.get("epoch")):
            raise DataError(f"learning_curves: history entry {index} has no numeric 'epoch' "
                            f"(got {entry.get('epoch')!r})")
    if keys is None:
        keys = _numeric_keys(history, exclude=("epoch", "stage"))
    else:
        absent = [key for key in keys if not any(key in entry for entry in history)]
        if absent:
            raise DataError(f"learning_curves: keys {absent} appear in no history entry")
    if not keys:
        raise DataError("learning_curves: no metric to plot (history has only 'epoch')")

    loss_keys = [key for key in keys if "loss" in key]
    dice_keys = [key for key in keys if key.startswith("dice") and key not in loss_keys]
    other_keys = [key for key in keys if key not in loss_keys and key not in dice_keys]
    panels = [(title, group) for title, group in
              (("Loss", loss_keys), ("Dice", dice_keys), ("Other metrics", other_keys)) if group]

    figure = Figure(figsize=(5.5 * len(panels), 4.0), layout="constrained")
    for axes, (title, group) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in group:
            epochs, values = _series(history, key)
            marker = "o" if len(epochs) < 30 else None
            axes.plot(epochs, values, marker=marker, markersize=3, label=metric_label(key))
        if title == "Dice":
            axes.set_ylim(0.0, 1.0)
        for boundary in stage_boundaries or ():
            axes.axvline(boundary, **_STAGE_BOUNDARY_STYLE)
        handles, _ = axes.get_legend_handles_labels()
        if stage_boundaries:
            handles.append(Line2D([], [], label="stage boundary", **_STAGE_BOUNDARY_STYLE))
        axes.legend(handles=handles, fontsize="small")
        axes.set(title=title, xlabel="epoch")
        axes.grid(alpha=0.3)
    return _save(figure, out_png)


def tumour_slice_index(labels: np.ndarray | torch.Tensor) -> int:
    """Index of the axial slice (last axis) with the most tumour (label > 0) voxels; ties -> first.

    Args:
        labels: label map ``(X, Y, Z)``.
    """
    counts = (np.asarray(labels) > 0).sum(axis=(0, 1))
    return int(np.argmax(counts))


def segmentation_overlay(image: np.ndarray | torch.Tensor, out_png: str | Path,
                         pred: np.ndarray | torch.Tensor | None = None,
                         ref: np.ndarray | torch.Tensor | None = None,
                         slice_index: int | None = None, title: str = "",
                         uncertainty: np.ndarray | torch.Tensor | None = None) -> Path:
    """The four MRI modalities of one axial slice with the segmentation overlaid (paper's Figure 2).

    Row 1: T1, T1ce, T2, FLAIR, each with the reference overlaid (the prediction when there is
    no reference). With both ``pred`` and ``ref``, row 2 compares them: reference and prediction
    on FLAIR, then on T1ce. With ``uncertainty``, an extra column shows it as a heat map over FLAIR
    (transparent below 0.05).

    The slice is ``slice_index`` or else the most tumorous slice of the reference (or of the
    prediction); without labels, the slice with the most uncertainty, or else with the most brain.
    Each panel is windowed to the 1st-99th percentile of its non-zero voxels.

    Args:
        image: ``(4, X, Y, Z)`` in modality order t1, t1ce, t2, flair (RAS).
        out_png: PNG to write.
        pred: predicted internal labels 0..3, ``(X, Y, Z)``.
        ref: reference internal labels 0..3, ``(X, Y, Z)``.
        slice_index: axial slice to show (index along Z).
        title: figure title; the slice index is appended.
        uncertainty: per-voxel uncertainty in [0, 1], ``(X, Y, Z)``.

    Returns:
        ``out_png``. Figure: 3 in wide per column (4, or 5 with uncertainty), 3.2 in tall per row
        (1, or 2 with pred and ref).

    Raises:
        DataError: wrong shapes, labels outside 0..3, or a slice index out of range.
    """
    image = _as_numpy(image)
    if image.ndim != 4 or image.shape[0] != len(MODALITY_NAMES):
        raise DataError(f"segmentation_overlay: image must be (4, X, Y, Z) in modality order "
                        f"t1, t1ce, t2, flair; got shape {image.shape}")
    spatial_shape = image.shape[1:]
    pred = _check_label_map(pred, "pred", spatial_shape)
    ref = _check_label_map(ref, "ref", spatial_shape)
    if uncertainty is not None:
        uncertainty = _as_numpy(uncertainty)
        if uncertainty.shape != spatial_shape:
            raise DataError(f"segmentation_overlay: uncertainty has shape {uncertainty.shape}, "
                            f"expected the image's spatial shape {spatial_shape}")
    z = _choose_slice(image, pred, ref, uncertainty) if slice_index is None else int(slice_index)
    if not 0 <= z < spatial_shape[2]:
        raise DataError(f"segmentation_overlay: slice_index {z} outside 0..{spatial_shape[2] - 1}")

    shown_labels, shown_name = (ref, "reference") if ref is not None else (pred, "prediction")
    n_columns = len(MODALITY_NAMES) + (uncertainty is not None)
    n_rows = 2 if pred is not None and ref is not None else 1
    figure = Figure(figsize=(_PANEL_INCHES[0] * n_columns, _PANEL_INCHES[1] * n_rows), layout="constrained")
    grid = figure.subplots(n_rows, n_columns, squeeze=False)

    for column, name in enumerate(MODALITY_NAMES):
        _draw_slice(grid[0, column], image[column][:, :, z], None if shown_labels is None else shown_labels[:, :, z])
        suffix = f" + {shown_name}" if shown_labels is not None else ""
        grid[0, column].set_title(name + suffix, fontsize="medium")
    if uncertainty is not None:
        _draw_uncertainty(figure, grid[0, -1], image[MODALITY_NAMES.index("FLAIR")][:, :, z], uncertainty[:, :, z])
    if n_rows == 2:
        comparisons = [("FLAIR", ref, "reference"), ("FLAIR", pred, "prediction"),
                       ("T1ce", ref, "reference"), ("T1ce", pred, "prediction")]
        for column, (modality, labels, labels_name) in enumerate(comparisons):
            _draw_slice(grid[1, column], image[MODALITY_NAMES.index(modality)][:, :, z], labels[:, :, z])
            grid[1, column].set_title(f"{modality} + {labels_name}", fontsize="medium")
        for axes in grid[1, len(comparisons):]:
            axes.set_axis_off()

    if shown_labels is not None:
        legend = [Patch(facecolor=LABEL_COLOURS[label], alpha=OVERLAY_ALPHA, label=LABEL_NAMES[label])
                  for label in LABEL_COLOURS]
        figure.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize="small")
    figure.suptitle(f"{title} (axial slice z={z})" if title else f"axial slice z={z}")
    return _save(figure, out_png)


def stage_dice(stage_metrics: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Validation Dice after each curriculum stage, one line per region and class.

    Regions are solid lines, classes dashed, the two means dotted. The ET class is left out when
    the ET region is there: they are the same voxels, so the two lines would coincide.

    Args:
        stage_metrics: one mapping per stage with ``stage`` (number) and ``dice_*`` keys.
        out_png: PNG to write.

    Returns:
        ``out_png``. Figure: 7 x 4.5 in.

    Raises:
        DataError: an entry without a numeric ``stage``, or no ``dice_*`` key at all.
    """
    for index, entry in enumerate(stage_metrics):
        if not _is_number(entry.get("stage")):
            raise DataError(f"stage_dice: entry {index} has no numeric 'stage' (got {entry.get('stage')!r})")
    dice_keys = [key for key in _numeric_keys(stage_metrics, exclude=("stage",)) if key.startswith("dice")]
    if not dice_keys:
        raise DataError("stage_dice: no 'dice_*' key in any stage entry")
    if "dice_region_ET" in dice_keys and "dice_class_ET" in dice_keys:
        dice_keys.remove("dice_class_ET")
    dice_keys.sort(key=lambda key: DICE_KEYS.index(key) if key in DICE_KEYS else len(DICE_KEYS))

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.subplots()
    for key in dice_keys:
        stages, values = _series(stage_metrics, key, x_key="stage")
        linestyle = "--" if "_class_" in key else ":" if "_mean_" in key else "-"
        axes.plot(stages, values, marker="o", linestyle=linestyle, label=metric_label(key))
    stages = sorted({int(entry["stage"]) for entry in stage_metrics})
    axes.set_xticks(stages)
    axes.set(xlabel="stage", ylabel="validation Dice", ylim=(0.0, 1.0), title="Validation Dice per stage")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncols=2)
    return _save(figure, out_png)


def data_efficiency(points: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Dice against the fraction of labelled scans, one line per method.

    Several points of one method at one fraction (seeds, folds) are drawn as their mean with a
    standard-deviation error bar.

    Args:
        points: mappings with ``labeled_fraction`` (in (0, 1]), ``method`` (name) and ``dice``.
        out_png: PNG to write.

    Returns:
        ``out_png``. Figure: 7 x 4.5 in.

    Raises:
        DataError: a point misses one of the three fields.
    """
    grouped: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for index, point in enumerate(points):
        if not (_is_number(point.get("labeled_fraction")) and _is_number(point.get("dice"))
                and isinstance(point.get("method"), str)):
            raise DataError(f"data_efficiency: point {index} needs numeric 'labeled_fraction' and 'dice' "
                            f"and a 'method' name; got {dict(point)}")
        grouped[point["method"]][float(point["labeled_fraction"])].append(float(point["dice"]))
    if not grouped:
        raise DataError("data_efficiency: no points to plot")

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.subplots()
    for method, by_fraction in grouped.items():
        fractions = sorted(by_fraction)
        means = [float(np.mean(by_fraction[f])) for f in fractions]
        stds = [float(np.std(by_fraction[f])) for f in fractions]
        axes.errorbar([100.0 * f for f in fractions], means, yerr=stds, marker="o", capsize=3, label=method)
    axes.set(xlabel="labelled scans (%)", ylabel="Dice", ylim=(0.0, 1.0), title="Data efficiency")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, out_png)


def bar_comparison(results: Mapping[str, Mapping[str, float | tuple[float, float]]],
                   out_png: str | Path) -> Path:
    """Grouped bars: one group per metric, one bar per method, standard deviation as error bar.

    Args:
        results: ``{method: {metric key: (mean, std)}}``; a plain number means std 0. A metric a
            method lacks leaves a gap.
        out_png: PNG to write.

    Returns:
        ``out_png``. Figure: ``max(6, 1.5 * number of metrics)`` x 4.5 in.

    Raises:
        DataError: no metric at all, or a value that is neither a number nor (mean, std).
    """
    metric_keys: list[str] = []
    for metrics in results.values():
        metric_keys += [key for key in metrics if key not in metric_keys]
    if not metric_keys:
        raise DataError("bar_comparison: no metric in any method")

    figure = Figure(figsize=(max(6.0, 1.5 * len(metric_keys)), 4.5), layout="constrained")
    axes = figure.subplots()
    bar_width = 0.8 / len(results)
    positions = np.arange(len(metric_keys))
    for index, (method, metrics) in enumerate(results.items()):
        means, stds = zip(*(_mean_and_std(method, key, metrics.get(key)) for key in metric_keys))
        axes.bar(positions + (index - (len(results) - 1) / 2) * bar_width, means, bar_width,
                 yerr=stds, capsize=3, label=method)
    axes.set_xticks(positions, [metric_label(key) for key in metric_keys], rotation=20, ha="right",
                    fontsize="small")
    if all(key.startswith("dice") for key in metric_keys):
        axes.set(ylabel="Dice", ylim=(0.0, 1.05))
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, out_png)


def _save(figure: Figure, out_png: str | Path) -> Path:
    """Render with Agg and write the PNG atomically."""
    out_png = Path(out_png)
    FigureCanvasAgg(figure)  # attaches itself as the figure's canvas
    with atomic_path(out_png) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return out_png


def _draw_slice(axes: Axes, image_slice: np.ndarray, label_slice: np.ndarray | None) -> None:
    """One windowed grey MRI slice ``(X, Y)`` with, if given, the labels ``(X, Y)`` of that slice."""
    low, high = _window(image_slice)
    axes.imshow(image_slice.T, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
    if label_slice is not None:
        axes.imshow(_label_rgba(label_slice).transpose(1, 0, 2), origin="lower", interpolation="nearest")
    axes.set_axis_off()


def _draw_uncertainty(figure: Figure, axes: Axes, flair_slice: np.ndarray, uncertainty_slice: np.ndarray) -> None:
    low, high = _window(flair_slice)
    axes.imshow(flair_slice.T, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
    shown = np.ma.masked_less(uncertainty_slice.T, _UNCERTAINTY_SHOWN_FROM)
    heat = axes.imshow(shown, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.8, origin="lower",
                       interpolation="nearest")
    figure.colorbar(heat, ax=axes, fraction=0.046, pad=0.02, label="uncertainty")
    axes.set_title("FLAIR + uncertainty", fontsize="medium")
    axes.set_axis_off()


def _label_rgba(label_slice: np.ndarray) -> np.ndarray:
    """``(X, Y)`` internal labels -> ``(X, Y, 4)`` RGBA, transparent where there is no tumour."""
    palette = np.zeros((4, 4), dtype=np.float32)
    for label, colour in LABEL_COLOURS.items():
        palette[label] = (*colour, OVERLAY_ALPHA)
    return palette[label_slice.astype(np.int64)]


def _window(image_slice: np.ndarray) -> tuple[float, float]:
    """Display range: percentiles of the non-zero (brain) voxels, so background does not skew it."""
    values = image_slice[image_slice != 0]
    if values.size == 0:
        values = image_slice.ravel()
    low, high = (float(v) for v in np.percentile(values, _WINDOW_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def _choose_slice(image: np.ndarray, pred: np.ndarray | None, ref: np.ndarray | None,
                  uncertainty: np.ndarray | None) -> int:
    for labels in (ref, pred):
        if labels is not None and labels.any():
            return tumour_slice_index(labels)
    if uncertainty is not None and uncertainty.any():
        return int(np.argmax(uncertainty.sum(axis=(0, 1))))
    brain_per_slice = (image != 0).any(axis=0).sum(axis=(0, 1))
    return int(np.argmax(brain_per_slice)) if brain_per_slice.any() else image.shape[3] // 2


def _check_label_map(labels: Any, field: str, spatial_shape: tuple[int, ...]) -> np.ndarray | None:
    if labels is None:
        return None
    labels = _as_numpy(labels)
    if labels.shape != spatial_shape:
        raise DataError(f"segmentation_overlay: {field} has shape {labels.shape}, "
                        f"expected the image's spatial shape {spatial_shape}")
    if not np.isin(labels, (0, 1, 2, 3)).all():
        raise DataError(f"segmentation_overlay: {field} has labels {np.unique(labels).tolist()}; "
                        "expected internal labels 0..3")
    return labels.astype(np.int64)


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _series(entries: Sequence[Mapping[str, Any]], key: str, x_key: str = "epoch") -> tuple[list[float], list[float]]:
    """The (x, value) pairs of one key where it has a finite value, sorted by x."""
    pairs = sorted((float(entry[x_key]), float(entry[key])) for entry in entries
                   if _is_number(entry.get(key)) and np.isfinite(float(entry[key])))
    return [x for x, _ in pairs], [value for _, value in pairs]


def _numeric_keys(entries: Sequence[Mapping[str, Any]], exclude: Sequence[str]) -> list[str]:
    keys: list[str] = []
    for entry in entries:
        keys += [key for key, value in entry.items()
                 if key not in keys and key not in exclude and _is_number(value)]
    return keys


def _mean_and_std(method: str, key: str, value: Any) -> tuple[float, float]:
    if value is None:
        return float("nan"), 0.0
    if _is_number(value):
        return float(value), 0.0
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value):
        return float(value[0]), float(value[1])
    raise DataError(f"bar_comparison: {method!r} {key!r} is {value!r}; expected a number or (mean, std)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
