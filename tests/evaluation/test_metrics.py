"""BraTS metrics: hand-computed Dice/HD95, empty-mask conventions, and scipy/numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from raysemi.errors import DataError
from raysemi.evaluation.metrics import (
    DICE_KEYS,
    HD95_EMPTY,
    HD95_KEYS,
    METRIC_KEYS,
    STRUCTURES,
    brats_metrics,
    dice_per_region,
    structure_masks,
    summarise,
)

ANISOTROPIC = (1.0, 1.0, 2.5)


def _cube_pair(shift_axis: int, label: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4x4 cube of ``label`` and the same cube shifted by one voxel along ``shift_axis``."""
    ref = np.zeros((16, 16, 16), dtype=np.uint8)
    ref[4:8, 4:8, 4:8] = label
    pred = np.roll(ref, 1, axis=shift_axis)
    return pred, ref


@pytest.mark.parametrize(("shift_axis", "expected_hd95"), [(2, 2.5), (0, 1.0), (1, 1.0)])
def test_shifted_cube_dice_and_hd95_in_mm(shift_axis: int, expected_hd95: float) -> None:
    pred, ref = _cube_pair(shift_axis)

    metrics = brats_metrics(pred, ref, spacing=ANISOTROPIC)

    # Overlap 4*4*3 = 48 voxels of 64 each: Dice = 2*48/128. ET = TC = WT = the cube.
    for key in ("dice_region_ET", "dice_region_TC", "dice_region_WT", "dice_class_ET"):
        assert metrics[key] == pytest.approx(0.75)
    # The face left behind lies one voxel from the shifted cube's face: one voxel size along the
    # shift axis (2.5 mm along Z, 1 mm along X or Y); 16 of 56 surface voxels, above the 5 % tail.
    for key in ("hd95_region_ET", "hd95_region_TC", "hd95_region_WT", "hd95_class_ET"):
        assert metrics[key] == pytest.approx(expected_hd95)
    # NCR/NET and ED are empty in both: BraTS gives Dice 1, HD95 0.
    for name in ("NCR_NET", "ED"):
        assert metrics[f"dice_class_{name}"] == 1.0
        assert metrics[f"hd95_class_{name}"] == 0.0
    assert metrics["dice_mean_regions"] == pytest.approx(0.75)
    assert metrics["dice_mean_classes"] == pytest.approx((1.0 + 1.0 + 0.75) / 3)


def test_regions_are_composed_from_labels() -> None:
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    ref[2:4, 2:4, 2:4] = 1   # 8 NCR/NET voxels
    ref[5:9, 2:4, 2:4] = 2   # 16 ED voxels
    ref[2:4, 6:8, 2:4] = 3   # 8 ET voxels
    pred = ref.copy()
    pred[pred == 1] = 3      # NCR/NET predicted as ET

    metrics = brats_metrics(pred, ref, include_hd95=False)

    # ET: pred 16 voxels, ref 8, overlap 8 -> 16/24. TC and WT keep the same voxels -> 1.
    expected = {
        "dice_region_ET": 2 * 8 / 24,
        "dice_region_TC": 1.0,
        "dice_region_WT": 1.0,
        "dice_class_NCR_NET": 0.0,  # reference has NCR/NET, prediction has none
        "dice_class_ED": 1.0,
        "dice_class_ET": 2 * 8 / 24,
        "dice_mean_regions": (2 / 3 + 1 + 1) / 3,
        "dice_mean_classes": (0 + 1 + 2 / 3) / 3,
    }
    assert set(metrics) == set(DICE_KEYS)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_structure_masks_follow_brats_regions() -> None:
    labels = torch.tensor([0, 1, 2, 3]).reshape(4, 1, 1)

    masks = structure_masks(labels)

    # Channels: region ET, TC, WT, class NCR/NET, ED, ET; rows: labels 0, 1, 2, 3.
    expected = torch.tensor([
        [0, 0, 0, 1],
        [0, 1, 0, 1],
        [0, 1, 1, 1],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
    ], dtype=torch.bool)
    assert masks.shape == (6, 4, 1, 1)
    assert torch.equal(masks[:, :, 0, 0], expected)
    assert list(STRUCTURES) == ["region_ET", "region_TC", "region_WT", "class_NCR_NET", "class_ED", "class_ET"]


def test_both_empty_gives_dice_one_and_hd95_zero() -> None:
    empty = np.zeros((8, 8, 8), dtype=np.uint8)

    metrics = brats_metrics(empty, empty.copy(), spacing=ANISOTROPIC)

    assert set(metrics) == set(METRIC_KEYS)
    assert all(metrics[key] == 1.0 for key in DICE_KEYS)
    assert all(metrics[key] == 0.0 for key in HD95_KEYS)


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_exactly_one_empty_gives_dice_zero_and_hd95_diagonal(empty_side: str) -> None:
    tumour = np.zeros((8, 8, 8), dtype=np.uint8)
    tumour[2:5, 2:5, 2:5] = 3
    empty = np.zeros_like(tumour)
    pred, ref = (empty, tumour) if empty_side == "pred" else (tumour, empty)

    metrics = brats_metrics(pred, ref)

    for key in ("region_ET", "region_TC", "region_WT", "class_ET"):
        assert metrics[f"dice_{key}"] == 0.0
        assert metrics[f"hd95_{key}"] == HD95_EMPTY == 373.13
    for key in ("class_NCR_NET", "class_ED"):  # empty on both sides
        assert metrics[f"dice_{key}"] == 1.0
        assert metrics[f"hd95_{key}"] == 0.0


def _blob(shape: tuple[int, int, int], seed: int, threshold: float) -> np.ndarray:
    """An irregular smooth blob kept away from the border (MONAI and scipy treat borders alike then)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma=2.5)
    blob = field > threshold
    inner = np.zeros(shape, dtype=bool)
    inner[3:-3, 3:-3, 3:-3] = True
    return blob & inner


def _reference_hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Independent HD95: surfaces by erosion, distances by scipy's EDT, max of the two directed 95th pct."""
    pred_surface = pred & ~ndimage.binary_erosion(pred)
    ref_surface = ref & ~ndimage.binary_erosion(ref)
    pred_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    ref_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))


def _reference_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return 2 * np.logical_and(pred, ref).sum() / (pred.sum() + ref.sum())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.2, 2.5)])
def test_matches_scipy_reference_on_irregular_masks(spacing: tuple[float, float, float]) -> None:
    shape = (32, 28, 24)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[_blob(shape, seed=1, threshold=0.0)] = 2
    ref[_blob(shape, seed=3, threshold=0.02) & (ref == 2)] = 3
    ref[_blob(shape, seed=2, threshold=0.05) & (ref > 0)] = 1
    # The prediction: the same fields at other thresholds plus a false-positive blob, so that
    # every structure overlaps the reference partly (Dice about 0.4-0.7, HD95 5-12 mm).
    pred = np.zeros(shape, dtype=np.uint8)
    pred[_blob(shape, seed=1, threshold=0.01) | _blob(shape, seed=4, threshold=0.05)] = 2
    pred[_blob(shape, seed=3, threshold=0.0) & (pred == 2)] = 3
    pred[_blob(shape, seed=2, threshold=0.06) & (pred > 0)] = 1

    metrics = brats_metrics(pred, ref, spacing=spacing)

    for name, members in STRUCTURES.items():
        pred_mask, ref_mask = np.isin(pred, members), np.isin(ref, members)
        # The test is about the non-empty path with partial overlap.
        assert 0.2 < _reference_dice(pred_mask, ref_mask) < 0.9, name
        assert metrics[f"dice_{name}"] == pytest.approx(_reference_dice(pred_mask, ref_mask), abs=1e-6), name
        assert metrics[f"hd95_{name}"] == pytest.approx(_reference_hd95(pred_mask, ref_mask, spacing),
                                                        rel=1e-5), name


def test_accepts_torch_and_float_label_maps() -> None:
    pred, ref = _cube_pair(shift_axis=2)

    from_torch = brats_metrics(torch.from_numpy(pred), torch.from_numpy(ref), include_hd95=False)
    from_float = brats_metrics(pred.astype(np.float64), ref.astype(np.float32), include_hd95=False)

    assert from_torch["dice_region_ET"] == pytest.approx(0.75)
    assert from_float["dice_region_ET"] == pytest.approx(0.75)


def test_dice_per_region_averages_cases_of_a_batch() -> None:
    pred, ref = _cube_pair(shift_axis=0)
    pred_batch = torch.from_numpy(np.stack([pred, ref]))  # case 0: shifted cube, case 1: perfect
    ref_batch = torch.from_numpy(np.stack([ref, ref]))

    dice = dice_per_region(pred_batch, ref_batch)

    assert set(dice) == set(DICE_KEYS)
    assert dice["dice_region_WT"] == pytest.approx((0.75 + 1.0) / 2)
    assert dice["dice_class_ED"] == 1.0  # empty in every case
    single = dice_per_region(torch.from_numpy(pred), torch.from_numpy(ref))
    assert single["dice_region_ET"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("pred_shape", "ref_shape", "bad_label", "spacing", "message"),
    [
        ((8, 8, 8), (8, 8, 8), 4, (1, 1, 1), "0/1/2/4"),
        ((8, 8, 8), (8, 8, 7), None, (1, 1, 1), "differs from reference"),
        ((8, 8), (8, 8), None, (1, 1, 1), "(X, Y, Z)"),
        ((8, 8, 8), (8, 8, 8), None, (1, 0, 1), "spacing"),
        ((8, 8, 8), (8, 8, 8), -1, (1, 1, 1), "expected internal labels 0..3"),
    ],
)
def test_bad_input_raises_data_error_naming_the_case(pred_shape, ref_shape, bad_label, spacing, message) -> None:
    pred = np.zeros(pred_shape, dtype=np.int16)
    ref = np.zeros(ref_shape, dtype=np.int16)
    if bad_label is not None:
        pred.flat[0] = bad_label

    with pytest.raises(DataError) as raised:
        brats_metrics(pred, ref, spacing=spacing, case_id="BraTS2021_00042")

    assert message in str(raised.value)
    assert "BraTS2021_00042" in str(raised.value)


def test_summarise_matches_numpy_and_ignores_nan_and_missing() -> None:
    rows = [
        {"case_id": "a", "site": "A", "dice_region_ET": 0.5, "hd95_region_ET": 3.0},
        {"case_id": "b", "site": "B", "dice_region_ET": 0.7, "hd95_region_ET": math.nan},
        {"case_id": "c", "site": "B", "dice_region_ET": np.float32(0.9)},
        {"case_id": "d", "site": "A", "dice_region_ET": 1.0, "hd95_region_ET": 5.0},
    ]

    summary = summarise(rows)

    dice = np.array([0.5, 0.7, 0.9, 1.0])
    hd95 = np.array([3.0, 5.0])
    assert set(summary) == {"mean", "median", "std", "n"}
    assert list(summary["mean"]) == ["dice_region_ET", "hd95_region_ET"]  # no case_id, no site
    assert summary["mean"]["dice_region_ET"] == pytest.approx(dice.mean())
    assert summary["median"]["dice_region_ET"] == pytest.approx(np.median(dice))
    assert summary["std"]["dice_region_ET"] == pytest.approx(np.std(dice))
    assert summary["n"]["dice_region_ET"] == 4
    assert summary["mean"]["hd95_region_ET"] == pytest.approx(4.0)
    assert summary["std"]["hd95_region_ET"] == pytest.approx(np.std(hd95))
    assert summary["n"]["hd95_region_ET"] == 2


def test_summarise_rejects_text_in_a_metric_column() -> None:
    rows = [{"case_id": "a", "dice_region_ET": 0.5}, {"case_id": "b", "dice_region_ET": "high"}]

    with pytest.raises(DataError, match="case 'b'.*dice_region_ET"):
        summarise(rows)
