"""Plots: each writes a PNG of the documented size; overlays paint the BraTS colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from raysemi.errors import DataError
from raysemi.evaluation.plots import (
    bar_comparison,
    data_efficiency,
    learning_curves,
    segmentation_overlay,
    stage_dice,
    tumour_slice_index,
)

SHAPE = (24, 28, 16)


def _image(seed: int = 0) -> np.ndarray:
    """(4, X, Y, Z) noisy ellipsoid 'brain', zero outside, like a z-scored, cropped BraTS case."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    brain = x**2 + y**2 + z**2 < 0.9
    noise = np.random.default_rng(seed).normal(1.0, 0.2, size=(4, *SHAPE))
    return (noise * brain).astype(np.float32)


def _tumour(z_slices: slice = slice(6, 10)) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[6:18, 8:20, z_slices] = 2
    labels[9:15, 11:17, z_slices] = 3
    labels[11:13, 13:15, z_slices] = 1
    return labels


def _png_shape(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    height, width = imread(path).shape[:2]
    return height, width


def _colour_pixels(path: Path, colour: str) -> int:
    """Pixels whose colour is a blend of a grey MRI and the BraTS colour of one label."""
    rgb = imread(path)[..., :3]
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if colour == "yellow":  # ET: red and green raised together over grey, blue not
        return int(np.sum((red - blue > 0.3) & (np.abs(red - green) < 0.05)))
    if colour == "red":  # NCR/NET
        return int(np.sum((red - green > 0.3) & (np.abs(green - blue) < 0.05)))
    return int(np.sum((green - red > 0.3) & (np.abs(red - blue) < 0.05)))  # green: ED


def test_tumour_slice_index_picks_the_slice_with_most_tumour() -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:4, 2:4, 3] = 2        # 4 voxels
    labels[2:5, 2:5, 11] = 1       # 9 voxels
    labels[10:12, 10:13, 7] = 3    # 6 voxels

    assert tumour_slice_index(labels) == 11


@pytest.mark.parametrize(
    ("with_pred", "with_ref", "with_uncertainty", "expected_px"),
    [
        (True, False, False, (320, 1200)),   # 1 row x 4 columns of 3.0 x 3.2 in at 100 dpi
        (False, True, False, (320, 1200)),
        (True, True, False, (640, 1200)),    # second row: reference vs prediction
        (True, True, True, (640, 1500)),     # fifth column: uncertainty
        (False, False, True, (320, 1500)),
    ],
)
def test_segmentation_overlay_size(tmp_path: Path, with_pred, with_ref, with_uncertainty, expected_px) -> None:
    ref = _tumour()
    pred = np.roll(ref, 2, axis=0)
    uncertainty = np.random.default_rng(1).uniform(0, 1, SHAPE) * (_image()[0] != 0)

    path = segmentation_overlay(_image(), tmp_path / "overlay.png", pred=pred if with_pred else None,
                                ref=ref if with_ref else None, title="case 1",
                                uncertainty=uncertainty if with_uncertainty else None)

    assert path == tmp_path / "overlay.png"
    assert _png_shape(path) == expected_px


def test_overlay_paints_each_label_in_its_brats_colour(tmp_path: Path) -> None:
    image = _image()
    only_et = np.zeros(SHAPE, dtype=np.uint8)
    only_et[6:18, 8:20, 8] = 3
    no_tumour = np.zeros(SHAPE, dtype=np.uint8)

    with_et = segmentation_overlay(image, tmp_path / "et.png", ref=only_et, slice_index=8)
    without = segmentation_overlay(image, tmp_path / "none.png", ref=no_tumour, slice_index=8)

    # Both figures carry the same legend; only the overlay adds colour. 12 x 12 voxels in 4
    # panels of about 8 px per voxel: thousands of yellow pixels, no extra red or green.
    assert _colour_pixels(with_et, "yellow") > _colour_pixels(without, "yellow") + 2000
    assert _colour_pixels(with_et, "red") == _colour_pixels(without, "red")
    assert _colour_pixels(with_et, "green") == _colour_pixels(without, "green")


def test_overlay_shows_the_most_tumorous_slice_by_default(tmp_path: Path) -> None:
    image = _image()
    ref = _tumour(z_slices=slice(11, 12))

    automatic = segmentation_overlay(image, tmp_path / "auto.png", ref=ref)
    explicit = segmentation_overlay(image, tmp_path / "z11.png", ref=ref, slice_index=11)
    other = segmentation_overlay(image, tmp_path / "z5.png", ref=ref, slice_index=5)

    assert np.array_equal(imread(automatic), imread(explicit))
    assert not np.array_equal(imread(automatic), imread(other))


@pytest.mark.parametrize(
    ("image_shape", "labels", "slice_index", "message"),
    [
        ((3, *SHAPE), None, None, "(4, X, Y, Z)"),
        ((4, *SHAPE), np.full(SHAPE, 4, dtype=np.uint8), None, "labels [4]"),
        ((4, *SHAPE), np.zeros((8, 8, 8), dtype=np.uint8), None, "spatial shape"),
        ((4, *SHAPE), None, SHAPE[2], "slice_index"),
    ],
)
def test_overlay_rejects_bad_input(tmp_path: Path, image_shape, labels, slice_index, message) -> None:
    with pytest.raises(DataError) as raised:
        segmentation_overlay(np.ones(image_shape, dtype=np.float32), tmp_path / "bad.png", ref=labels,
                             slice_index=slice_index)
    assert message in str(raised.value)
    assert not (tmp_path / "bad.png").exists()


def _history(epochs: int = 12) -> list[dict]:
    history = []
    for epoch in range(epochs):
        entry = {"epoch": epoch, "stage": epoch // 4, "train_loss": 1.0 / (epoch + 1)}
        if epoch % 2 == 0:  # validation every other epoch
            entry.update(val_loss=1.2 / (epoch + 1), dice_region_WT=epoch / epochs, dice_region_ET=epoch / 20)
        history.append(entry)
    return history


def _pure_red_pixels(path: Path) -> int:
    rgb = imread(path)[..., :3]
    return int(np.sum((rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.15) & (rgb[..., 2] < 0.15)))


def test_learning_curves_size_and_stage_lines(tmp_path: Path) -> None:
    plain = learning_curves(_history(), tmp_path / "plain.png")
    staged = learning_curves(_history(), tmp_path / "staged.png", stage_boundaries=[4, 8])

    assert _png_shape(plain) == (400, 1100)  # loss and Dice panels, 5.5 x 4 in each
    assert _png_shape(staged) == (400, 1100)
    # Two dashed red lines over the 4-inch-high plots in both panels: hundreds of red pixels.
    assert _pure_red_pixels(staged) > _pure_red_pixels(plain) + 300


def test_learning_curves_adds_a_panel_for_other_metrics(tmp_path: Path) -> None:
    history = [{**entry, "learning_rate": 1e-3} for entry in _history()]

    assert _png_shape(learning_curves(history, tmp_path / "all.png")) == (400, 1650)
    assert _png_shape(learning_curves(history, tmp_path / "dice.png", keys=["dice_region_WT"])) == (400, 550)


@pytest.mark.parametrize(
    ("history", "keys", "message"),
    [
        ([{"train_loss": 1.0}], None, "entry 0 has no numeric 'epoch'"),
        (_history(), ["dice_region_TC"], "appear in no history entry"),
        ([{"epoch": 0}], None, "no metric to plot"),
    ],
)
def test_learning_curves_rejects_bad_history(tmp_path: Path, history, keys, message) -> None:
    with pytest.raises(DataError, match=message):
        learning_curves(history, tmp_path / "bad.png", keys=keys)


def test_stage_dice_size(tmp_path: Path) -> None:
    stages = [{"stage": stage, "dice_region_ET": 0.3 + 0.1 * stage, "dice_region_WT": 0.5 + 0.05 * stage,
               "dice_class_NCR_NET": 0.2 + 0.1 * stage, "val_loss": 0.5} for stage in range(1, 7)]

    assert _png_shape(stage_dice(stages, tmp_path / "stages.png")) == (450, 700)
    with pytest.raises(DataError, match="no 'dice_\\*' key"):
        stage_dice([{"stage": 1, "val_loss": 0.5}], tmp_path / "bad.png")


def test_data_efficiency_size(tmp_path: Path) -> None:
    points = [{"labeled_fraction": fraction, "method": method, "dice": dice + 0.01 * seed}
              for fraction in (0.1, 0.5, 1.0) for seed in range(2)
              for method, dice in (("supervised", 0.5 + 0.3 * fraction), ("raysemi", 0.6 + 0.25 * fraction))]

    assert _png_shape(data_efficiency(points, tmp_path / "efficiency.png")) == (450, 700)
    with pytest.raises(DataError, match="point 0"):
        data_efficiency([{"labeled_fraction": 0.1, "dice": 0.5}], tmp_path / "bad.png")


@pytest.mark.parametrize(("n_metrics", "expected_px"), [(3, (450, 600)), (5, (450, 750))])
def test_bar_comparison_size(tmp_path: Path, n_metrics: int, expected_px: tuple[int, int]) -> None:
    keys = ["dice_class_NCR_NET", "dice_class_ED", "dice_class_ET", "dice_region_TC", "dice_region_WT"][:n_metrics]
    results = {
        "teacher": {key: (0.7, 0.1) for key in keys},
        "student": {key: 0.8 for key in keys[:-1]},  # plain numbers, one metric missing
    }

    assert _png_shape(bar_comparison(results, tmp_path / "bars.png")) == expected_px
    with pytest.raises(DataError, match="'teacher' 'dice_class_ED'"):
        bar_comparison({"teacher": {"dice_class_ED": "high"}}, tmp_path / "bad.png")
