"""Tests for raysemi.data.nifti: label maps, RAS reading, writing back in source orientation."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raysemi.data.brats import CaseRecord, discover_cases
from raysemi.data.nifti import (
    MODALITIES,
    labels_to_disk,
    labels_to_internal,
    load_case_arrays,
    load_ras,
    write_label_like,
    write_like,
    write_ras,
)
from raysemi.errors import DataError

from ._cases import AFFINE, SHAPE, case_file, label_volume, save, write_case

# An LPS-oriented, anisotropic, non-cubic scan: x runs Left, y Posterior, z Superior.
LPS_SHAPE = (20, 16, 12)
LPS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 90.0], [0.0, -1.5, 0.0, 110.0], [0.0, 0.0, 2.5, -70.0], [0.0, 0.0, 0.0, 1.0]]
)
# Axes permuted and flipped: array axis 0 runs Anterior, axis 1 Inferior, axis 2 Left.
PERMUTED_AFFINE = np.array(
    [[0.0, 0.0, -2.0, 30.0], [1.2, 0.0, 0.0, -20.0], [0.0, -0.8, 0.0, 15.0], [0.0, 0.0, 0.0, 1.0]]
)


def save_with_codes(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save with qform code 1 (scanner) and sform code 4 (MNI), so that codes must survive."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=4)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"reference scan"
    nib.save(image, str(path))
    return path


def unique_voxel_values(shape: tuple[int, ...]) -> np.ndarray:
    """Volume whose value is the flat index of each voxel, so every voxel can be traced."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------


def test_labels_to_internal_maps_4_to_3():
    seg = np.array([[[0, 1], [2, 4]]], dtype=np.int16)

    internal = labels_to_internal(seg)

    assert internal.dtype == np.uint8
    np.testing.assert_array_equal(internal, [[[0, 1], [2, 3]]])


def test_labels_to_internal_accepts_integer_valued_floats():
    np.testing.assert_array_equal(labels_to_internal(np.array([0.0, 4.0, 2.0, 1.0])), [0, 3, 2, 1])


@pytest.mark.parametrize("bad", [3, 5, -1, 1.5])
def test_labels_to_internal_rejects_non_brats_values(bad):
    seg = np.array([0, 1, 2, 4, bad], dtype=np.float32)

    with pytest.raises(DataError, match=rf"values \[{bad}\]"):
        labels_to_internal(seg)


def test_labels_to_disk_maps_3_to_4_and_rejects_4():
    disk = labels_to_disk(np.array([0, 1, 2, 3], dtype=np.int64))

    assert disk.dtype == np.uint8
    np.testing.assert_array_equal(disk, [0, 1, 2, 4])
    with pytest.raises(DataError, match=r"\[4\]"):
        labels_to_disk(np.array([0, 4]))


def test_label_maps_round_trip():
    seg = label_volume()

    np.testing.assert_array_equal(labels_to_disk(labels_to_internal(seg)), seg)


# ---------------------------------------------------------------------------------------------
# Reading to RAS
# ---------------------------------------------------------------------------------------------


def test_ras_file_is_returned_unchanged(tmp_path):
    data = unique_voxel_values(SHAPE)
    path = save(tmp_path / "ras.nii.gz", data)

    loaded, affine = load_ras(path)

    np.testing.assert_array_equal(loaded, data)
    np.testing.assert_array_equal(affine, AFFINE)


def test_lps_file_is_flipped_to_ras(tmp_path):
    data = unique_voxel_values(LPS_SHAPE)
    path = save(tmp_path / "lps.nii.gz", data, LPS_AFFINE)
    assert nib.aff2axcodes(LPS_AFFINE) == ("L", "P", "S")

    loaded, affine = load_ras(path)

    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert loaded.shape == LPS_SHAPE
    assert loaded.flags.c_contiguous
    # By hand: x and y are reversed, z kept.
    assert loaded[19, 15, 0] == data[0, 0, 0]
    np.testing.assert_array_equal(loaded, data[::-1, ::-1, :])
    # RAS voxel i along x is LPS voxel 19 - i: x = -1 * (19 - i) + 90 = i + 71; y = -1.5 * (15 - j) + 110.
    expected_affine = np.array(
        [[1.0, 0.0, 0.0, 71.0], [0.0, 1.5, 0.0, 87.5], [0.0, 0.0, 2.5, -70.0], [0.0, 0.0, 0.0, 1.0]]
    )
    np.testing.assert_allclose(affine, expected_affine)


@pytest.mark.parametrize("affine", [LPS_AFFINE, PERMUTED_AFFINE], ids=["LPS", "ASL-permuted"])
def test_every_voxel_keeps_its_world_position(tmp_path, affine):
    data = unique_voxel_values(LPS_SHAPE)
    path = save(tmp_path / "scan.nii.gz", data, affine)

    loaded, ras_affine = load_ras(path)
    file_affine = nib.load(path).affine  # the header stores the affine in float32

    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    ras_index = np.stack(np.meshgrid(*[np.arange(n) for n in loaded.shape], indexing="ij"), -1).reshape(-1, 3)
    source_index = np.stack(np.unravel_index(loaded.reshape(-1).astype(np.int64), LPS_SHAPE), -1)
    world_from_ras = nib.affines.apply_affine(ras_affine, ras_index)
    world_from_source = nib.affines.apply_affine(file_affine, source_index)
    np.testing.assert_allclose(world_from_ras, world_from_source, atol=1e-9)


def test_load_ras_casts_to_requested_dtype(tmp_path):
    path = save(tmp_path / "int.nii.gz", np.arange(24, dtype=np.int16).reshape(2, 3, 4))

    loaded, _ = load_ras(path, dtype=np.float32)

    assert loaded.dtype == np.float32
    assert loaded[1, 2, 3] == 23.0


def test_load_ras_unreadable_files_name_the_file(tmp_path):
    path = save(tmp_path / "scan.nii.gz", unique_voxel_values(SHAPE))
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(DataError, match=r"scan\.nii\.gz"):
        load_ras(path)
    with pytest.raises(DataError, match="not found"):
        load_ras(tmp_path / "absent.nii.gz")


# ---------------------------------------------------------------------------------------------
# Writing back in the source orientation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [LPS_AFFINE, PERMUTED_AFFINE, AFFINE], ids=["LPS", "ASL-permuted", "RAS"])
@pytest.mark.parametrize("extension", [".nii.gz", ".nii"])
def test_write_like_restores_array_affine_and_header(tmp_path, affine, extension):
    shape = LPS_SHAPE if affine is not AFFINE else SHAPE
    original = unique_voxel_values(shape)
    reference = save_with_codes(tmp_path / f"ref{extension}", original, affine)
    out = tmp_path / "out" / f"copy{extension}"

    data_ras, _ = load_ras(reference)
    write_like(data_ras, reference, out, dtype=np.float32)

    written, source = nib.load(out), nib.load(reference)
    assert written.shape == shape
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), original)
    np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)  # float32 in the header
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4
    np.testing.assert_array_equal(written.header.get_qform(), source.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), source.header.get_sform())
    assert written.header.get_zooms() == source.header.get_zooms()
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.get_data_dtype() == np.float32
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left


def test_write_label_like_round_trips_a_label_file(tmp_path):
    seg = np.zeros(LPS_SHAPE, dtype=np.uint8)
    seg[0, 0, 0] = 4  # corner voxel: a wrong flip would move it
    seg[5:8, 2:4, 1] = 1
    seg[10:12, 9:15, 3:6] = 2
    reference = save_with_codes(tmp_path / "seg.nii.gz", seg, LPS_AFFINE)

    seg_ras, _ = load_ras(reference)
    internal = labels_to_internal(seg_ras)
    assert internal[19, 15, 0] == 3
    write_label_like(internal, reference, tmp_path / "pred.nii.gz")

    written = nib.load(tmp_path / "pred.nii.gz")
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), seg)
    np.testing.assert_array_equal(written.affine, LPS_AFFINE)


def test_write_like_resets_scaling_of_the_reference(tmp_path):
    # A reference stored as int16 with a scale factor: the written labels must not be rescaled.
    image = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.int16), AFFINE)
    image.header.set_slope_inter(2.0, 10.0)
    reference = tmp_path / "scaled.nii.gz"
    nib.save(image, str(reference))
    labels = label_volume()

    write_like(labels, reference, tmp_path / "labels.nii.gz", dtype=np.uint8)

    written = nib.load(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    assert written.dataobj.slope == 1.0 and written.dataobj.inter == 0.0


def test_write_like_rejects_wrong_shape_and_leaves_nothing(tmp_path):
    reference = save(tmp_path / "ref" / "lps.nii.gz", unique_voxel_values(LPS_SHAPE), LPS_AFFINE)
    out = tmp_path / "out" / "bad.nii.gz"

    with pytest.raises(DataError, match=r"\(20, 16, 12\)"):
        write_like(np.zeros((16, 20, 12)), reference, out)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_write_like_refuses_values_that_do_not_fit(tmp_path):
    reference = save(tmp_path / "ref.nii.gz", np.zeros(SHAPE, np.float32))

    with pytest.raises(DataError, match="uint8"):
        write_like(np.full(SHAPE, 300), reference, tmp_path / "out.nii.gz", dtype=np.uint8)
    with pytest.raises(DataError, match="uint8"):
        write_like(np.full(SHAPE, 0.5), reference, tmp_path / "out.nii.gz", dtype=np.uint8)


def test_write_ras_writes_array_and_affine(tmp_path):
    data = unique_voxel_values(SHAPE)
    affine = np.diag([1.0, 1.5, 2.5, 1.0])
    affine[:3, 3] = (4.0, -3.0, 2.0)

    write_ras(data, affine, tmp_path / "sub" / "u.nii.gz", dtype=np.float32)

    written = nib.load(tmp_path / "sub" / "u.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), data)
    np.testing.assert_array_equal(written.affine, affine)
    assert written.get_data_dtype() == np.float32
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1


# ---------------------------------------------------------------------------------------------
# Whole cases
# ---------------------------------------------------------------------------------------------


def test_load_case_arrays_stacks_modalities_in_order(tmp_path):
    write_case(tmp_path, "case01")
    expected = [np.asanyarray(nib.load(case_file(tmp_path, "case01", m)).dataobj) for m in MODALITIES]
    (case,) = discover_cases(tmp_path)

    arrays = load_case_arrays(case)

    assert arrays.case_id == "case01"
    assert arrays.image.shape == (4, *SHAPE) and arrays.image.dtype == np.float32
    for channel, modality_data in enumerate(expected):
        np.testing.assert_array_equal(arrays.image[channel], modality_data)
    seg_expected = label_volume()
    seg_expected[seg_expected == 4] = 3
    np.testing.assert_array_equal(arrays.seg, seg_expected)
    assert arrays.seg.dtype == np.uint8
    np.testing.assert_array_equal(arrays.affine, AFFINE)
    assert arrays.spacing == (1.0, 1.0, 1.0)


def test_load_case_arrays_lps_case_is_ras_with_spacing(tmp_path):
    folder = tmp_path / "lps01"
    channels = {m: unique_voxel_values(LPS_SHAPE) + 1000 * i for i, m in enumerate(MODALITIES)}
    images = {m: str(save(folder / f"lps01_{m}.nii.gz", channels[m], LPS_AFFINE)) for m in MODALITIES}
    seg = np.zeros(LPS_SHAPE, np.uint8)
    seg[0, 0, 0] = 4
    seg_path = str(save(folder / "lps01_seg.nii.gz", seg, LPS_AFFINE))

    arrays = load_case_arrays(CaseRecord("lps01", str(folder), images, seg_path))

    assert arrays.spacing == (1.0, 1.5, 2.5)
    assert nib.aff2axcodes(arrays.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(arrays.image[3], channels["flair"][::-1, ::-1, :])
    assert arrays.seg[19, 15, 0] == 3 and arrays.seg.sum() == 3


def test_load_case_arrays_without_seg(tmp_path):
    write_case(tmp_path, "labeled01")
    write_case(tmp_path, "unlabeled01", with_seg=False)
    labeled, unlabeled = discover_cases(tmp_path)

    assert load_case_arrays(labeled, with_seg=False).seg is None
    assert load_case_arrays(unlabeled).seg is None


def test_load_case_arrays_errors_name_case_and_file(tmp_path):
    write_case(tmp_path, "case01")
    (case,) = discover_cases(tmp_path)
    save(Path(case.images["t2"]), np.zeros((12, 10, 9), np.float32))

    with pytest.raises(DataError, match=r"case case01: .*case01_t2\.nii\.gz.*shape"):
        load_case_arrays(case)

    incomplete = CaseRecord("case01", case.folder, {"t1": case.images["t1"]}, None)
    with pytest.raises(DataError, match=r"case case01: missing modalities \['t1ce', 't2', 'flair'\]"):
        load_case_arrays(incomplete)


def test_load_case_arrays_bad_labels_name_the_seg_file(tmp_path):
    write_case(tmp_path, "case01")
    (case,) = discover_cases(tmp_path)
    seg = label_volume()
    seg[0, 0, 0] = 3
    save(Path(case.seg), seg)

    with pytest.raises(DataError, match=r"case case01: .*case01_seg\.nii\.gz.*\[3\]"):
        load_case_arrays(case)


def test_load_case_arrays_truncated_file(tmp_path):
    write_case(tmp_path, "case01")
    (case,) = discover_cases(tmp_path)
    path = Path(case.images["flair"])
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:1000]))

    with pytest.raises(DataError, match=r"case01_flair\.nii\.gz"):
        load_case_arrays(case)
