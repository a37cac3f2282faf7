"""Write small, real BraTS-like cases with nibabel for the data-layer tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (12, 10, 8)
AFFINE = np.array(
    [[1.0, 0.0, 0.0, -6.0], [0.0, 1.0, 0.0, -5.0], [0.0, 0.0, 1.0, -4.0], [0.0, 0.0, 0.0, 1.0]]
)
SUFFIXES = {
    "2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}


def case_file(root: Path, case_id: str, role: str, naming: str = "2021", ext: str = ".nii.gz") -> Path:
    """Path of one file of a case in the given naming scheme."""
    return root / case_id / f"{case_id}{SUFFIXES[naming][role]}{ext}"


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Save ``data`` as NIfTI at ``path`` (dtype kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def label_volume(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A uint8 on-disk label map containing every BraTS label 0, 1, 2, 4."""
    seg = np.zeros(shape, dtype=np.uint8)
    seg[2:6, 2:6, 2:6] = 2
    seg[3:5, 3:5, 3:5] = 1
    seg[4, 4, 4] = 4
    return seg


def write_case(
    root: Path,
    case_id: str,
    naming: str = "2021",
    with_seg: bool = True,
    site: str | None = None,
    modalities: tuple[str, ...] = ("t1", "t1ce", "t2", "flair"),
    shape: tuple[int, ...] = SHAPE,
    seed: int = 0,
) -> Path:
    """Write one case folder; returns the folder. ``site`` writes ``<id>_site.json``."""
    rng = np.random.default_rng(seed)
    for modality in modalities:
        save(case_file(root, case_id, modality, naming), rng.normal(100, 10, shape).astype(np.float32))
    if with_seg:
        save(case_file(root, case_id, "seg", naming), label_volume(shape))
    if site is not None:
        (root / case_id / f"{case_id}_site.json").write_text(json.dumps({"site": site, "contrast": 1.0}))
    return root / case_id
