"""``raysemi evaluate`` on small masks whose Dice and HD95 are computed by hand (no Ray, no model).

Grid: 16 x 16 x 12 voxels of 1 x 1 x 2.5 mm. Two cases, BraTS labels on disk:

- ``plate``: enhancing tumour (4) as an 8 x 8 x 2 plate, z 4..5 in the reference and z 5..6 in
  the prediction (one voxel = 2.5 mm up). Overlap 64 of 128 + 128 voxels: Dice 0.5 for ET, TC and WT.
  Every voxel of a 2-voxel-thick plate is on its surface; half of the surface voxels of each plate
  lie on the other's surface (distance 0), the other half 2.5 mm away (straight up or down;
  any sideways step makes it longer), so the 95th percentile of each direction is 2.5: HD95 2.5.
  NCR/NET and ED are empty in both: Dice 1, HD95 0.
- ``cube``: edema (2) as a 4^3 cube, z 2..5 in the reference and z 3..6 in the prediction: overlap
  48 of 64 + 64, ED Dice 0.75; plus the same 2 x 4 x 4 NCR/NET block (1) in both: NCR/NET and TC
  Dice 1; WT: overlap 48 + 32 of 96 + 96, Dice 160 / 192 = 5/6. ET empty in both: Dice 1.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from raysemi.errors import DataError
from raysemi.inference.commands import evaluate, find_predictions
from tests.helpers import tiny_config
from tests.inference import mlflow_env_restored, read_csv, run_cli

SHAPE = (16, 16, 12)
AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])


def _plate(z0: int) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:12, 4:12, z0:z0 + 2] = 4
    return labels


def _cube(z0: int) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 2:6, z0:z0 + 4] = 2
    labels[10:12, 10:14, 2:6] = 1
    return labels


REFERENCES = {"plate": _plate(4), "cube": _cube(2)}
PREDICTIONS = {"plate": _plate(5), "cube": _cube(3)}

EXPECTED = {
    "plate": {"dice_region_ET": 0.5, "dice_region_TC": 0.5, "dice_region_WT": 0.5, "dice_class_NCR_NET": 1.0,
              "dice_class_ED": 1.0, "dice_class_ET": 0.5, "hd95_region_ET": 2.5, "hd95_region_WT": 2.5,
              "hd95_class_ED": 0.0, "dice_mean_classes": 2.5 / 3},
    "cube": {"dice_region_ET": 1.0, "dice_region_TC": 1.0, "dice_region_WT": 5 / 6, "dice_class_NCR_NET": 1.0,
             "dice_class_ED": 0.75, "dice_class_ET": 1.0, "hd95_class_NCR_NET": 0.0, "hd95_region_ET": 0.0},
}


def _save(labels: np.ndarray, affine: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(labels, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _flip_x(labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored with the x axis reversed (LAS instead of RAS): same world grid."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, labels.shape[0] - 1
    return labels[::-1].copy(), affine @ flip


@pytest.fixture
def reference_root(tmp_path):
    root = tmp_path / "ref"
    for case_id, labels in REFERENCES.items():
        image = np.ones(SHAPE, np.float32)
        for modality in ("t1", "t1ce", "t2", "flair"):
            _save(image, AFFINE, root / case_id / f"{case_id}_{modality}.nii.gz")
        _save(labels, AFFINE, root / case_id / f"{case_id}_seg.nii.gz")
    return root


@pytest.fixture
def prediction_root(tmp_path):
    """Predict's layout; the cube case is stored x-flipped (LAS) to check RAS alignment."""
    root = tmp_path / "pred"
    _save(PREDICTIONS["plate"], AFFINE, root / "plate" / "plate_seg.nii.gz")
    _save(*_flip_x(PREDICTIONS["cube"], AFFINE), root / "cube" / "cube_seg.nii.gz")
    _save(np.zeros(SHAPE, np.float32), AFFINE, root / "cube" / "cube_uncertainty.nii.gz")
    return root


def test_metrics_match_hand_computed_values(reference_root, prediction_root, tmp_path):
    evaluation = evaluate(prediction_root, reference_root, tmp_path / "report")
    rows = {row["case_id"]: row for row in evaluation.rows}
    assert sorted(rows) == ["cube", "plate"]
    for case_id, expected in EXPECTED.items():
        for key, value in expected.items():
            assert rows[case_id][key] == pytest.approx(value, abs=1e-6), (case_id, key)
    # Summary over the two cases: ET region Dice 0.5 and 1.0.
    assert evaluation.summary["mean"]["dice_region_ET"] == pytest.approx(0.75)
    assert evaluation.summary["median"]["dice_region_ET"] == pytest.approx(0.75)
    assert evaluation.summary["std"]["dice_region_ET"] == pytest.approx(0.25)


def test_reports_are_written(reference_root, prediction_root, tmp_path):
    status, stdout = run_cli(["evaluate", "--pred", str(prediction_root), "--ref", str(reference_root)])
    assert status == 0
    report = prediction_root / "evaluation"
    csv_rows = {row["case_id"]: row for row in read_csv(report / "evaluation.csv")}
    assert float(csv_rows["plate"]["dice_region_WT"]) == pytest.approx(0.5)
    assert float(csv_rows["mean"]["dice_class_ED"]) == pytest.approx((1.0 + 0.75) / 2)
    summary = json.loads((report / "evaluation.json").read_text())["summary"]
    assert summary["mean"]["hd95_region_ET"] == pytest.approx(2.5 / 2)
    assert "WT region" in (report / "evaluation.md").read_text()
    assert "dice_region_WT" in stdout


def test_mismatched_case_ids_are_named(reference_root, prediction_root):
    (prediction_root / "cube" / "cube_seg.nii.gz").rename(prediction_root / "extra_seg.nii.gz")
    with pytest.raises(DataError) as error:
        evaluate(prediction_root, reference_root)
    message = str(error.value)
    assert "only in predictions" in message and "['extra']" in message
    assert "only in references" in message and "['cube']" in message


def test_grid_mismatch_names_the_case(reference_root, prediction_root):
    _save(np.zeros((16, 16, 10), np.uint8), AFFINE, prediction_root / "plate" / "plate_seg.nii.gz")
    with pytest.raises(DataError, match=r"case plate: .*shape \(16, 16, 10\)"):
        evaluate(prediction_root, reference_root)


def test_affine_mismatch_names_the_case(reference_root, prediction_root):
    shifted = AFFINE.copy()
    shifted[2, 3] = 2.5  # one slice further up: same shape, different grid
    _save(PREDICTIONS["plate"], shifted, prediction_root / "plate" / "plate_seg.nii.gz")
    with pytest.raises(DataError, match="case plate: .*affine"):
        evaluate(prediction_root, reference_root)


def test_non_brats_labels_name_the_file(reference_root, prediction_root):
    bad = PREDICTIONS["plate"].copy()
    bad[0, 0, 0] = 3
    _save(bad, AFFINE, prediction_root / "plate" / "plate_seg.nii.gz")
    with pytest.raises(DataError, match=r"case plate: .*plate_seg.nii.gz: .*\[3\]"):
        evaluate(prediction_root, reference_root)


@pytest.mark.parametrize("name", ["cube_seg.nii.gz", "cube.nii.gz", "cube_seg.nii"])
def test_flat_prediction_files_are_found(tmp_path, name):
    _save(PREDICTIONS["cube"], AFFINE, tmp_path / name)
    _save(PREDICTIONS["cube"], AFFINE, tmp_path / "cube_uncertainty.nii.gz")  # ignored
    (tmp_path / "predictions.csv").write_text("case_id\n")  # ignored
    assert find_predictions(tmp_path) == {"cube": tmp_path / name}


def test_two_predictions_for_one_case_are_an_error(tmp_path):
    _save(PREDICTIONS["cube"], AFFINE, tmp_path / "cube.nii.gz")
    _save(PREDICTIONS["cube"], AFFINE, tmp_path / "cube_seg.nii.gz")
    with pytest.raises(DataError, match="'cube' has two predictions"):
        find_predictions(tmp_path)


def test_worker_processes_give_the_same_rows(reference_root, prediction_root, tmp_path):
    single = evaluate(prediction_root, reference_root, tmp_path / "one")
    parallel = evaluate(prediction_root, reference_root, tmp_path / "two", workers=2)
    assert parallel.rows == single.rows


def test_mlflow_run_holds_the_summary_and_reports(reference_root, prediction_root, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, tmp_path, tracking={"experiment": "raysemi-evaluate-test"})
    with mlflow_env_restored():
        status, stdout = run_cli(["evaluate", "--pred", str(prediction_root), "--ref", str(reference_root),
                                  "--mlflow", "--set", f"tracking.uri={cfg.tracking.uri}",
                                  "--set", "tracking.experiment=raysemi-evaluate-test"])
    assert status == 0
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name("raysemi-evaluate-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id in stdout
    assert run.data.metrics["dice_region_ET_mean"] == pytest.approx(0.75)
    assert run.data.metrics["hd95_region_ET_median"] == pytest.approx(2.5 / 2)
    assert run.data.metrics["cases"] == 2
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/evaluation.csv", "evaluation/evaluation.json", "evaluation/evaluation.md"}
