"""The pseudo-label pool: every unlabeled scan's current pseudo-label version and confidence.

Plain Python; the pipeline wraps one instance in a named Ray actor. After every change the whole
state is written to ``snapshot_path`` atomically, so a crashed run resumes from the last change.

Snapshot format (JSON)::

    {"schema_version": 1,
     "current_stage": 2,                       # last stage admit() was called for, or null
     "admissions": {"1": ["case_a"], "2": ["case_a", "case_b"]},
     "records": [{"case_id": ..., "confidence": ..., ...}, ...]}   # PoolRecord fields
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysemi.atomic import atomic_write_json
from raysemi.errors import DataError
from raysemi.semi.curriculum import CurriculumSchedule

SNAPSHOT_SCHEMA_VERSION = 1


@dataclass
class PoolRecord:
    """One unlabeled scan in the pool.

    Attributes:
        case_id: the case's id.
        confidence: current image-level confidence C, in [0, 1].
        initial_confidence: C of the teacher's pseudo-label (version 1).
        agreement: teacher-student tumour Dice of the last refinement; None before any.
        version: pseudo-label version, 1 for the teacher's, +1 per refinement.
        label_path: current pseudo-label NIfTI.
        uncertainty_path: current uncertainty NIfTI.
        mask_path: current H/L mask NIfTI (see ``raysemi.semi.losses.encode_masks``).
        admitted_stage: first stage that admitted the scan; None if never admitted.
        history: one dict per version: version, confidence, agreement, stage (0 = teacher),
            label_path, uncertainty_path, mask_path. Filled by the pool.
        truth_path: hidden ground truth, only for scoring pseudo-labels in experiments.
    """

    case_id: str
    confidence: float
    initial_confidence: float
    label_path: str
    uncertainty_path: str
    mask_path: str
    agreement: float | None = None
    version: int = 1
    admitted_stage: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    truth_path: str | None = None


def _history_entry(record: PoolRecord, stage: int) -> dict[str, Any]:
    return {
        "version": record.version,
        "confidence": record.confidence,
        "agreement": record.agreement,
        "stage": stage,
        "label_path": record.label_path,
        "uncertainty_path": record.uncertainty_path,
        "mask_path": record.mask_path,
    }


def _check_unit_interval(value: Any, case_id: str, field_name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_number(value) or not 0 <= value <= 1:
        raise DataError(f"case {case_id}: {field_name} must be a number in [0, 1], got {value!r}")


class PseudoLabelPool:
    """Unlabeled scans ranked by confidence, admitted stage by stage, refined version by version.

    Args:
        snapshot_path: JSON file the state is written to after every change; restored from if it
            exists. None keeps the pool in memory only.
        schedule: decides which ranked scans a stage admits.
    """

    def __init__(self, snapshot_path: str | Path | None, schedule: CurriculumSchedule) -> None:
        self.snapshot_path = Path(snapshot_path) if snapshot_path is not None else None
        self.schedule = schedule
        self._records: dict[str, PoolRecord] = {}
        # stage -> admitted case ids; a repeated admit(stage), e.g. after a resume, returns the
        # same scans even if refinement has re-ranked the pool since.
        self._admissions: dict[int, list[str]] = {}
        self.current_stage: int | None = None
        if self.snapshot_path is not None and self.snapshot_path.exists():
            self._load(self.snapshot_path)

    @classmethod
    def restore(cls, path: str | Path, schedule: CurriculumSchedule) -> PseudoLabelPool:
        """A pool rebuilt from an existing snapshot; further changes are written back to it."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"pool snapshot {path} does not exist")
        return cls(path, schedule)

    # -- queries -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._records

    def get(self, case_id: str) -> PoolRecord:
        """A copy of one record (edit the pool through its methods, not the copy)."""
        return copy.deepcopy(self._record(case_id))

    def records(self) -> list[PoolRecord]:
        """Copies of all records, in insertion order."""
        return [copy.deepcopy(record) for record in self._records.values()]

    def ranked(self) -> list[PoolRecord]:
        """Copies of all records by confidence, highest first; ties by case id, for determinism."""
        order = sorted(self._records.values(), key=lambda record: (-record.confidence, record.case_id))
        return [copy.deepcopy(record) for record in order]

    def admitted(self, stage: int) -> list[PoolRecord]:
        """Copies of the records admitted at ``stage``, in admission order; [] if not admitted yet."""
        return [self.get(case_id) for case_id in self._admissions.get(stage, [])]

    def stats(self) -> dict[str, Any]:
        """Summary for logging: count, admitted (at the current stage), ever_admitted,
        confidence mean/min/max, mean agreement (over refined scans), versions histogram, current stage."""
        confidences = [record.confidence for record in self._records.values()]
        agreements = [record.agreement for record in self._records.values() if record.agreement is not None]
        versions = Counter(record.version for record in self._records.values())
        current = self._admissions.get(self.current_stage, []) if self.current_stage is not None else []
        return {
            "count": len(self._records),
            "admitted": len(current),
            "ever_admitted": sum(record.admitted_stage is not None for record in self._records.values()),
            "confidence_mean": sum(confidences) / len(confidences) if confidences else None,
            "confidence_min": min(confidences) if confidences else None,
            "confidence_max": max(confidences) if confidences else None,
            "agreement_mean": sum(agreements) / len(agreements) if agreements else None,
            "versions": {str(version): versions[version] for version in sorted(versions)},
            "current_stage": self.current_stage,
        }

    # -- changes (each one ends with a snapshot) -----------------------------------------------

    def add(self, record: PoolRecord) -> None:
        """Add a scan's first pseudo-label. Its history gets the version-1 entry (stage 0) if empty."""
        if record.case_id in self._records:
            raise ValueError(f"case {record.case_id} is already in the pseudo-label pool")
        _check_unit_interval(record.confidence, record.case_id, "confidence")
        _check_unit_interval(record.initial_confidence, record.case_id, "initial_confidence")
        _check_unit_interval(record.agreement, record.case_id, "agreement", optional=True)
        record = copy.deepcopy(record)
        if not record.history:
            record.history.append(_history_entry(record, stage=0))
        self._records[record.case_id] = record
        self._save()

    def admit(self, stage: int) -> list[PoolRecord]:
        """Admit scans for ``stage`` from the current ranking, via the schedule.

        The first call for a stage selects and records the admission; later calls for the same
        stage return the recorded one. Each admitted record keeps the first stage that admitted it.

        Returns:
            Copies of the admitted records, in ranking order.
        """
        if stage not in self._admissions:
            ranking = [(record.case_id, record.confidence) for record in self.ranked()]
            case_ids = self.schedule.select(stage, ranking)
            for case_id in case_ids:
                if self._records[case_id].admitted_stage is None:
                    self._records[case_id].admitted_stage = stage
            self._admissions[stage] = case_ids
        self.current_stage = stage
        self._save()
        return self.admitted(stage)

    def update(
        self,
        case_id: str,
        confidence: float,
        agreement: float,
        label_path: str,
        uncertainty_path: str,
        mask_path: str,
        stage: int,
    ) -> PoolRecord:
        """Store a refined pseudo-label as the scan's next version; the ranking follows the new C.

        Returns:
            A copy of the updated record.
        """
        record = self._record(case_id)
        _check_unit_interval(confidence, case_id, "confidence")
        _check_unit_interval(agreement, case_id, "agreement")
        record.version += 1
        record.confidence = float(confidence)
        record.agreement = float(agreement)
        record.label_path = str(label_path)
        record.uncertainty_path = str(uncertainty_path)
        record.mask_path = str(mask_path)
        record.history.append(_history_entry(record, stage=stage))
        self._save()
        return copy.deepcopy(record)

    # -- persistence ---------------------------------------------------------------------------

    def _record(self, case_id: str) -> PoolRecord:
        try:
            return self._records[case_id]
        except KeyError:
            raise KeyError(f"case {case_id} is not in the pseudo-label pool") from None

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's content."""
        return {
            "schema_version": SNAPSHOT_SCHEMA_VERSION,
            "current_stage": self.current_stage,
            "admissions": {str(stage): list(case_ids) for stage, case_ids in sorted(self._admissions.items())},
            "records": [dataclasses.asdict(record) for record in self._records.values()],
        }

    def _save(self) -> None:
        if self.snapshot_path is not None:
            atomic_write_json(self.snapshot_path, self.to_dict())

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"pool snapshot {path} is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise DataError(f"pool snapshot {path}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema_version") != SNAPSHOT_SCHEMA_VERSION:
            raise DataError(
                f"pool snapshot {path}: field 'schema_version' is {data.get('schema_version')!r}, "
                f"expected {SNAPSHOT_SCHEMA_VERSION}"
            )
        current_stage = data.get("current_stage")
        if current_stage is not None and not _is_int(current_stage):
            raise DataError(
                f"pool snapshot {path}: field 'current_stage' must be an integer or null, got {current_stage!r}"
            )
        records_data = data.get("records")
        if not isinstance(records_data, list):
            raise DataError(f"pool snapshot {path}: field 'records' must be a list, got {records_data!r}")
        records: dict[str, PoolRecord] = {}
        for index, record_data in enumerate(records_data):
            record = _record_from_dict(record_data, f"pool snapshot {path}: records[{index}]")
            if record.case_id in records:
                raise DataError(f"pool snapshot {path}: records[{index}] repeats case {record.case_id}")
            records[record.case_id] = record
        admissions_data = data.get("admissions")
        if not isinstance(admissions_data, dict):
            raise DataError(f"pool snapshot {path}: field 'admissions' must be an object, got {admissions_data!r}")
        admissions: dict[int, list[str]] = {}
        for stage, case_ids in admissions_data.items():
            where = f"pool snapshot {path}: field 'admissions.{stage}'"
            if not stage.isdigit() or not isinstance(case_ids, list):
                raise DataError(f"{where}: expected a stage number mapping to a list of case ids")
            unknown = [case_id for case_id in case_ids if case_id not in records]
            if unknown:
                raise DataError(f"{where}: names cases not in the records: {unknown}")
            admissions[int(stage)] = list(case_ids)
        self._records = records
        self._admissions = admissions
        self.current_stage = current_stage


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field -> (check, what was expected)
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "case_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "confidence": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "initial_confidence": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "agreement": (lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "a number in [0, 1] or null"),
    "version": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "label_path": (lambda v: isinstance(v, str), "a string"),
    "uncertainty_path": (lambda v: isinstance(v, str), "a string"),
    "mask_path": (lambda v: isinstance(v, str), "a string"),
    "admitted_stage": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(item, dict) for item in v), "a list of objects"),
    "truth_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _record_from_dict(data: Any, where: str) -> PoolRecord:
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected an object, got {data!r}")
    case = data.get("case_id", "?")
    for name, (check, expected) in _FIELD_CHECKS.items():
        if name not in data:
            raise DataError(f"{where} (case {case}): field '{name}' is missing")
        if not check(data[name]):
            raise DataError(f"{where} (case {case}): field '{name}' must be {expected}, got {data[name]!r}")
    unknown = sorted(set(data) - set(_FIELD_CHECKS))
    if unknown:
        raise DataError(f"{where} (case {case}): unknown fields {unknown}")
    values = dict(data)
    for name in ("confidence", "initial_confidence"):
        values[name] = float(values[name])
    if values["agreement"] is not None:
        values["agreement"] = float(values["agreement"])
    return PoolRecord(**values)
