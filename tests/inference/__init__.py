"""Tests of ``raysemi.inference``, with helpers the command tests share.

The checkpoints here are untrained: a seeded ``tiny`` model saved with ``save_checkpoint``. The
command tests check files, grids, ordering and bookkeeping, which do not depend on training.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")


def make_checkpoint(directory: Path, cfg, seed: int = 0) -> Path:
    """Save a seeded, untrained tiny model as a raysemi checkpoint folder; returns the folder."""
    import torch

    from raysemi.model import build_model
    from raysemi.train.checkpoint import TrainState, save_checkpoint

    torch.manual_seed(seed)
    model = build_model("tiny")
    return save_checkpoint(directory, model, None, None, TrainState(), {"config": cfg.to_dict(), "role": "test"})


def synth_case(root: Path, case_id: str, seed: int, labeled: bool = False, shape=(32, 32, 32)) -> Path:
    """A generated case (spacing 5 mm, so the whole head fits a small grid); returns its folder."""
    from raysemi.data.synth import synth_case as render

    return render(root, case_id, shape, (5.0, 5.0, 5.0), seed, site="A", labeled=labeled)


def read_case_arrays(folder: Path, case_id: str) -> np.ndarray:
    """The four modalities of a case folder in file voxel order, ``(4, X, Y, Z)`` float32."""
    return np.stack([
        np.asarray(nib.load(folder / f"{case_id}_{m}.nii.gz").dataobj, dtype=np.float32) for m in MODALITIES
    ])


def write_case(root: Path, case_id: str, images: np.ndarray, affine: np.ndarray,
               qform_code: int = 1, sform_code: int = 1) -> Path:
    """Write ``images`` ``(4, X, Y, Z)`` as a BraTS 2021 case folder with the given affine and codes."""
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    for modality, volume in zip(MODALITIES, images):
        image = nib.Nifti1Image(volume.astype(np.float32), affine)
        image.set_qform(affine, code=qform_code)
        image.set_sform(affine, code=sform_code)
        nib.save(image, folder / f"{case_id}_{modality}.nii.gz")
    return folder


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``raysemi.cli.main(argv)`` with its stdout captured: (exit status, stdout)."""
    from raysemi.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(argv)
    return status, buffer.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@contextlib.contextmanager
def mlflow_env_restored() -> Iterator[None]:
    """Restore ``MLFLOW_TRACKING_URI`` on exit.

    ``mlflow.set_tracking_uri`` also sets that environment variable (MLflow 3), and
    ``cfg.tracking_uri()`` lets the variable win over ``tracking.uri``; without this, one test's
    store would leak into every later test of the session.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
