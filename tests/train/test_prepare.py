"""A broken labeled or validation scan stops a run before any training, and says why.

``prepare_run`` validates every case (in Ray tasks) before it writes the manifest; a labeled or
validation case with a problem raises :class:`~raysemi.errors.DataError` that names the case, the
file and the problem. (Broken *unlabeled* scans are reported and skipped: tests/train/test_run.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from raysemi.cli import main
from raysemi.data.brats import discover_cases, make_split
from raysemi.errors import DataError
from raysemi.train.pipeline import prepare_run
from tests.helpers import tiny_config


def _put_nan(path: Path) -> str:
    """One NaN voxel in the middle of the volume (saved as float32, so the NaN survives)."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[tuple(n // 2 for n in data.shape)] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    assert np.isnan(np.asarray(nib.load(path).dataobj)).sum() == 1
    return "NaN"


def _truncate_gzip(path: Path) -> str:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return "truncated"


DAMAGE = {"nan": _put_nan, "truncated_gzip": _truncate_gzip}


def _copy_and_break(source: Path, root: Path, cfg, role: str, modality: str, damage: str) -> tuple[str, Path, str]:
    """Copy the data set, break ``modality`` of the first case the split puts in ``role``.

    Returns the case id, the broken file and a word the error must contain.
    """
    shutil.copytree(source, root)
    # The split the run will make: same cases, fractions, seed and sites.
    split = make_split(
        discover_cases(root),
        labeled_fraction=cfg.data.labeled_fraction,
        validation_fraction=cfg.data.validation_fraction,
        seed=cfg.data.seed,
    )
    case_id = getattr(split, role)[0]
    path = Path(split.cases[case_id].images[modality])
    return case_id, path, DAMAGE[damage](path)


def _assert_no_training(cfg) -> None:
    run_dir = cfg.run_dir()
    assert not (run_dir / "teacher").exists()
    assert not (run_dir / "manifest.json").exists()
    state = run_dir / "state.json"
    if state.exists():
        steps = json.loads(state.read_text())["steps"]
        assert "teacher" not in steps and not steps.get("prepare", {}).get("done")


@pytest.mark.parametrize(
    ("role", "modality", "damage"),
    [("labeled", "t1ce", "nan"), ("validation", "flair", "truncated_gzip"), ("labeled", "t2", "truncated_gzip")],
)
def test_broken_labeled_or_validation_case_stops_prepare(tmp_path, synth_root, ray_cluster, role, modality, damage):
    cfg = tiny_config(tmp_path / "cases", tmp_path / "runs")
    case_id, path, problem = _copy_and_break(synth_root, tmp_path / "cases", cfg, role, modality, damage)

    with pytest.raises(DataError) as raised:
        prepare_run(cfg)

    message = str(raised.value)
    assert case_id in message
    assert str(path) in message
    assert problem in message
    assert modality in message
    _assert_no_training(cfg)


def test_run_command_exits_with_the_reason_before_training(tmp_path, synth_root, ray_cluster, capsys):
    cfg = tiny_config(tmp_path / "cases", tmp_path / "runs")
    case_id, path, problem = _copy_and_break(synth_root, tmp_path / "cases", cfg, "validation", "t1", "nan")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))

    assert main(["run", "--config", str(config_file)]) == 2

    err = capsys.readouterr().err
    assert case_id in err and str(path) in err and problem in err
    _assert_no_training(cfg)
    # No MLflow run was started for a run that never trained.
    if (tmp_path / "runs" / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking_uri())
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_validate_command_names_the_bad_case(tmp_path, synth_root, capsys):
    root = tmp_path / "cases"
    shutil.copytree(synth_root, root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    bad = folders[3]
    _put_nan(bad / f"{bad.name}_t1ce.nii.gz")

    assert main(["validate", str(root)]) == 1

    out = capsys.readouterr().out
    table_rows = [line for line in out.splitlines() if line.startswith("|") and "---" not in line][1:]
    assert len(table_rows) == 1
    assert bad.name in table_rows[0] and f"{bad.name}_t1ce.nii.gz" in table_rows[0] and "NaN" in table_rows[0]
    assert f"{len(folders)} cases checked, 1 with problems" in out


def test_validate_command_passes_a_clean_folder(synth_root, capsys):
    assert main(["validate", str(synth_root)]) == 0
    assert "0 with problems" in capsys.readouterr().out
