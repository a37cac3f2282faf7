"""Tests for raysemi.data.brats: discovery, validation, split, manifest (real NIfTI files)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from raysemi.data.brats import (
    CaseProblem,
    CaseRecord,
    Split,
    check_case_id,
    discover_cases,
    make_split,
    read_manifest,
    validate_case,
    validate_cases,
)
from raysemi.errors import DataError

from ._cases import AFFINE, SHAPE, case_file, label_volume, save, write_case

# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def test_discovers_brats2021_naming(tmp_path):
    write_case(tmp_path, "BraTS2021_00002")
    write_case(tmp_path, "BraTS2021_00001")

    cases = discover_cases(tmp_path)

    assert [c.case_id for c in cases] == ["BraTS2021_00001", "BraTS2021_00002"]
    case = cases[0]
    assert list(case.images) == ["t1", "t1ce", "t2", "flair"]
    assert case.images["t1ce"] == str(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz")
    assert case.images["t1"] == str(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz")
    assert case.seg == str(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
    assert case.folder == str(tmp_path / "BraTS2021_00001")
    assert case.labeled and case.site is None


def test_discovers_brats2023_naming_and_maps_modalities(tmp_path):
    write_case(tmp_path, "BraTS-GLI-00001-000", naming="2023")

    (case,) = discover_cases(tmp_path)

    folder = tmp_path / "BraTS-GLI-00001-000"
    assert case.case_id == "BraTS-GLI-00001-000"
    assert case.images == {
        "t1": str(folder / "BraTS-GLI-00001-000-t1n.nii.gz"),
        "t1ce": str(folder / "BraTS-GLI-00001-000-t1c.nii.gz"),
        "t2": str(folder / "BraTS-GLI-00001-000-t2w.nii.gz"),
        "flair": str(folder / "BraTS-GLI-00001-000-t2f.nii.gz"),
    }
    assert case.seg == str(folder / "BraTS-GLI-00001-000-seg.nii.gz")


def test_mixed_root_with_unlabeled_case_and_plain_nii(tmp_path):
    write_case(tmp_path, "BraTS2021_00001")
    write_case(tmp_path, "BraTS-GLI-00001-000", naming="2023", with_seg=False)
    rng = np.random.default_rng(1)
    for modality in ("t1", "t1ce", "t2", "flair", "seg"):
        save(case_file(tmp_path, "plain01", modality, ext=".nii"), rng.normal(size=SHAPE).astype(np.float32))
    (tmp_path / "notes").mkdir()  # a folder without BraTS files is not a case
    (tmp_path / "notes" / "readme.txt").write_text("x")

    cases = {c.case_id: c for c in discover_cases(tmp_path)}

    assert sorted(cases) == ["BraTS-GLI-00001-000", "BraTS2021_00001", "plain01"]
    assert cases["BraTS-GLI-00001-000"].seg is None
    assert not cases["BraTS-GLI-00001-000"].labeled
    assert cases["plain01"].images["flair"].endswith("plain01_flair.nii")


def test_case_with_missing_modality_is_still_discovered(tmp_path):
    write_case(tmp_path, "case01", modalities=("t1", "t2", "flair"))

    (case,) = discover_cases(tmp_path)

    assert list(case.images) == ["t1", "t2", "flair"]


def test_site_from_json_then_csv(tmp_path):
    write_case(tmp_path / "data", "case01", site="A")
    write_case(tmp_path / "data", "case02")
    write_case(tmp_path / "data", "case03")
    site_map = tmp_path / "sites.csv"
    # case01's json wins over the CSV; case03 is in neither
    site_map.write_text("case_id,site,scanner\ncase01,Z,x\ncase02,B,y\n")

    sites_with_csv = {c.case_id: c.site for c in discover_cases(tmp_path / "data", site_map=str(site_map))}
    sites_without_csv = {c.case_id: c.site for c in discover_cases(tmp_path / "data")}

    assert sites_with_csv == {"case01": "A", "case02": "B", "case03": None}
    assert sites_without_csv == {"case01": "A", "case02": None, "case03": None}


def test_site_csv_without_required_columns_is_rejected(tmp_path):
    write_case(tmp_path / "data", "case01")
    site_map = tmp_path / "sites.csv"
    site_map.write_text("id,centre\ncase01,A\n")

    with pytest.raises(DataError, match="case_id,site"):
        discover_cases(tmp_path / "data", site_map=site_map)


def test_missing_root_is_rejected(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nowhere")


def test_empty_root_names_root_and_layouts(tmp_path):
    (tmp_path / "empty_case").mkdir()

    with pytest.raises(DataError) as caught:
        discover_cases(tmp_path)

    message = str(caught.value)
    assert str(tmp_path) in message
    assert "<id>_{t1,t1ce,t2,flair,seg}" in message and "<id>-{t1n,t1c,t2w,t2f,seg}" in message


def test_duplicate_case_id_in_two_folders_names_both(tmp_path):
    write_case(tmp_path, "case01")
    copy = tmp_path / "case01_copy"
    copy.mkdir()
    for source in (tmp_path / "case01").iterdir():
        (copy / source.name).write_bytes(source.read_bytes())

    with pytest.raises(DataError, match="duplicate case id 'case01'") as caught:
        discover_cases(tmp_path)

    assert str(tmp_path / "case01") in str(caught.value)
    assert str(copy) in str(caught.value)


def test_same_id_in_2021_and_2023_naming_is_a_duplicate(tmp_path):
    write_case(tmp_path, "case01", naming="2021")
    write_case(tmp_path, "case01", naming="2023")

    with pytest.raises(DataError, match="duplicate case id 'case01'") as caught:
        discover_cases(tmp_path)

    assert "case01_" in str(caught.value) and "case01-" in str(caught.value)


def test_hidden_files_are_ignored(tmp_path):
    # macOS copies leave "._<name>" resource-fork files; interrupted atomic writes leave ".<name>.tmp" files.
    write_case(tmp_path, "case01")
    (tmp_path / "case01" / "._case01_t1.nii.gz").write_bytes(b"resource fork")
    (tmp_path / "case01" / ".case01_seg.nii.gz.x1.tmp.nii.gz").write_bytes(b"")

    (case,) = discover_cases(tmp_path)

    assert case.images["t1"] == str(tmp_path / "case01" / "case01_t1.nii.gz")
    assert case.seg == str(tmp_path / "case01" / "case01_seg.nii.gz")


def test_folder_mixing_two_case_ids_is_rejected(tmp_path):
    write_case(tmp_path, "case01")
    save(tmp_path / "case01" / "case02_t1.nii.gz", np.zeros(SHAPE, np.float32))

    with pytest.raises(DataError, match="several case ids"):
        discover_cases(tmp_path)


@pytest.mark.parametrize("file_id", ["a..b", "case$1", "case 1", "-case", "_case"])
def test_unsafe_case_id_from_file_names_is_rejected(tmp_path, file_id):
    save(tmp_path / "folder" / f"{file_id}_t1.nii.gz", np.zeros(SHAPE, np.float32))

    with pytest.raises(DataError, match="not safe as an output file name"):
        discover_cases(tmp_path)


@pytest.mark.parametrize("case_id", ["/abs", "a/b", "a\\b", "..", "../x", ".hidden", "x\x00y", ".", "", "ok\n"])
def test_unsafe_case_id_is_rejected_by_record(case_id):
    with pytest.raises(DataError, match="not safe"):
        CaseRecord(case_id, "/data/x", {}, None)


@pytest.mark.parametrize("case_id", ["BraTS2021_00000", "BraTS-GLI-00000-000", "a.b_c-1", "0"])
def test_safe_case_ids_pass(case_id):
    assert check_case_id(case_id) == case_id


def test_case_record_dict_round_trip():
    record = CaseRecord("c1", "/d/c1", {"t1": "/d/c1/t1.nii.gz", "flair": "/d/c1/f.nii.gz"}, None, "B")

    restored = CaseRecord.from_dict(json.loads(json.dumps(record.to_dict())))

    assert restored == record
    assert list(restored.images) == ["t1", "flair"]


# ---------------------------------------------------------------------------------------------
# Validation, each failure on a real broken file
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def good_case(tmp_path) -> CaseRecord:
    write_case(tmp_path, "case01")
    (case,) = discover_cases(tmp_path)
    return case


def test_good_case_has_no_problems(good_case):
    assert validate_case(good_case, require_seg=True) == []


def test_missing_modality(tmp_path):
    write_case(tmp_path, "case01", modalities=("t1", "t1ce", "t2"))
    (case,) = discover_cases(tmp_path)

    problems = validate_case(case)

    assert [(p.field, p.file) for p in problems] == [("flair", "")]
    assert "missing" in problems[0].problem


def test_missing_seg_only_reported_when_required(tmp_path):
    write_case(tmp_path, "case01", with_seg=False)
    (case,) = discover_cases(tmp_path)

    assert validate_case(case) == []
    assert [p.field for p in validate_case(case, require_seg=True)] == ["seg"]


def test_shape_mismatch(good_case):
    save(Path(good_case.images["t2"]), np.zeros((12, 10, 9), np.float32))

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("shape", good_case.images["t2"])]
    assert "(12, 10, 9)" in problems[0].problem and "(12, 10, 8)" in problems[0].problem


def test_affine_mismatch_in_seg(good_case):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    save(Path(good_case.seg), label_volume(), affine=shifted)

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("affine", good_case.seg)]


def test_affine_difference_below_tolerance_is_accepted(good_case):
    nearly = AFFINE.copy()
    nearly[0, 3] += 1e-6
    save(Path(good_case.images["flair"]), np.ones(SHAPE, np.float32), affine=nearly)

    assert validate_case(good_case) == []


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_intensities(good_case, bad_value):
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = bad_value
    data[4, 5, 6] = bad_value
    save(Path(good_case.images["t1"]), data)

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("t1", good_case.images["t1"])]
    assert problems[0].problem.startswith("2 voxel(s) are NaN or infinite")


@pytest.mark.parametrize("kept_fraction", [0.01, 0.5], ids=["inside-header", "inside-data"])
def test_file_cut_short_is_a_problem_not_a_crash(good_case, kept_fraction):
    # A complete gzip stream around a NIfTI file that was cut short before compression.
    path = Path(good_case.images["t1ce"])
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: int(len(raw) * kept_fraction)]))

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("t1ce", str(path))]
    assert "truncated" in problems[0].problem


def test_truncated_gzip_stream_cut_mid_data(good_case):
    # Cut the compressed stream itself (no end-of-stream marker), as an interrupted copy does.
    path = Path(good_case.images["flair"])
    compressed = path.read_bytes()
    path.write_bytes(compressed[: len(compressed) * 2 // 3])

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("flair", str(path))]


def test_file_that_is_not_nifti(good_case):
    Path(good_case.images["t2"]).write_bytes(b"this is not an image")

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("t2", good_case.images["t2"])]


@pytest.mark.parametrize("fourth_dim", [2, 1])
def test_4d_image_is_reported(good_case, fourth_dim):
    save(Path(good_case.images["flair"]), np.ones((*SHAPE, fourth_dim), np.float32))

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("flair", good_case.images["flair"])]
    assert "3D" in problems[0].problem


def test_label_value_3_is_reported_with_the_bad_values(good_case):
    seg = label_volume()
    seg[0, 0, 0] = 3
    seg[0, 0, 1] = 7
    save(Path(good_case.seg), seg)

    problems = validate_case(good_case)

    assert [(p.field, p.file) for p in problems] == [("seg", good_case.seg)]
    assert "[3, 7]" in problems[0].problem and "[0, 1, 2, 4]" in problems[0].problem


def test_several_problems_are_all_reported(tmp_path):
    write_case(tmp_path, "case01", modalities=("t1", "t1ce", "t2"))
    (case,) = discover_cases(tmp_path)
    save(Path(case.images["t2"]), np.zeros((12, 10, 9), np.float32))
    seg = label_volume()
    seg[0, 0, 0] = 3
    save(Path(case.seg), seg)

    problems = validate_case(case)

    assert sorted(p.field for p in problems) == ["flair", "seg", "shape"]
    assert all(str(p).startswith("case case01: ") for p in problems)


def test_problem_str_names_case_field_file_and_message():
    problem = CaseProblem("c1", "/d/c1_t1.nii.gz", "t1", "3 voxels are NaN")

    assert str(problem) == "case c1: t1 [/d/c1_t1.nii.gz]: 3 voxels are NaN"


def test_validate_cases_reports_every_case(tmp_path):
    write_case(tmp_path, "good")
    write_case(tmp_path, "nolabel", with_seg=False)
    write_case(tmp_path, "short", modalities=("t1",))
    cases = discover_cases(tmp_path)

    result = validate_cases(cases, require_seg_ids=["nolabel"])

    assert result["good"] == []
    assert [p.field for p in result["nolabel"]] == ["seg"]
    assert [p.field for p in result["short"]] == ["t1ce", "t2", "flair"]


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


def records(n_labeled: int, n_unlabeled: int = 0, site: str | None = None, prefix: str = "c") -> list[CaseRecord]:
    """Records with fake paths: make_split never reads files."""
    result = []
    for i in range(n_labeled + n_unlabeled):
        case_id = f"{prefix}{i:03d}"
        seg = f"/d/{case_id}/{case_id}_seg.nii.gz" if i < n_labeled else None
        result.append(CaseRecord(case_id, f"/d/{case_id}", {"t1": f"/d/{case_id}/t1.nii.gz"}, seg, site))
    return result


def sets_of(split: Split) -> tuple:
    return split.labeled, split.unlabeled, split.validation, split.hidden_truth


def test_split_is_deterministic_and_depends_on_seed():
    cases = records(20, 4)

    first = make_split(cases, labeled_fraction=0.25, validation_fraction=0.2, seed=3)
    again = make_split(cases, labeled_fraction=0.25, validation_fraction=0.2, seed=3)
    other = make_split(cases, labeled_fraction=0.25, validation_fraction=0.2, seed=4)

    assert sets_of(first) == sets_of(again)
    assert sets_of(first) != sets_of(other)


def test_split_ignores_input_order():
    cases = records(20, 4)
    shuffled = cases[:]
    random.Random(0).shuffle(shuffled)

    assert sets_of(make_split(cases, 0.25, 0.2, seed=7)) == sets_of(make_split(shuffled, 0.25, 0.2, seed=7))
    assert sets_of(make_split(cases, 0.25, 0.2, seed=7)) == sets_of(make_split(cases[::-1], 0.25, 0.2, seed=7))


def test_split_sizes_disjointness_and_hidden_truth():
    cases = records(20, 4)
    no_seg = {c.case_id for c in cases if c.seg is None}

    split = make_split(cases, labeled_fraction=0.25, validation_fraction=0.2, seed=0)

    # 20 cases with seg: validation round(0.2 * 20) = 4; labeled round(0.25 * 16) = 4;
    # the other 12 become unlabeled with hidden truth, plus the 4 cases without seg.
    assert (len(split.validation), len(split.labeled), len(split.unlabeled)) == (4, 4, 16)
    all_sets = [set(split.labeled), set(split.unlabeled), set(split.validation)]
    assert set.union(*all_sets) == {c.case_id for c in cases}
    assert sum(len(s) for s in all_sets) == len(cases)
    assert no_seg <= set(split.unlabeled)
    assert set(split.hidden_truth) == set(split.unlabeled) - no_seg
    assert split.excluded == {}
    assert split.labeled == sorted(split.labeled)


@pytest.mark.parametrize(
    ("n_labeled", "labeled_fraction", "validation_fraction", "expected_sizes"),
    [
        (10, 0.5, 0.25, (3, 4, 3)),  # val 2.5 -> 3 (half up), labeled 0.5 * 7 = 3.5 -> 4
        (3, 0.1, 0.1, (1, 1, 1)),  # val 0.3 -> at least 1, labeled 0.2 -> at least 1
        (5, 1.0, 0.0, (0, 5, 0)),  # no validation requested, all labeled
        (10, 0.2, 0.1, (1, 2, 7)),  # val 1, labeled 0.2 * 9 = 1.8 -> 2
    ],
)
def test_split_rounding(n_labeled, labeled_fraction, validation_fraction, expected_sizes):
    split = make_split(records(n_labeled), labeled_fraction, validation_fraction, seed=1)

    assert (len(split.validation), len(split.labeled), len(split.unlabeled)) == expected_sizes


def test_max_labeled_caps_the_labeled_set():
    split = make_split(records(20), labeled_fraction=1.0, validation_fraction=0.1, seed=0, max_labeled=3)

    assert (len(split.validation), len(split.labeled), len(split.unlabeled)) == (2, 3, 15)


def test_site_based_split():
    cases = records(10, site="A", prefix="a") + records(10, site="B", prefix="b") + records(0, 2, site="C", prefix="x")

    split = make_split(
        cases, labeled_fraction=1.0, validation_fraction=0.3, seed=0,
        labeled_sites=["A"], unlabeled_sites=["B"], validation_sites=["B"],
    )

    site = {c.case_id: c.site for c in cases}
    assert {site[c] for c in split.labeled} == {"A"} and len(split.labeled) == 10
    assert {site[c] for c in split.validation} == {"B"} and len(split.validation) == 3
    assert {site[c] for c in split.unlabeled} == {"B"} and len(split.unlabeled) == 7
    assert set(split.hidden_truth) == set(split.unlabeled)
    assert sorted(split.excluded) == ["x000", "x001"]
    assert "'C'" in split.excluded["x000"]


def test_site_in_several_lists_is_partitioned_validation_first():
    cases = records(10, site="A", prefix="a") + records(6, site="B", prefix="b")

    split = make_split(
        cases, labeled_fraction=0.5, validation_fraction=0.3, seed=2,
        labeled_sites=["A"], unlabeled_sites=["A", "B"], validation_sites=["A"],
    )

    site = {c.case_id: c.site for c in cases}
    # site A: validation round(3.0) = 3, labeled round(0.5 * 7) = 4, the other 3 unlabeled
    assert [site[c] for c in split.validation] == ["A"] * 3
    assert [site[c] for c in split.labeled] == ["A"] * 4
    assert sorted(site[c] for c in split.unlabeled) == ["A"] * 3 + ["B"] * 6
    assert not set(split.labeled) & set(split.validation)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labeled_sites": ["Z"]}, r"labeled set is empty.*\['Z'\]"),
        ({"validation_sites": ["C"]}, r"validation set is empty.*\['C'\]"),
        ({"unlabeled_sites": ["Z"]}, r"unlabeled set is empty.*\['Z'\]"),
    ],
)
def test_empty_requested_set_is_an_error(kwargs, message):
    cases = records(6, site="A", prefix="a") + records(0, 2, site="C", prefix="x")

    with pytest.raises(DataError, match=message):
        make_split(cases, labeled_fraction=0.5, validation_fraction=0.2, seed=0, **kwargs)


def test_single_labeled_case_cannot_serve_validation_and_training():
    with pytest.raises(DataError, match=r"labeled set is empty.*1 went to validation"):
        make_split(records(1, 3), labeled_fraction=1.0, validation_fraction=0.2, seed=0)


@pytest.mark.parametrize(("labeled_fraction", "validation_fraction"), [(0.0, 0.1), (1.5, 0.1), (0.5, 1.0), (0.5, -0.1)])
def test_bad_fractions_are_rejected(labeled_fraction, validation_fraction):
    with pytest.raises(DataError, match="fraction"):
        make_split(records(10), labeled_fraction, validation_fraction, seed=0)


def test_exclude_moves_cases_out_of_every_set():
    split = make_split(records(10, 2), labeled_fraction=0.5, validation_fraction=0.2, seed=0)
    victims = {split.labeled[0]: "t1 truncated", split.unlabeled[0]: "NaN"}

    reduced = split.exclude(victims)

    for case_id in victims:
        assert case_id not in reduced.labeled + reduced.unlabeled + reduced.validation + reduced.hidden_truth
    assert reduced.excluded == victims
    assert len(reduced.labeled) == len(split.labeled) - 1


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    cases = records(8, site="A", prefix="a") + records(0, 3, site="B", prefix="b")
    split = make_split(cases, labeled_fraction=0.5, validation_fraction=0.25, seed=5).exclude({"b002": "bad"})
    path = tmp_path / "run" / "manifest.json"

    split.write_manifest(path)
    restored = read_manifest(path)

    assert restored == split
    on_disk = json.loads(path.read_text())
    assert on_disk["cases"]["a001"]["seg"] == "/d/a001/a001_seg.nii.gz"
    assert on_disk["cases"]["b000"]["site"] == "B"
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temp file left


def test_manifest_missing_key_names_file_and_key(tmp_path):
    path = tmp_path / "manifest.json"
    make_split(records(4), 0.5, 0.25, seed=0).write_manifest(path)
    content = json.loads(path.read_text())
    del content["labeled"]
    path.write_text(json.dumps(content))

    with pytest.raises(DataError, match=r"manifest .*manifest\.json: missing key 'labeled'"):
        read_manifest(path)


def test_manifest_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")

    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        read_manifest(path)
    with pytest.raises(DataError, match="cannot read"):
        read_manifest(tmp_path / "absent.json")


def test_manifest_with_unknown_or_unsafe_case_is_rejected(tmp_path):
    path = tmp_path / "manifest.json"
    make_split(records(4), 0.5, 0.25, seed=0).write_manifest(path)
    content = json.loads(path.read_text())

    unknown = {**content, "validation": ["c999"]}
    path.write_text(json.dumps(unknown))
    with pytest.raises(DataError, match="'validation' names cases without a record.*c999"):
        read_manifest(path)

    content["cases"]["c000"]["case_id"] = "../escape"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match="not safe"):
        read_manifest(path)
