"""NIfTI input/output in one orientation convention, and the BraTS label maps.

Contract (like nnU-Net's reader/writer, stated once here):

* Every array raysemi computes on is in **RAS** voxel order: increasing array index runs
  towards the subject's Right along axis 0, Anterior along axis 1 and Superior along axis 2
  (nibabel's "closest canonical" orientation). Readers return the RAS array together with the
  RAS affine, so voxel spacing and world coordinates stay correct.
* Everything raysemi writes next to a source scan (pseudo-labels, predictions, uncertainty)
  goes back into that scan's **original** orientation, with the scan's own affine and header,
  so it overlays the source image in any viewer.
* Labels are 0 background, 1 NCR/NET, 2 edema, 3 enhancing tumour internally; BraTS files on
  disk use 4 for enhancing tumour.

Files are opened lazily (``nib.load`` reads the header only) and every voxel array is read
exactly once; a corrupt or truncated file raises :class:`~raysemi.errors.DataError` naming it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from raysemi.atomic import atomic_path
from raysemi.errors import DataError

if TYPE_CHECKING:  # brats.py imports this module; the record type is only needed for hints
    from raysemi.data.brats import CaseRecord

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""MRI sequences of one case, in the channel order of every image array."""

DISK_LABELS: tuple[int, ...] = (0, 1, 2, 4)
"""Label values allowed in BraTS segmentation files."""

# Orientation of an array that is already RAS: axis i stays axis i, no flip.
_RAS_ORIENTATION = np.array([[0, 1], [1, 1], [2, 1]])

# What nibabel/gzip/numpy raise on a missing, truncated or otherwise unreadable file.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


@dataclass
class CaseArrays:
    """One case in memory, in RAS orientation.

    Attributes:
        case_id: the case's id.
        image: ``(4, X, Y, Z)`` float32, channels in :data:`MODALITIES` order.
        seg: ``(X, Y, Z)`` uint8 internal labels (0..3), or None when not loaded or unlabeled.
        affine: ``(4, 4)`` float64 voxel-to-world affine of the RAS arrays.
        spacing: voxel size in mm along the RAS array axes (X, Y, Z).
    """

    case_id: str
    image: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]


# ---------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------


def invalid_label_values(seg: np.ndarray, allowed: tuple[int, ...] = DISK_LABELS) -> list[float]:
    """Return the sorted distinct values of ``seg`` that are not in ``allowed`` (empty if none)."""
    seg = np.asarray(seg)
    bad = ~np.isin(seg, allowed)
    if not bad.any():
        return []
    # Integer-valued floats print as ints ("[3]", not "[3.0]"): segs are often saved as float.
    return [int(v) if float(v).is_integer() else v.item() for v in np.unique(seg[bad])]


def labels_to_internal(seg: np.ndarray) -> np.ndarray:
    """Map on-disk BraTS labels {0, 1, 2, 4} to internal labels {0, 1, 2, 3}.

    Args:
        seg: ``(X, Y, Z)`` label volume of any numeric dtype (integer-valued floats are accepted,
            as some tools save labels as float).

    Returns:
        ``(X, Y, Z)`` uint8 array with 4 replaced by 3.

    Raises:
        DataError: when any value lies outside {0, 1, 2, 4}; the message lists those values.
    """
    bad_values = invalid_label_values(seg, DISK_LABELS)
    if bad_values:
        raise DataError(
            f"segmentation holds label values {_short_list(bad_values)}; BraTS labels must be "
            f"one of {list(DISK_LABELS)}"
        )
    internal = np.asarray(seg).astype(np.uint8)
    internal[internal == 4] = 3
    return internal


def labels_to_disk(labels: np.ndarray) -> np.ndarray:
    """Map internal labels {0, 1, 2, 3} back to BraTS on-disk labels {0, 1, 2, 4}.

    Args:
        labels: ``(X, Y, Z)`` integer label volume.

    Returns:
        ``(X, Y, Z)`` uint8 array with 3 replaced by 4.

    Raises:
        DataError: when any value lies outside {0, 1, 2, 3}.
    """
    bad_values = invalid_label_values(labels, (0, 1, 2, 3))
    if bad_values:
        raise DataError(
            f"label map holds values {_short_list(bad_values)}; internal labels must be one of "
            "[0, 1, 2, 3]"
        )
    disk = np.asarray(labels).astype(np.uint8)
    disk[disk == 3] = 4
    return disk


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def open_image(path: str | os.PathLike) -> nib.spatialimages.SpatialImage:
    """Open an image file lazily (header only), raising DataError naming the file on failure."""
    try:
        return nib.load(os.fspath(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except _READ_ERRORS as err:
        raise DataError(
            f"{path}: cannot be read as NIfTI, the file is truncated, corrupt or of another format "
            f"({type(err).__name__}: {err})"
        ) from err


def read_voxels(
    image: nib.spatialimages.SpatialImage, path: str | os.PathLike, dtype: np.dtype | None = None
) -> np.ndarray:
    """Read an opened image's voxels once, in the file's own orientation.

    Args:
        image: an image from :func:`open_image`.
        path: its file, for the error message.
        dtype: cast to this dtype; None keeps the scaled on-disk type.

    Raises:
        DataError: when the voxel data cannot be read (truncated gzip, short file...).
    """
    try:
        # Reading through dataobj, not get_fdata(), avoids nibabel's float64 cache.
        return np.asarray(image.dataobj, dtype=dtype)
    except _READ_ERRORS as err:
        raise DataError(
            f"{path}: voxel data cannot be read, the file is probably truncated or corrupt "
            f"({type(err).__name__}: {err})"
        ) from err


def load_ras(path: str | os.PathLike, dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file and reorient it to RAS (nibabel's closest canonical orientation).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file in any orientation.
        dtype: cast the voxels to this dtype; None keeps the scaled on-disk type.

    Returns:
        ``(data, affine)``: ``data`` is C-contiguous with its first three axes in RAS order
        (shape ``(X, Y, Z)`` or ``(X, Y, Z, ...)``); ``affine`` is the ``(4, 4)`` voxel-to-world
        affine of ``data`` (``nib.aff2axcodes(affine) == ('R', 'A', 'S')`` for non-oblique scans).

    Raises:
        DataError: when the file is missing, not NIfTI, or its voxels cannot be read.
    """
    image = open_image(path)
    to_ras = io_orientation(image.affine)
    data = read_voxels(image, path, dtype)
    # Contiguous so that torch.from_numpy accepts it (flips produce negative strides).
    data_ras = np.ascontiguousarray(apply_orientation(data, to_ras))
    affine_ras = image.affine @ inv_ornt_aff(to_ras, image.shape)
    return data_ras, affine_ras


def load_case_arrays(case: CaseRecord, with_seg: bool = True) -> CaseArrays:
    """Load the four modalities (and the segmentation) of a case as RAS arrays.

    Args:
        case: the case; all four modalities must be present (run validation first).
        with_seg: also load the segmentation when the case has one.

    Returns:
        :class:`CaseArrays` with ``image`` ``(4, X, Y, Z)`` float32 and ``seg`` ``(X, Y, Z)``
        uint8 internal labels (None when ``with_seg`` is False or the case is unlabeled).

    Raises:
        DataError: naming the case and file when a modality is missing or unreadable, when the
            files disagree on shape or affine, or when the segmentation has non-BraTS labels.
    """
    missing = [m for m in MODALITIES if m not in case.images]
    if missing:
        raise DataError(f"case {case.case_id}: missing modalities {missing} in {case.folder}")

    image: np.ndarray | None = None
    reference_affine: np.ndarray | None = None
    for channel, modality in enumerate(MODALITIES):
        path = case.images[modality]
        data, affine = load_ras(path, dtype=np.float32)
        if data.ndim != 3:
            raise DataError(f"case {case.case_id}: {path}: expected a 3D volume, got shape {data.shape}")
        if image is None:
            # Filled channel by channel so that only one extra volume is in memory at a time.
            image = np.empty((len(MODALITIES), *data.shape), dtype=np.float32)
            reference_affine = affine
        _check_same_grid(case.case_id, path, data.shape, affine, image.shape[1:], reference_affine)
        image[channel] = data
    assert image is not None and reference_affine is not None

    seg = None
    if with_seg and case.seg is not None:
        seg_disk, seg_affine = load_ras(case.seg)
        _check_same_grid(case.case_id, case.seg, seg_disk.shape, seg_affine, image.shape[1:], reference_affine)
        try:
            seg = labels_to_internal(seg_disk)
        except DataError as err:
            raise DataError(f"case {case.case_id}: {case.seg}: {err}") from err

    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(reference_affine))
    return CaseArrays(case.case_id, image, seg, reference_affine, spacing)  # type: ignore[arg-type]


def _check_same_grid(
    case_id: str,
    path: str,
    shape: tuple[int, ...],
    affine: np.ndarray,
    expected_shape: tuple[int, ...],
    expected_affine: np.ndarray,
) -> None:
    if tuple(shape) != tuple(expected_shape):
        raise DataError(
            f"case {case_id}: {path}: RAS shape {tuple(shape)} differs from the case's "
            f"{tuple(expected_shape)}; all modalities and the seg must share one voxel grid"
        )
    if not np.allclose(affine, expected_affine, atol=1e-4):
        raise DataError(
            f"case {case_id}: {path}: affine\n{affine}\ndiffers from the case's\n{expected_affine}"
        )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_like(
    array_ras: np.ndarray,
    reference_path: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: np.dtype | type = np.uint8,
) -> None:
    """Write a RAS array in the orientation, affine and header of a reference scan.

    ``load_ras(ref)`` followed by ``write_like(data, ref, out)`` gives a file with the same shape,
    affine, qform/sform codes and voxel values as ``ref``. The header is the reference's, with the
    data dtype set to ``dtype``, scaling reset (none) and the display range (cal_min/max) cleared,
    because the reference's intensity window means nothing for a label or uncertainty map.

    Args:
        array_ras: ``(X, Y, Z)`` (or ``(X, Y, Z, ...)``) array in RAS order, on the reference's
            RAS grid as returned by :func:`load_ras`.
        reference_path: the NIfTI scan whose grid the array lives on.
        out_path: the output ``.nii`` / ``.nii.gz`` file, written atomically.
        dtype: on-disk dtype. For integer dtypes every value must be representable exactly.

    Raises:
        DataError: when the reference is unreadable or not NIfTI, when the array's shape does not
            match the reference's RAS grid, or when values do not fit ``dtype``.
    """
    reference = open_image(reference_path)
    if not isinstance(reference, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{reference_path}: reference must be a NIfTI image, got {type(reference).__name__}")
    from_ras = ornt_transform(_RAS_ORIENTATION, io_orientation(reference.affine))
    data = apply_orientation(np.asarray(array_ras), from_ras)
    if data.shape[:3] != reference.shape[:3]:
        expected_ras = apply_orientation(np.empty(reference.shape[:3], dtype=np.uint8), io_orientation(reference.affine))
        raise DataError(
            f"{out_path}: array of RAS shape {np.shape(array_ras)} does not match the RAS grid "
            f"{expected_ras.shape} of reference {reference_path}"
        )
    data = _cast_exactly(data, dtype, out_path)

    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(np.nan, np.nan)
    header["cal_min"] = 0
    header["cal_max"] = 0
    # The reference's own affine equals the header's best affine, so nibabel keeps the header's
    # qform/sform (and their codes) untouched instead of re-deriving them.
    out_image = reference.__class__(data, reference.affine, header=header)
    with atomic_path(out_path) as tmp:
        nib.save(out_image, os.fspath(tmp))


def write_ras(
    array_ras: np.ndarray,
    affine_ras: np.ndarray,
    out_path: str | os.PathLike,
    dtype: np.dtype | type = np.float32,
) -> None:
    """Write an array with a given affine (qform and sform code 1, scanner), atomically.

    Args:
        array_ras: ``(X, Y, Z)`` or ``(X, Y, Z, ...)`` array.
        affine_ras: its ``(4, 4)`` voxel-to-world affine.
        out_path: the output ``.nii`` / ``.nii.gz`` file.
        dtype: on-disk dtype. For integer dtypes every value must be representable exactly.
    """
    data = _cast_exactly(np.asarray(array_ras), dtype, out_path)
    image = nib.Nifti1Image(data, np.asarray(affine_ras, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(out_path) as tmp:
        nib.save(image, os.fspath(tmp))


def write_label_like(
    labels_internal: np.ndarray, reference_path: str | os.PathLike, out_path: str | os.PathLike
) -> None:
    """Write internal labels (0..3, RAS) as a BraTS label file (0, 1, 2, 4) on the reference's grid."""
    write_like(labels_to_disk(labels_internal), reference_path, out_path, dtype=np.uint8)


def _cast_exactly(data: np.ndarray, dtype: np.dtype | type, out_path: str | os.PathLike) -> np.ndarray:
    """Cast to ``dtype``; for integer targets refuse values that would wrap or be truncated."""
    dtype = np.dtype(dtype)
    cast = data.astype(dtype, copy=False)
    if np.issubdtype(dtype, np.integer) and not np.array_equal(cast, data):
        raise DataError(f"{out_path}: values do not fit {dtype} exactly (range {data.min()}..{data.max()})")
    return cast


def _short_list(values: list, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"[{shown}{more}]"
