"""PseudoLabelPool: ranking, admission, versioned updates, snapshots on disk and restore."""

from __future__ import annotations

import dataclasses
import json

import pytest

from raysemi.errors import DataError
from raysemi.semi.curriculum import CurriculumSchedule
from raysemi.semi.pool import SNAPSHOT_SCHEMA_VERSION, PoolRecord, PseudoLabelPool

CONFIDENCES = {"case_c": 0.9, "case_a": 0.7, "case_b": 0.7, "case_d": 0.3, "case_e": 0.5, "case_f": 0.1}


def _record(case_id, confidence):
    return PoolRecord(
        case_id=case_id,
        confidence=confidence,
        initial_confidence=confidence,
        label_path=f"pseudo/{case_id}_label_v1.nii.gz",
        uncertainty_path=f"pseudo/{case_id}_uncertainty_v1.nii.gz",
        mask_path=f"pseudo/{case_id}_mask_v1.nii.gz",
        truth_path=f"hidden/{case_id}_seg.nii.gz" if case_id == "case_a" else None,
    )


def _filled_pool(snapshot_path, schedule=None):
    pool = PseudoLabelPool(snapshot_path, schedule or CurriculumSchedule(stages=3))
    for case_id, confidence in CONFIDENCES.items():
        pool.add(_record(case_id, confidence))
    return pool


def _snapshot(path):
    return json.loads(path.read_text())


def test_ranked_by_confidence_then_case_id():
    pool = _filled_pool(None)
    assert [record.case_id for record in pool.ranked()] == ["case_c", "case_a", "case_b", "case_e", "case_d", "case_f"]
    assert len(pool) == 6


def test_add_starts_history_and_rejects_duplicates_and_bad_confidence():
    pool = _filled_pool(None)
    record = pool.get("case_a")
    assert record.version == 1
    assert record.history == [
        {
            "version": 1,
            "confidence": 0.7,
            "agreement": None,
            "stage": 0,
            "label_path": "pseudo/case_a_label_v1.nii.gz",
            "uncertainty_path": "pseudo/case_a_uncertainty_v1.nii.gz",
            "mask_path": "pseudo/case_a_mask_v1.nii.gz",
        }
    ]
    with pytest.raises(ValueError, match="case_a is already"):
        pool.add(_record("case_a", 0.2))
    with pytest.raises(DataError, match="case_z: confidence"):
        pool.add(_record("case_z", float("nan")))


def test_fraction_admission_per_stage_and_first_admitted_stage():
    pool = _filled_pool(None, CurriculumSchedule(stages=3))  # fractions 1/3, 2/3, 1 of 6 scans: 2, 4, 6
    stage_1 = pool.admit(1)
    assert [record.case_id for record in stage_1] == ["case_c", "case_a"]
    assert [record.case_id for record in pool.admit(2)] == ["case_c", "case_a", "case_b", "case_e"]
    assert pool.get("case_c").admitted_stage == 1
    assert pool.get("case_e").admitted_stage == 2
    assert pool.get("case_f").admitted_stage is None
    assert pool.stats()["admitted"] == 4
    assert pool.stats()["ever_admitted"] == 4
    assert pool.stats()["current_stage"] == 2


def test_threshold_admission_per_stage():
    schedule = CurriculumSchedule(stages=3, mode="threshold", thresholds=[0.8, 0.5, 0.0])
    pool = _filled_pool(None, schedule)
    assert [record.case_id for record in pool.admit(1)] == ["case_c"]
    assert [record.case_id for record in pool.admit(2)] == ["case_c", "case_a", "case_b", "case_e"]
    assert len(pool.admit(3)) == 6


def test_update_bumps_version_appends_history_and_changes_ranking():
    pool = _filled_pool(None)
    pool.admit(1)
    updated = pool.update(
        "case_f",
        confidence=0.95,
        agreement=0.8,
        label_path="pseudo/case_f_label_v2.nii.gz",
        uncertainty_path="pseudo/case_f_uncertainty_v2.nii.gz",
        mask_path="pseudo/case_f_mask_v2.nii.gz",
        stage=1,
    )
    assert updated.version == 2
    assert updated.initial_confidence == 0.1
    assert updated.label_path == "pseudo/case_f_label_v2.nii.gz"
    assert [entry["version"] for entry in updated.history] == [1, 2]
    assert updated.history[-1] == {
        "version": 2,
        "confidence": 0.95,
        "agreement": 0.8,
        "stage": 1,
        "label_path": "pseudo/case_f_label_v2.nii.gz",
        "uncertainty_path": "pseudo/case_f_uncertainty_v2.nii.gz",
        "mask_path": "pseudo/case_f_mask_v2.nii.gz",
    }
    assert pool.ranked()[0].case_id == "case_f"
    # stage 2 re-selects from the new ranking: case_f is now first
    assert [record.case_id for record in pool.admit(2)] == ["case_f", "case_c", "case_a", "case_b"]
    assert pool.get("case_f").admitted_stage == 2
    stats = pool.stats()
    assert stats["versions"] == {"1": 5, "2": 1}
    assert stats["agreement_mean"] == pytest.approx(0.8)
    assert stats["confidence_max"] == pytest.approx(0.95)
    assert stats["confidence_min"] == pytest.approx(0.3)
    assert stats["confidence_mean"] == pytest.approx((0.9 + 0.7 + 0.7 + 0.3 + 0.5 + 0.95) / 6)
    with pytest.raises(KeyError, match="case_q"):
        pool.update("case_q", 0.5, 0.5, "l", "u", "m", stage=1)


def test_repeated_admit_for_a_stage_returns_the_recorded_admission():
    pool = _filled_pool(None)
    first = [record.case_id for record in pool.admit(1)]
    pool.update("case_f", 0.99, 0.9, "l2", "u2", "m2", stage=1)  # re-ranks before a resumed admit(1)
    assert [record.case_id for record in pool.admit(1)] == first


def test_returned_records_are_copies():
    pool = _filled_pool(None)
    pool.get("case_a").confidence = 0.0
    pool.records()[0].history.clear()
    assert pool.get("case_a").confidence == 0.7
    assert len(pool.records()[0].history) == 1


def test_snapshot_written_after_every_change(tmp_path):
    path = tmp_path / "pool" / "snapshot.json"
    pool = PseudoLabelPool(path, CurriculumSchedule(stages=3))
    assert not path.exists()

    pool.add(_record("case_a", 0.7))
    assert [record["case_id"] for record in _snapshot(path)["records"]] == ["case_a"]
    assert _snapshot(path)["schema_version"] == SNAPSHOT_SCHEMA_VERSION

    pool.add(_record("case_b", 0.4))
    assert len(_snapshot(path)["records"]) == 2

    pool.admit(1)
    assert _snapshot(path)["admissions"] == {"1": ["case_a"]}
    assert _snapshot(path)["current_stage"] == 1

    pool.update("case_b", 0.8, 0.6, "l2", "u2", "m2", stage=1)
    saved_b = _snapshot(path)["records"][1]
    assert saved_b["version"] == 2 and saved_b["confidence"] == 0.8 and saved_b["label_path"] == "l2"
    # atomic writes leave no temporary files behind
    assert sorted(entry.name for entry in path.parent.iterdir()) == ["snapshot.json"]


def test_restore_gives_identical_records_and_keeps_snapshotting(tmp_path):
    path = tmp_path / "snapshot.json"
    pool = _filled_pool(path)
    pool.admit(1)
    pool.update("case_d", 0.85, 0.75, "l2", "u2", "m2", stage=1)
    pool.admit(2)

    restored = PseudoLabelPool.restore(path, CurriculumSchedule(stages=3))
    assert restored.records() == pool.records()
    assert [dataclasses.asdict(r) for r in restored.ranked()] == [dataclasses.asdict(r) for r in pool.ranked()]
    assert restored.stats() == pool.stats()
    assert [r.case_id for r in restored.admitted(1)] == [r.case_id for r in pool.admitted(1)]
    # the constructor restores an existing snapshot as well
    assert PseudoLabelPool(path, CurriculumSchedule(stages=3)).records() == pool.records()

    restored.update("case_a", 0.2, 0.1, "l2", "u2", "m2", stage=2)
    assert PseudoLabelPool.restore(path, CurriculumSchedule(stages=3)).get("case_a").version == 2


def test_restore_of_a_missing_snapshot_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        PseudoLabelPool.restore(tmp_path / "missing.json", CurriculumSchedule())


def _corrupt(path, edit):
    data = _snapshot(path)
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema_version=99), "'schema_version' is 99"),
        (lambda d: d.update(records={}), "'records' must be a list"),
        (lambda d: d["records"][1].pop("mask_path"), r"records\[1\] \(case case_a\): field 'mask_path' is missing"),
        (lambda d: d["records"][0].update(confidence="high"), r"records\[0\] \(case case_c\): field 'confidence'"),
        (lambda d: d["records"][0].update(confidence=1.5), "field 'confidence' must be a number in"),
        (lambda d: d["records"][2].update(version=0), "field 'version' must be an integer >= 1"),
        (lambda d: d["records"][0].update(colour="red"), "unknown fields"),
        (lambda d: d["records"].append(dict(d["records"][0])), "repeats case case_c"),
        (lambda d: d["admissions"].update({"2": ["case_zz"]}), "'admissions.2'.*case_zz"),
    ],
)
def test_corrupt_snapshot_names_file_and_field(tmp_path, edit, message):
    path = tmp_path / "snapshot.json"
    pool = _filled_pool(path)
    pool.admit(1)
    _corrupt(path, edit)
    with pytest.raises(DataError, match=message) as error:
        PseudoLabelPool.restore(path, CurriculumSchedule(stages=3))
    assert str(path) in str(error.value)


def test_snapshot_that_is_not_json_is_reported(tmp_path):
    path = tmp_path / "snapshot.json"
    path.write_text('{"schema_version": 1, "records": [')
    with pytest.raises(DataError, match="not valid JSON") as error:
        PseudoLabelPool(path, CurriculumSchedule())
    assert str(path) in str(error.value)


def test_snapshot_checks_cover_every_record_field():
    from raysemi.semi.pool import _FIELD_CHECKS

    assert set(_FIELD_CHECKS) == {f.name for f in dataclasses.fields(PoolRecord)}
