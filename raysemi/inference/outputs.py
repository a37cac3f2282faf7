"""On-disk formats of pseudo-labels and predictions (plain numpy + nibabel, no Ray).

Pseudo-labels of a run live in ``<run>/pseudo/v<version>/`` in the case's RAS frame, with the RAS
affine of the case (so any viewer overlays them on the scan):

- ``<case>_label.nii.gz``: uint8, BraTS labels 0/1/2/4;
- ``<case>_uncertainty.nii.gz``: uint8 with NIfTI scaling slope 1/255, so readers get u in [0, 1]
  while the file stays compact;
- ``<case>_mask.nii.gz``: uint8 training mask, 0 ignored, 1 high-confidence (learn), 2 low (unlearn);
- ``<case>_probs.npz`` (teacher only): the teacher's mean MC probabilities over the brain box,
  quantised to uint8, that agreement refinement compares the student with.

All files are written atomically (temp file + rename).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from raysemi.atomic import atomic_path
from raysemi.data.nifti import labels_to_disk
from raysemi.data.transforms import PreprocessedCase, paste_back

UNCERTAINTY_SCALE = 255.0


def pseudo_paths(directory: str | Path, case_id: str) -> dict[str, str]:
    directory = Path(directory)
    return {
        "label_path": str(directory / f"{case_id}_label.nii.gz"),
        "uncertainty_path": str(directory / f"{case_id}_uncertainty.nii.gz"),
        "mask_path": str(directory / f"{case_id}_mask.nii.gz"),
        "probs_path": str(directory / f"{case_id}_probs.npz"),
    }


def quantise_uncertainty(uncertainty: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(uncertainty, dtype=np.float32) * UNCERTAINTY_SCALE), 0, 255).astype(np.uint8)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, slope: float | None = None) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def write_pseudo_label(
    case: PreprocessedCase,
    directory: str | Path,
    labels: np.ndarray,
    uncertainty: np.ndarray,
    mask: np.ndarray,
    probs: np.ndarray | None = None,
) -> dict[str, str]:
    """Write one case's pseudo-label files; arrays are over the case's brain box (x, y, z)."""
    paths = pseudo_paths(directory, case.case_id)
    affine = case.affine
    write_nifti(paste_back(labels_to_disk(labels.astype(np.uint8)), case), affine, paths["label_path"])
    write_nifti(paste_back(quantise_uncertainty(uncertainty), case), affine, paths["uncertainty_path"], 1.0 / UNCERTAINTY_SCALE)
    write_nifti(paste_back(mask.astype(np.uint8), case), affine, paths["mask_path"])
    if probs is not None:
        quantised = np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)
        with atomic_path(paths["probs_path"]) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, probs=quantised, box_start=np.array(case.box_start), box_end=np.array(case.box_end))
    else:
        paths.pop("probs_path")
    return paths


def read_probs(path: str | Path, case: PreprocessedCase) -> np.ndarray:
    """Teacher probabilities (K, x, y, z) float32 over ``case``'s brain box, renormalised after quantisation."""
    with np.load(path) as data:
        if tuple(data["box_start"]) != case.box_start or tuple(data["box_end"]) != case.box_end:
            raise ValueError(
                f"case {case.case_id}: {path} was written for brain box {tuple(data['box_start'])}-{tuple(data['box_end'])}, "
                f"the scan now gives {case.box_start}-{case.box_end}"
            )
        probs = data["probs"].astype(np.float32) + 1e-3  # no exact zeros after rounding
    return probs / probs.sum(axis=0, keepdims=True)
