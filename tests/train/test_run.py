"""``raysemi run`` end to end on a real local Ray cluster, interrupted twice and resumed.

One scenario, because every Ray Train fit costs ~25 s here:

1. ``raysemi run`` in a subprocess is killed (its whole process group, Ray included) once the
   teacher has written its first checkpoint;
2. rerun in a subprocess: the teacher resumes at its next epoch, not at epoch 1; killed again as
   soon as stage 1 is recorded as finished in state.json;
3. rerun in this process: stage 1 is not repeated, stage 2 and the evaluation finish.

The data folder also holds broken unlabeled scans of every kind the validator knows: the run must
report each of them and finish with the good ones.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.helpers import tiny_config

BROKEN = ("missing_modality", "truncated_gzip", "nan_values", "shape_mismatch", "four_d", "affine_mismatch", "label_3")


def _break_case(source: Path, root: Path, kind: str) -> str:
    """Copy a good case under a new id (site X) and break it in one way."""
    case_id = f"BROKEN_{kind}"
    folder = root / case_id
    folder.mkdir()
    old_id = source.name
    for path in source.glob("*.nii.gz"):
        shutil.copy(path, folder / path.name.replace(old_id, case_id))
    (folder / f"{case_id}_site.json").write_text(json.dumps({"site": "X"}))
    flair = folder / f"{case_id}_flair.nii.gz"
    seg = folder / f"{case_id}_seg.nii.gz"
    image = nib.load(flair)
    data = np.asarray(image.dataobj, dtype=np.float32)
    if kind != "label_3":
        seg.unlink()  # unlabeled scans
    if kind == "missing_modality":
        flair.unlink()
    elif kind == "truncated_gzip":
        raw = flair.read_bytes()
        flair.write_bytes(raw[: len(raw) // 2])
    elif kind == "nan_values":
        data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine, image.header), flair)
    elif kind == "shape_mismatch":
        nib.save(nib.Nifti1Image(data[:-2], image.affine, image.header), flair)
    elif kind == "four_d":
        nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), flair)
    elif kind == "affine_mismatch":
        affine = image.affine.copy()
        affine[0, 3] += 5.0
        nib.save(nib.Nifti1Image(data, affine, image.header), flair)
    elif kind == "label_3":
        labels = np.asarray(nib.load(seg).dataobj).astype(np.uint8)
        labels[labels == 4] = 3
        nib.save(nib.Nifti1Image(labels, image.affine), seg)
    return case_id


def _run_until(command: list[str], env: dict[str, str], condition, log: Path, timeout: float = 600) -> str:
    """Run ``command`` in its own process group; kill the whole group once ``condition()`` holds."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if condition():
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    # Ray's own processes live in the same group; give them a moment to vanish.
                    time.sleep(2)
                    return log.read_text()
                if process.poll() is not None:
                    raise AssertionError(f"run ended before the kill point (rc={process.returncode}):\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
            raise AssertionError(f"kill point not reached in {timeout} s:\n{log.read_text()[-4000:]}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, synth_root, ray_cluster):
    base = tmp_path_factory.mktemp("run")
    root = base / "cases"
    shutil.copytree(synth_root, root)
    good = sorted(p for p in root.iterdir() if p.is_dir())
    broken = [_break_case(good[0], root, kind) for kind in BROKEN]
    storage = base / "runs"
    cfg = tiny_config(
        root,
        storage,
        data={"labeled_sites": ["A"], "validation_sites": ["A"], "unlabeled_sites": ["A", "X"]},
        train={"epochs": 3},
        curriculum={"stages": 2, "epochs_per_stage": 1},
    )
    config_file = base / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = cfg.run_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    command = [sys.executable, "-m", "raysemi.cli", "run", "--config", str(config_file)]

    def teacher_checkpoint_exists() -> bool:
        # Registered by the Ray Train controller (what a rerun resumes from), not merely on disk.
        try:
            snapshot = json.loads((run_dir / "teacher" / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return len(snapshot.get("checkpoint_results", [])) >= 1

    def stage_one_done() -> bool:
        state = run_dir / "state.json"
        return state.exists() and json.loads(state.read_text())["steps"].get("stage_01", {}).get("done", False)

    first = _run_until(command, env, teacher_checkpoint_exists, base / "first.log")
    second = _run_until(command, env, stage_one_done, base / "second.log")

    from raysemi.train.semi_pipeline import run_pipeline

    outputs = run_pipeline(cfg)
    return {"cfg": cfg, "run_dir": run_dir, "first": first, "second": second, "outputs": outputs,
            "broken": broken, "root": root}


def test_teacher_resumes_at_its_next_epoch(scenario):
    assert "teacher epoch 1/3" in scenario["first"]
    # The second attempt continued from the checkpoint, so it never trained epoch 1 again.
    assert "teacher epoch 1/3" not in scenario["second"]
    assert "teacher epoch 3/3" in scenario["second"]
    from raysemi.train.checkpoint import load_meta

    history = load_meta(scenario["outputs"]["teacher"]["checkpoint"])["history"]
    assert [h["epoch"] for h in history] == sorted({h["epoch"] for h in history})


def test_finished_stage_is_not_repeated(scenario):
    assert "stage 1/2" in scenario["second"]
    state = json.loads((scenario["run_dir"] / "state.json").read_text())
    assert all(state["steps"][step]["done"] for step in ("prepare", "teacher", "pseudo_labels", "stage_01", "stage_02", "evaluation"))
    # the in-process third attempt reused stage 1 as recorded by the second one
    assert scenario["outputs"]["stages"][0]["checkpoint"] == state["steps"]["stage_01"]["checkpoint"]
    assert "stage_01" in scenario["outputs"]["stages"][0]["checkpoint"]


def test_broken_unlabeled_scans_are_reported_and_skipped(scenario):
    bad = json.loads((scenario["run_dir"] / "bad_cases.json").read_text())
    assert sorted(bad) == sorted(scenario["broken"])
    assert "flair" in bad["BROKEN_missing_modality"]
    assert "NaN" in bad["BROKEN_nan_values"] or "finite" in bad["BROKEN_nan_values"]
    assert "3" in bad["BROKEN_label_3"]
    assert "skipping unlabeled case BROKEN_truncated_gzip" in scenario["first"]
    manifest = json.loads((scenario["run_dir"] / "manifest.json").read_text())
    assert not set(scenario["broken"]) & set(manifest["unlabeled"])
    # 10 site-A cases: 2 validation (round(0.2*10)), 2 labeled (round(0.3*8)), 6 unlabeled.
    assert (len(manifest["validation"]), len(manifest["labeled"]), len(manifest["unlabeled"])) == (2, 2, 6)


def test_pseudo_labels_and_pool_versions(scenario):
    run_dir = scenario["run_dir"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    snapshot = json.loads((run_dir / "pool" / "snapshot.json").read_text())
    records = {r["case_id"]: r for r in snapshot["records"]}
    assert sorted(records) == sorted(manifest["unlabeled"])
    # Stage 1 admits ceil(1/2 * 6) = 3 scans, stage 2 all 6; each refinement bumps the version of
    # the scans it refined: admitted at stage 1 -> refined twice (v3), at stage 2 -> once (v2).
    assert sorted(r["version"] for r in records.values()) == [2, 2, 2, 3, 3, 3]
    assert all(r["version"] == (3 if r["admitted_stage"] == 1 else 2) for r in records.values())
    for case_id, record in records.items():
        label = nib.load(record["label_path"])
        assert f"v{record['version']:02d}" in record["label_path"]
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 4}
        uncertainty = nib.load(record["uncertainty_path"]).get_fdata()
        assert 0.0 <= uncertainty.min() and uncertainty.max() <= 1.0 + 1e-6  # uint8 x float32 slope 1/255
        flair = nib.as_closest_canonical(nib.load(manifest["cases"][case_id]["images"]["flair"]))
        assert label.shape == flair.shape
        np.testing.assert_allclose(label.affine, flair.affine, atol=1e-5)
    assert (run_dir / "pseudo" / "v01" / f"{sorted(records)[0]}_probs.npz").exists()


def test_mlflow_parent_with_nested_teacher_and_stage_runs(scenario):
    from mlflow.tracking import MlflowClient

    cfg = scenario["cfg"]
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("raysemi.role") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    roles = sorted((r.data.tags["raysemi.role"], r.data.tags["raysemi.stage"]) for r in children)
    assert roles == [("student", "1"), ("student", "2"), ("teacher", "0")]
    assert all(r.data.tags["raysemi.labeled_fraction"] == "0.3" for r in children)
    teacher = next(r for r in children if r.data.tags["raysemi.role"] == "teacher")
    epochs = [m.step for m in client.get_metric_history(teacher.info.run_id, "val_dice_mean_regions")]
    assert sorted(set(epochs)) == [1, 2, 3]
    assert teacher.data.params["loss.tau_high"] == "0.2"
    assert parent.data.metrics["bad_unlabeled_cases"] == len(BROKEN)
    assert "final_student_dice_mean_regions" in client.get_run(parent.info.run_id).data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert "results/teacher_vs_student.md" in artifacts and "results/stage_dice.png" in artifacts
    stage_metrics = client.get_run(parent.info.run_id).data.metrics
    assert "stage_pseudo_truth_dice_before" in stage_metrics and "stage_pseudo_truth_dice_after" in stage_metrics


def test_results_table_and_reports(scenario):
    results = scenario["run_dir"] / "results"
    table = (results / "teacher_vs_student.md").read_text()
    assert "teacher" in table and "student" in table and "NCR/NET" in table
    final = json.loads((results / "final_metrics.json").read_text())
    for model in ("teacher", "student"):
        assert 0.0 <= final[model]["dice_mean_regions"] <= 1.0
    assert [p["stage"] for p in final["stages"]] == [0, 1, 2]
    assert (results / "student_metrics.csv").read_text().count("\n") >= 2 + 4  # 2 cases + summary rows
