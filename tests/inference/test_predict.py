"""``raysemi predict`` end to end: one batch-inference run (real local Ray, real NIfTI, a model
registered in a temporary MLflow store) shared by the tests of this module."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from raysemi.errors import DataError, RaysemiError
from raysemi.inference.commands import inference_config, model_checkpoint
from tests.helpers import tiny_config
from tests.inference import (
    make_checkpoint,
    mlflow_env_restored,
    read_case_arrays,
    read_csv,
    run_cli,
    synth_case,
    write_case,
)

REGISTERED_NAME = "raysemi-predict-test"

# Left-Posterior-Superior voxel axes, anisotropic voxels (1.2 x 1.0 x 2.5 mm), non-cubic grid.
LPS_AFFINE = np.array([
    [-1.2, 0.0, 0.0, 30.0],
    [0.0, -1.0, 0.0, 20.0],
    [0.0, 0.0, 2.5, -35.0],
    [0.0, 0.0, 0.0, 1.0],
])
LPS_SHAPE = (40, 36, 28)


def _box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box (start, end exclusive) of a 3D boolean mask, in the array's own voxel order."""
    coords = np.argwhere(mask)
    return tuple(coords.min(axis=0)), tuple(coords.max(axis=0) + 1)


@pytest.fixture(scope="module")
def predicted(ray_cluster, tmp_path_factory):
    from raysemi import tracking
    from raysemi.train.checkpoint import load_model

    root = tmp_path_factory.mktemp("predict")
    cases = root / "cases"
    cfg = tiny_config(cases, root / "store")
    checkpoint = make_checkpoint(root / "checkpoint", cfg)
    uri = cfg.tracking_uri()
    model, _ = load_model(checkpoint)
    with mlflow_env_restored():
        run_id = tracking.create_run(uri, cfg.tracking.experiment, "register-test-model")
        example = np.zeros((1, 4, 32, 32, 32), np.float32)
        tracking.log_model(uri, run_id, model, checkpoint, example, REGISTERED_NAME, "champion")

    # A generated head re-saved as LPS with anisotropic voxels; the brain is cut off on two sides
    # so that its bounding box is not symmetric: a flipped output would miss it.
    images = read_case_arrays(synth_case(root / "source", "src", seed=3, shape=LPS_SHAPE), "src")
    images[:, 30:] = 0
    images[:, :, :6] = 0
    write_case(cases, "lps_case", images, LPS_AFFINE, qform_code=1, sform_code=2)
    synth_case(cases, "ras_case", seed=4, labeled=True)
    missing = synth_case(cases, "missing_t2", seed=5)
    (missing / "missing_t2_t2.nii.gz").unlink()

    out = root / "out"
    with mlflow_env_restored():
        status, stdout = run_cli([
            "predict", "--model", f"models:/{REGISTERED_NAME}@champion", "--input", str(cases), "--output", str(out),
            "--png", "--set", f"tracking.uri={uri}", "--set", "model.mc_passes=2",
        ])
    return SimpleNamespace(
        status=status, stdout=stdout, out=out, cases=cases, images=images, uri=uri, cfg=cfg, checkpoint=checkpoint
    )


def test_lps_case_keeps_the_input_grid_and_header(predicted):
    flair = nib.load(predicted.cases / "lps_case" / "lps_case_flair.nii.gz")
    seg = nib.load(predicted.out / "lps_case" / "lps_case_seg.nii.gz")
    uncertainty = nib.load(predicted.out / "lps_case" / "lps_case_uncertainty.nii.gz")
    for output in (seg, uncertainty):
        assert output.shape == LPS_SHAPE
        assert np.allclose(output.affine, LPS_AFFINE)
        assert nib.aff2axcodes(output.affine) == ("L", "P", "S")
        assert int(output.header["qform_code"]) == int(flair.header["qform_code"]) == 1
        assert int(output.header["sform_code"]) == int(flair.header["sform_code"]) == 2
        assert np.allclose(output.get_qform(), flair.get_qform())
        assert np.allclose(output.get_sform(), flair.get_sform())
        assert output.header.get_zooms()[:3] == pytest.approx((1.2, 1.0, 2.5))


def test_lps_outputs_lie_on_the_brain_in_file_voxel_order(predicted):
    brain_box = _box(np.any(predicted.images != 0, axis=0))
    assert brain_box[0] != tuple(s - e for s, e in zip(LPS_SHAPE, brain_box[1])), "test input must be asymmetric"
    seg = np.asarray(nib.load(predicted.out / "lps_case" / "lps_case_seg.nii.gz").dataobj)
    uncertainty = np.asarray(nib.load(predicted.out / "lps_case" / "lps_case_uncertainty.nii.gz").dataobj)

    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
    assert uncertainty.dtype == np.float32
    assert uncertainty.min() >= 0.0 and uncertainty.max() <= 1.0
    # Inference runs on the brain box; outside it the uncertainty is 0, inside an untrained
    # model is never certain. Compared in the file's own voxel order.
    assert _box(uncertainty > 0) == brain_box
    (x0, y0, z0), (x1, y1, z1) = brain_box
    inside = np.zeros(LPS_SHAPE, dtype=bool)
    inside[x0:x1, y0:y1, z0:z1] = True
    assert not seg[~inside].any()


def test_predictions_csv_lists_every_predicted_case(predicted):
    rows = {row["case_id"]: row for row in read_csv(predicted.out / "predictions.csv")}
    assert sorted(rows) == ["lps_case", "ras_case"]
    for case_id, row in rows.items():
        assert 0.0 <= float(row["confidence"]) <= 1.0
        seg = np.asarray(nib.load(predicted.out / row["seg_path"]).dataobj)
        assert int(row["tumour_voxels"]) == int(np.count_nonzero(seg))
        assert (predicted.out / row["uncertainty_path"]).is_file()
        assert row["seg_path"] == f"{case_id}/{case_id}_seg.nii.gz"


def test_ras_case_output_matches_its_input(predicted):
    flair = nib.load(predicted.cases / "ras_case" / "ras_case_flair.nii.gz")
    seg = nib.load(predicted.out / "ras_case" / "ras_case_seg.nii.gz")
    assert seg.shape == flair.shape
    assert np.allclose(seg.affine, flair.affine)


def test_case_missing_a_modality_is_skipped_and_the_others_finish(predicted):
    assert predicted.status == 1  # some cases skipped, the rest written
    assert "skipping case missing_t2" in predicted.stdout
    skipped = read_csv(predicted.out / "skipped.csv")
    assert [row["case_id"] for row in skipped] == ["missing_t2"]
    assert skipped[0]["step"] == "validation"
    assert "t2" in skipped[0]["reason"] and "missing" in skipped[0]["reason"]
    assert not (predicted.out / "missing_t2").exists()
    assert (predicted.out / "ras_case" / "ras_case_seg.nii.gz").is_file()


def test_png_overlays_and_no_leftover_model_download(predicted):
    for case_id in ("lps_case", "ras_case"):
        assert (predicted.out / case_id / f"{case_id}_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The MLflow model is downloaded into a hidden folder of <out> and removed afterwards.
    assert not [p.name for p in predicted.out.iterdir() if p.name.startswith(".")]


def test_unknown_registered_model_is_a_clear_error(predicted, tmp_path):
    with pytest.raises(RaysemiError, match="no-such-model"), mlflow_env_restored():
        with model_checkpoint("models:/no-such-model@champion", predicted.uri, tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_folder_without_weights_is_not_a_checkpoint(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(RaysemiError, match="missing model.pt"):
        with model_checkpoint(str(tmp_path), "sqlite:///unused.db", tmp_path):
            pass


def test_output_folder_must_not_be_the_input_folder(predicted, capsys):
    status = run_cli(["predict", "--model", str(predicted.checkpoint), "--input", str(predicted.cases),
                      "--output", str(predicted.cases)])[0]
    assert status == 2
    assert "is the input folder" in capsys.readouterr().err
    assert not list(predicted.cases.glob("*/*_uncertainty.nii.gz"))


def test_sliding_window_is_the_checkpoint_patch_size(tmp_path):
    trained = tiny_config(tmp_path, tmp_path, data={"patch_size": [48, 32, 16]})
    checkpoint = make_checkpoint(tmp_path / "checkpoint", trained)
    default = tiny_config(tmp_path, tmp_path)
    assert default.data.patch_size == (32, 32, 32)
    assert inference_config(default, checkpoint).data.patch_size == (48, 32, 16)


def test_empty_input_folder_is_a_data_error(tmp_path):
    from raysemi.inference.commands import predict

    (tmp_path / "cases").mkdir()
    with pytest.raises(DataError, match="no BraTS cases"):
        predict(tiny_config(tmp_path, tmp_path), str(tmp_path), tmp_path / "cases", tmp_path / "out")


def test_relative_paths_resolve_inside_the_output_folder(predicted):
    for row in read_csv(predicted.out / "predictions.csv"):
        path = (predicted.out / row["seg_path"]).resolve()
        assert path.is_relative_to(predicted.out.resolve())
        assert Path(path).is_file()
