"""BraTS metrics: Dice and HD95 per tumour region and per label class, built on MONAI.

Structures (internal labels 0 background, 1 NCR/NET, 2 ED, 3 ET):

- regions, as BraTS ranks them: ``ET = {3}``, ``TC = {1, 3}``, ``WT = {1, 2, 3}``;
- classes, as the paper reports them: ``NCR_NET = {1}``, ``ED = {2}``, ``ET = {3}``.

The ET region and the ET class are the same voxels; both keys exist so that a region table and
a class table are each complete.

Metric keys (valid MLflow keys and CSV column names, no slashes)::

    dice_region_ET  dice_region_TC  dice_region_WT  dice_class_NCR_NET  dice_class_ED  dice_class_ET
    hd95_region_ET  hd95_region_TC  hd95_region_WT  hd95_class_NCR_NET  hd95_class_ED  hd95_class_ET
    dice_mean_regions (mean of the three region Dice)   dice_mean_classes (mean of the three class Dice)

Empty masks follow the BraTS convention, so no metric is ever NaN:

- both prediction and reference empty: Dice 1, HD95 0;
- exactly one of them empty: Dice 0, HD95 :data:`HD95_EMPTY` (373.13 mm, the diagonal of the
  240 x 240 x 155 BraTS grid at 1 mm).

Dice is MONAI's ``DiceMetric(include_background=True, ignore_empty=False)`` on one binary channel
per structure; with ``ignore_empty=False`` MONAI itself returns 1 for two empty masks and 0 when
only one is empty, which is the BraTS convention.

HD95 is MONAI's ``HausdorffDistanceMetric(percentile=95, include_background=True)``, called only
when both masks are non-empty. Definition (monai 1.6.1, ``compute_hausdorff_distance``): the
surface of a mask is its voxels removed by a binary erosion (6-connected); for every surface voxel
of one mask MONAI takes the Euclidean distance in mm (``spacing=`` passed to the metric's call) to
the nearest surface voxel of the other mask; it takes the 95th percentile of each of the two
directed distance sets (``torch.quantile``, linear interpolation) and returns the **larger** of
the two. MedPy and panoptica instead pool both directions before the percentile, which gives
values lower or equal; compare HD95 across tools with that in mind.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from raysemi.errors import DataError

REGIONS: dict[str, tuple[int, ...]] = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
"""BraTS evaluation regions as sets of internal labels."""

CLASSES: dict[str, tuple[int, ...]] = {"NCR_NET": (1,), "ED": (2,), "ET": (3,)}
"""Label classes (the paper's per-class Dice) as sets of internal labels."""

# One binary channel per structure, in this order, everywhere in this module.
STRUCTURES: dict[str, tuple[int, ...]] = {
    **{f"region_{name}": labels for name, labels in REGIONS.items()},
    **{f"class_{name}": labels for name, labels in CLASSES.items()},
}
"""Structure name (``region_ET``, ..., ``class_ET``) -> internal labels it is made of."""

HD95_EMPTY = 373.13
"""HD95 in mm when exactly one of prediction and reference is empty (BraTS convention)."""

DICE_KEYS: tuple[str, ...] = (
    *(f"dice_{name}" for name in STRUCTURES), "dice_mean_regions", "dice_mean_classes",
)
HD95_KEYS: tuple[str, ...] = tuple(f"hd95_{name}" for name in STRUCTURES)
METRIC_KEYS: tuple[str, ...] = DICE_KEYS + HD95_KEYS
"""Every key :func:`brats_metrics` returns (the HD95 keys only with ``include_hd95=True``)."""

_STRUCTURE_LABELS = {
    "region_ET": "ET region",
    "region_TC": "TC region",
    "region_WT": "WT region",
    "class_NCR_NET": "NCR/NET class",
    "class_ED": "ED class",
    "class_ET": "ET class",
}

_SUMMARY_STATISTICS = ("mean", "median", "std", "n")


def metric_label(key: str) -> str:
    """A short human label for a metric key, for table rows and plot legends.

    ``dice_region_TC`` -> ``"Dice TC region"``, ``hd95_class_ED`` -> ``"HD95 ED class (mm)"``,
    ``dice_mean_regions`` -> ``"Dice mean of regions"``. Unknown keys come back unchanged.
    """
    if key == "dice_mean_regions":
        return "Dice mean of regions"
    if key == "dice_mean_classes":
        return "Dice mean of classes"
    prefix, _, structure = key.partition("_")
    if structure in _STRUCTURE_LABELS and prefix == "dice":
        return f"Dice {_STRUCTURE_LABELS[structure]}"
    if structure in _STRUCTURE_LABELS and prefix == "hd95":
        return f"HD95 {_STRUCTURE_LABELS[structure]} (mm)"
    return key


def structure_masks(labels: torch.Tensor) -> torch.Tensor:
    """Binary masks of the six structures from an internal label map.

    Args:
        labels: internal labels 0..3, shape ``(X, Y, Z)`` or ``(B, X, Y, Z)``.

    Returns:
        bool tensor ``(6, X, Y, Z)`` or ``(B, 6, X, Y, Z)``, channels in :data:`STRUCTURES` order
        (region ET, TC, WT, class NCR/NET, ED, ET), on the device of ``labels``.
    """
    channel_dim = labels.ndim - 3
    masks = [
        torch.isin(labels, torch.tensor(members, dtype=labels.dtype, device=labels.device))
        for members in STRUCTURES.values()
    ]
    return torch.stack(masks, dim=channel_dim)


def brats_metrics(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    include_hd95: bool = True,
    case_id: str = "",
) -> dict[str, float]:
    """Dice and HD95 of one case for every region and class, with BraTS empty-mask conventions.

    Args:
        pred: predicted internal labels 0..3, shape ``(X, Y, Z)``.
        ref: reference internal labels 0..3, same shape.
        spacing: voxel size in mm along X, Y, Z (HD95 is in mm).
        include_hd95: compute the HD95 keys too (they cost far more than Dice).
        case_id: names the case in error messages only.

    Returns:
        ``{key: value}`` with the keys of :data:`DICE_KEYS` and, with ``include_hd95``, of
        :data:`HD95_KEYS` (see the module docstring for definitions).

    Raises:
        DataError: shapes differ, are not 3D, or labels are outside 0..3 (e.g. on-disk label 4).
    """
    pred_labels = _as_label_map(pred, "pred", case_id, spatial_only=True)
    ref_labels = _as_label_map(ref, "ref", case_id, spatial_only=True)
    _check_same_shape(pred_labels, ref_labels, case_id)
    spacing_mm = _as_spacing(spacing, case_id)

    # (1, 6, X, Y, Z): batch of one case, one binary channel per structure.
    pred_masks = structure_masks(pred_labels.cpu())[None]
    ref_masks = structure_masks(ref_labels.cpu())[None]
    metrics = _dice_from_masks(pred_masks, ref_masks)[0]
    result = _dice_dict(metrics)
    if include_hd95:
        hd95 = _hd95_from_masks(pred_masks[0], ref_masks[0], spacing_mm)
        result.update({f"hd95_{name}": value for name, value in zip(STRUCTURES, hd95)})
    return result


def dice_per_region(pred_labels: torch.Tensor, ref_labels: torch.Tensor) -> dict[str, float]:
    """Dice of every region and class (no HD95), cheap enough for per-epoch validation.

    Runs in torch on the tensors' device (GPU stays on GPU). Same empty-mask convention as
    :func:`brats_metrics`: both empty -> 1, exactly one empty -> 0.

    Args:
        pred_labels: predicted internal labels 0..3, ``(X, Y, Z)`` or ``(B, X, Y, Z)``.
        ref_labels: reference internal labels 0..3, same shape.

    Returns:
        ``{key: value}`` for the keys of :data:`DICE_KEYS`; with a batch, each value is the mean
        over the batch of the per-case Dice (not a Dice of the pooled voxels).

    Raises:
        DataError: shapes differ or labels are outside 0..3.
    """
    pred = _as_label_map(pred_labels, "pred_labels", "", spatial_only=False)
    ref = _as_label_map(ref_labels, "ref_labels", "", spatial_only=False)
    _check_same_shape(pred, ref, "")
    if pred.ndim == 3:
        pred, ref = pred[None], ref[None]
    per_case = _dice_from_masks(structure_masks(pred), structure_masks(ref))  # (B, 6)
    return _dice_dict(per_case.mean(dim=0))


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, median, standard deviation and count of every numeric metric over cases.

    A metric key is any key with a numeric value (bool excluded) in at least one row; other
    fields (``case_id``, a site name) are left out. A row without that key, or with ``None``
    or NaN there, does not count for that key: statistics ignore NaN (``np.nanmean`` and co.),
    and ``n`` says how many cases each statistic is over. ``std`` is the population standard
    deviation (numpy's ``ddof=0``), so one case gives 0. A key with no value at all gives NaN.

    Args:
        rows: one mapping per case, e.g. ``{"case_id": "BraTS2021_00000", "dice_region_ET": 0.8}``.

    Returns:
        ``{"mean": {key: v}, "median": {key: v}, "std": {key: v}, "n": {key: count}}``, keys in
        order of first appearance.

    Raises:
        DataError: a metric column holds a non-numeric value (names the case and the key).
    """
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in keys and _is_number(value):
                keys.append(key)
    summary: dict[str, dict[str, float]] = {name: {} for name in _SUMMARY_STATISTICS}
    for key in keys:
        values = np.array([_metric_value(row, key) for row in rows], dtype=np.float64)
        finite = values[~np.isnan(values)]
        summary["n"][key] = int(finite.size)
        if finite.size == 0:
            for name in ("mean", "median", "std"):
                summary[name][key] = math.nan
            continue
        summary["mean"][key] = float(np.mean(finite))
        summary["median"][key] = float(np.median(finite))
        summary["std"][key] = float(np.std(finite))
    return summary


def _dice_from_masks(pred_masks: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
    """MONAI Dice per case and structure: ``(B, 6, X, Y, Z)`` bool masks -> ``(B, 6)`` float."""
    # ignore_empty=False: MONAI returns 1 when both are empty and 0 when only one is (BraTS).
    # A fresh metric per call: DiceMetric accumulates every call into a buffer otherwise.
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return dice_metric(pred_masks, ref_masks).float()


def _dice_dict(dice_per_structure: torch.Tensor) -> dict[str, float]:
    """``(6,)`` Dice in STRUCTURES order -> the DICE_KEYS dict, with the two means."""
    values = [float(value) for value in dice_per_structure.cpu()]
    result = {f"dice_{name}": value for name, value in zip(STRUCTURES, values)}
    result["dice_mean_regions"] = float(np.mean(values[: len(REGIONS)]))
    result["dice_mean_classes"] = float(np.mean(values[len(REGIONS):]))
    return result


def _hd95_from_masks(pred_masks: torch.Tensor, ref_masks: torch.Tensor,
                     spacing_mm: tuple[float, float, float]) -> list[float]:
    """HD95 in mm per structure from ``(6, X, Y, Z)`` bool masks, BraTS convention for empties."""
    pred_any = pred_masks.flatten(1).any(dim=1).tolist()
    ref_any = ref_masks.flatten(1).any(dim=1).tolist()
    both = [index for index, (p, r) in enumerate(zip(pred_any, ref_any)) if p and r]
    hd95 = [0.0 if not (p or r) else HD95_EMPTY for p, r in zip(pred_any, ref_any)]
    if both:
        # Only structures present in both masks reach MONAI: it returns inf or NaN otherwise.
        hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        with warnings.catch_warnings():
            # MONAI 1.6 passes its own deprecated `always_return_as_numpy` internally, once per
            # structure and case; the warning is about MONAI's code, not ours.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            values = hd_metric(pred_masks[both][None].float(), ref_masks[both][None].float(),
                               spacing=spacing_mm)[0]
        for index, value in zip(both, values.tolist()):
            hd95[index] = float(value)
    return hd95


def _as_label_map(labels: Any, field: str, case_id: str, spatial_only: bool) -> torch.Tensor:
    """Check an internal label map (values 0..3) and return it as an integer tensor."""
    where = f"case {case_id!r}: " if case_id else ""
    if not isinstance(labels, (np.ndarray, torch.Tensor)):
        raise DataError(f"{where}{field} must be a numpy array or torch tensor of labels, "
                        f"got {type(labels).__name__}")
    tensor = torch.as_tensor(labels)
    allowed_ndim = (3,) if spatial_only else (3, 4)
    if tensor.ndim not in allowed_ndim:
        expected = "(X, Y, Z)" if spatial_only else "(X, Y, Z) or (B, X, Y, Z)"
        raise DataError(f"{where}{field} must have shape {expected}, got {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool:
        raise DataError(f"{where}{field} is a bool mask; expected a label map with values 0..3")
    if tensor.numel() == 0:
        raise DataError(f"{where}{field} is empty (shape {tuple(tensor.shape)})")
    if tensor.is_floating_point():
        if not bool(torch.all(tensor == torch.round(tensor))):
            raise DataError(f"{where}{field} holds non-integer values; expected labels 0..3")
        tensor = tensor.to(torch.int64)
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0 or high > 3:
        hint = " (on-disk BraTS labels 0/1/2/4 must be mapped to 0..3 first)" if high == 4 else ""
        raise DataError(f"{where}{field} has labels in [{low}, {high}]; expected internal labels 0..3{hint}")
    return tensor


def _check_same_shape(pred: torch.Tensor, ref: torch.Tensor, case_id: str) -> None:
    if pred.shape != ref.shape:
        where = f"case {case_id!r}: " if case_id else ""
        raise DataError(f"{where}prediction shape {tuple(pred.shape)} differs from reference "
                        f"shape {tuple(ref.shape)}")


def _as_spacing(spacing: Sequence[float], case_id: str) -> tuple[float, float, float]:
    # MONAI's prepare_spacing rejects a tuple mixing int and float, so make them all float.
    values = tuple(float(value) for value in spacing)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        where = f"case {case_id!r}: " if case_id else ""
        raise DataError(f"{where}spacing must be three positive voxel sizes in mm, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _metric_value(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    if value is None:
        return math.nan
    if not _is_number(value):
        raise DataError(f"case {row.get('case_id', '?')!r}: metric {key!r} is {value!r}; expected a number")
    return float(value)
