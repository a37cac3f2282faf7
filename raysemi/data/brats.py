"""BraTS cases on disk: discovery, validation, and the labeled / unlabeled / validation split.

Layouts read (one folder per case, the folder name does not matter, the file names give the id):

* BraTS 2021: ``<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz``
* BraTS 2023: ``<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (t1n->t1, t1c->t1ce, t2w->t2, t2f->flair)

``.nii`` is accepted as well as ``.nii.gz``. A case without a seg file is unlabeled. The split is
written to a JSON manifest that every later step (and every Ray worker) reads.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from raysemi.atomic import atomic_write_json
from raysemi.data.nifti import (
    DISK_LABELS,
    MODALITIES,
    invalid_label_values,
    open_image,
    read_voxels,
)
from raysemi.errors import DataError

# File name -> (case id, role); role is a modality of MODALITIES or "seg".
_NAMING_SCHEMES: dict[str, tuple[re.Pattern[str], dict[str, str]]] = {
    "BraTS 2021": (
        re.compile(r"^(?P<case_id>.+)_(?P<suffix>t1|t1ce|t2|flair|seg)\.nii(?:\.gz)?$"),
        {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    ),
    "BraTS 2023": (
        re.compile(r"^(?P<case_id>.+)-(?P<suffix>t1n|t1c|t2w|t2f|seg)\.nii(?:\.gz)?$"),
        {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"},
    ),
}
_EXPECTED_LAYOUTS = (
    "<root>/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS 2021) or "
    "<root>/<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz (BraTS 2023)"
)
_SAFE_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_AFFINE_TOLERANCE = 1e-4
_MANIFEST_VERSION = 1


def check_case_id(case_id: str, source: str = "") -> str:
    """Return ``case_id`` if it is safe as a file or folder name inside an output folder.

    Case ids become output paths (``pseudo/<id>_label.nii.gz``), so an id such as ``..`` or
    ``/etc`` would write outside the run folder.

    Raises:
        DataError: when the id does not match ``[A-Za-z0-9][A-Za-z0-9._-]*`` or contains ``..``.
    """
    if not isinstance(case_id, str) or not _SAFE_CASE_ID.fullmatch(case_id) or ".." in case_id:
        where = f" (from {source})" if source else ""
        raise DataError(
            f"case id {case_id!r}{where} is not safe as an output file name: it must match "
            "[A-Za-z0-9][A-Za-z0-9._-]* and must not contain '..'"
        )
    return case_id


@dataclass(frozen=True)
class CaseRecord:
    """Where one case's files are.

    Attributes:
        case_id: the id taken from the file names; safe as a path component.
        folder: the case folder.
        images: modality -> file path, keys in :data:`MODALITIES` order; a missing modality has
            no key (validation reports it).
        seg: the segmentation file, or None for an unlabeled case.
        site: acquisition site, or None when unknown.
    """

    case_id: str
    folder: str
    images: dict[str, str]
    seg: str | None
    site: str | None = None

    def __post_init__(self) -> None:
        # Every record, however built (discovery, manifest, by hand), has an id safe as a path.
        check_case_id(self.case_id, self.folder)
        unknown = set(self.images) - set(MODALITIES)
        if unknown:
            raise DataError(f"case {self.case_id}: unknown modalities {sorted(unknown)}; expected {MODALITIES}")

    @property
    def labeled(self) -> bool:
        """True when a segmentation file exists for the case."""
        return self.seg is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, read back by :meth:`from_dict`."""
        return {
            "case_id": self.case_id,
            "folder": self.folder,
            "images": {m: self.images[m] for m in MODALITIES if m in self.images},
            "seg": self.seg,
            "site": self.site,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseRecord:
        """Rebuild a record from :meth:`to_dict` output.

        Raises:
            DataError: naming the missing key or bad value.
        """
        for key in ("case_id", "folder", "images"):
            if key not in data:
                raise DataError(f"case record {dict(data)!r} lacks key {key!r}")
        images = data["images"]
        if not isinstance(images, Mapping):
            raise DataError(f"case {data['case_id']!r}: 'images' must map modality to path, got {images!r}")
        unknown = set(images) - set(MODALITIES)
        if unknown:
            raise DataError(f"case {data['case_id']!r}: unknown modalities {sorted(unknown)}; expected {MODALITIES}")
        return cls(
            case_id=data["case_id"],
            folder=str(data["folder"]),
            images={m: str(images[m]) for m in MODALITIES if m in images},
            seg=None if data.get("seg") is None else str(data["seg"]),
            site=None if data.get("site") is None else str(data["site"]),
        )


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def discover_cases(root: str | os.PathLike, site_map: str | os.PathLike | None = None) -> list[CaseRecord]:
    """Find all BraTS cases below ``root`` (one folder per case).

    The site of a case comes from ``<case folder>/<id>_site.json`` (``{"site": "A", ...}``, written
    by the demo generator), else from the CSV ``site_map`` (columns ``case_id,site``), else None.

    Args:
        root: folder holding one sub-folder per case.
        site_map: optional CSV file mapping case ids to sites.

    Returns:
        Records sorted by case id; paths are absolute.

    Raises:
        DataError: when ``root`` is not a folder, holds no case, when two files or folders claim
            the same case id or modality, when a folder mixes several case ids, when a case id is
            not safe as an output path component, or when a site file is malformed.
    """
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    csv_sites = _read_site_map(Path(site_map)) if site_map is not None else {}

    records: dict[str, CaseRecord] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _scan_case_folder(folder)
        if found is None:
            continue
        case_id, images, seg = found
        if case_id in records:
            raise DataError(
                f"duplicate case id {case_id!r}: found in {records[case_id].folder} and in {folder}"
            )
        site_file = folder / f"{case_id}_site.json"
        site = _read_site_json(site_file) if site_file.is_file() else csv_sites.get(case_id)
        records[case_id] = CaseRecord(case_id, str(folder), images, seg, site)

    if not records:
        raise DataError(f"no BraTS cases found in {root}; expected {_EXPECTED_LAYOUTS}")
    return [records[case_id] for case_id in sorted(records)]


def _scan_case_folder(folder: Path) -> tuple[str, dict[str, str], str | None] | None:
    """Return (case id, images, seg) for a case folder, or None if it holds no BraTS file."""
    files: dict[str, str] = {}  # role (a modality or "seg") -> path
    first_match: tuple[str, str, str] | None = None  # (case id, scheme, path) of the first file
    # Hidden files are skipped: they include the temporary files of interrupted atomic writes.
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        for scheme, (pattern, roles) in _NAMING_SCHEMES.items():
            match = pattern.match(path.name)
            if match is None:
                continue
            case_id = check_case_id(match["case_id"], str(path))
            role = roles[match["suffix"]]
            if first_match is None:
                first_match = (case_id, scheme, str(path))
            elif case_id != first_match[0]:
                raise DataError(
                    f"folder {folder} holds files of several case ids: {first_match[0]!r} "
                    f"({first_match[2]}) and {case_id!r} ({path}); expected one case per folder"
                )
            elif scheme != first_match[1]:
                raise DataError(
                    f"duplicate case id {case_id!r}: {first_match[2]} ({first_match[1]} naming) and "
                    f"{path} ({scheme} naming); use one naming scheme per case"
                )
            if role in files:
                raise DataError(f"duplicate case id {case_id!r}: {role} given twice, as {files[role]} and {path}")
            files[role] = str(path)
    if first_match is None:
        return None
    images = {m: files[m] for m in MODALITIES if m in files}
    return first_match[0], images, files.get("seg")


def _read_site_json(path: Path) -> str:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read site file ({err})") from err
    if not isinstance(content, dict) or not isinstance(content.get("site"), (str, int)):
        raise DataError(f"{path}: expected a JSON object with a string key 'site', got {content!r}")
    return str(content["site"])


def _read_site_map(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"site map {path}: cannot read ({err})") from err
    if rows and not {"case_id", "site"} <= columns:
        raise DataError(f"site map {path}: expected columns 'case_id,site', got {sorted(columns)}")
    sites: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        case_id, site = (row["case_id"] or "").strip(), (row["site"] or "").strip()
        if case_id in sites and sites[case_id] != site:
            raise DataError(f"site map {path} line {line}: case {case_id!r} listed twice with different sites")
        if case_id and site:
            sites[case_id] = site
    return sites


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseProblem:
    """One thing wrong with a case.

    Attributes:
        case_id: the case.
        file: the offending file, or "" when the problem is a missing file.
        field: what is wrong: a modality, "seg", "shape" or "affine".
        problem: human-readable message that states what was expected.
    """

    case_id: str
    file: str
    field: str
    problem: str

    def __str__(self) -> str:
        where = f" [{self.file}]" if self.file else ""
        return f"case {self.case_id}: {self.field}{where}: {self.problem}"


def validate_case(case: CaseRecord, require_seg: bool = False) -> list[CaseProblem]:
    """Check that a case can be trained on; return every problem found (empty list: ok).

    Checks: all four modalities present and readable (a corrupt or truncated file is a problem,
    not a crash), every file 3D, one shape and affine (``np.allclose``, atol 1e-4) for all
    modalities and the seg, finite image values, seg values within {0, 1, 2, 4}. Each file is read
    once and dropped before the next, so memory stays at about one volume.

    Args:
        case: the case.
        require_seg: report a missing segmentation (for labeled and validation cases).
    """
    problems: list[CaseProblem] = []

    def report(file: str, field_name: str, problem: str) -> None:
        problems.append(CaseProblem(case.case_id, file, field_name, problem))

    for modality in MODALITIES:
        if modality not in case.images:
            report("", modality, f"missing: no {modality} file in {case.folder}")
    if require_seg and case.seg is None:
        report("", "seg", f"missing: this case needs a segmentation file in {case.folder}")

    roles = [(m, case.images[m]) for m in MODALITIES if m in case.images]
    if case.seg is not None:
        roles.append(("seg", case.seg))

    reference: tuple[str, tuple[int, ...], np.ndarray] | None = None  # (path, shape, affine)
    for role, path in roles:
        try:
            image = open_image(path)
        except DataError as err:
            report(path, role, _without_path(err, path))
            continue
        shape = tuple(int(n) for n in image.shape)
        if len(shape) != 3:
            report(path, role, f"expected a 3D volume (X, Y, Z), got shape {shape}")
            continue
        if reference is None:
            reference = (path, shape, image.affine)
        elif shape != reference[1]:
            report(path, "shape", f"shape {shape} differs from {reference[1]} of {reference[0]}; "
                   "all modalities and the seg must share one voxel grid")
        elif not np.allclose(image.affine, reference[2], atol=_AFFINE_TOLERANCE):
            report(path, "affine", f"affine {_format_affine(image.affine)} differs from "
                   f"{_format_affine(reference[2])} of {reference[0]} (atol {_AFFINE_TOLERANCE})")
        try:
            voxels = read_voxels(image, path)
        except DataError as err:
            report(path, role, _without_path(err, path))
            continue
        if role == "seg":
            bad_values = invalid_label_values(voxels, DISK_LABELS)
            if bad_values:
                report(path, role, f"label values {bad_values[:10]} are not BraTS labels; "
                       f"expected only {list(DISK_LABELS)}")
        elif np.issubdtype(voxels.dtype, np.inexact):
            non_finite = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
            if non_finite:
                report(path, role, f"{non_finite} voxel(s) are NaN or infinite; expected finite intensities")
        del voxels
    return problems


def validate_cases(
    cases: Iterable[CaseRecord], require_seg_ids: Iterable[str] = ()
) -> dict[str, list[CaseProblem]]:
    """Validate every case; ``require_seg_ids`` names the cases that must have a segmentation.

    Returns:
        case id -> its problems (an empty list for a good case), for every case given.
    """
    require_seg = set(require_seg_ids)
    return {case.case_id: validate_case(case, require_seg=case.case_id in require_seg) for case in cases}


def _without_path(error: DataError, path: str) -> str:
    # CaseProblem.file already names the file; do not repeat it in the message.
    return str(error).removeprefix(f"{path}: ")


def _format_affine(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=4, separator=",", suppress_small=True).replace("\n", "")


# ---------------------------------------------------------------------------------------------
# Split and manifest
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Which cases train with labels, which without, and which validate.

    Attributes:
        labeled: ids trained with their ground-truth segmentation.
        unlabeled: ids trained only through pseudo-labels.
        validation: ids held out for validation (they all have a segmentation).
        hidden_truth: the unlabeled ids that do have a segmentation on disk. Training must not
            read it; it only serves to score the pseudo-labels of the pool.
        cases: id -> record for every case given to the split, excluded ones included.
        seed: seed of the random permutation.
        labeled_fraction: share of the non-validation labeled cases that keep their labels.
        excluded: id -> reason, for cases in no set.
        validation_fraction: share of the labeled cases held out for validation.
    """

    labeled: list[str]
    unlabeled: list[str]
    validation: list[str]
    hidden_truth: list[str]
    cases: dict[str, CaseRecord]
    seed: int
    labeled_fraction: float
    excluded: dict[str, str] = field(default_factory=dict)
    validation_fraction: float | None = None

    def exclude(self, reasons: Mapping[str, str]) -> Split:
        """Return a copy with the cases in ``reasons`` (id -> reason) moved out of every set."""
        drop = set(reasons)
        return replace(
            self,
            labeled=[c for c in self.labeled if c not in drop],
            unlabeled=[c for c in self.unlabeled if c not in drop],
            validation=[c for c in self.validation if c not in drop],
            hidden_truth=[c for c in self.hidden_truth if c not in drop],
            excluded={**self.excluded, **reasons},
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form of the split (the manifest's content)."""
        return {
            "version": _MANIFEST_VERSION,
            "seed": self.seed,
            "labeled_fraction": self.labeled_fraction,
            "validation_fraction": self.validation_fraction,
            "labeled": list(self.labeled),
            "unlabeled": list(self.unlabeled),
            "validation": list(self.validation),
            "hidden_truth": list(self.hidden_truth),
            "excluded": dict(self.excluded),
            "cases": {case_id: record.to_dict() for case_id, record in sorted(self.cases.items())},
        }

    def write_manifest(self, path: str | os.PathLike) -> None:
        """Write the split, with every case's paths and site, as JSON (atomic replace)."""
        atomic_write_json(path, self.to_dict())


def read_manifest(path: str | os.PathLike) -> Split:
    """Read a manifest written by :meth:`Split.write_manifest`.

    Raises:
        DataError: naming the file and key when the file is missing, not JSON, lacks a key, or
            names a case that has no record.
    """
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"manifest {path}: cannot read ({err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"manifest {path}: not valid JSON ({err})") from err
    if not isinstance(content, dict):
        raise DataError(f"manifest {path}: expected a JSON object, got {type(content).__name__}")

    def get(key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in content:
            raise DataError(f"manifest {path}: missing key {key!r}")
        if not isinstance(content[key], kind):
            raise DataError(f"manifest {path}: key {key!r} has the wrong type {type(content[key]).__name__}")
        return content[key]

    raw_cases = get("cases", dict)
    cases: dict[str, CaseRecord] = {}
    for case_id, raw in raw_cases.items():
        try:
            record = CaseRecord.from_dict(raw if isinstance(raw, dict) else {})
        except DataError as err:
            raise DataError(f"manifest {path}: key 'cases.{case_id}': {err}") from err
        if record.case_id != case_id:
            raise DataError(f"manifest {path}: key 'cases.{case_id}' holds case {record.case_id!r}")
        cases[case_id] = record

    sets = {}
    for key in ("labeled", "unlabeled", "validation", "hidden_truth"):
        ids = get(key, list)
        unknown = [c for c in ids if c not in cases]
        if unknown:
            raise DataError(f"manifest {path}: key {key!r} names cases without a record in 'cases': {unknown}")
        sets[key] = [str(c) for c in ids]
    validation_fraction = content.get("validation_fraction")
    return Split(
        labeled=sets["labeled"],
        unlabeled=sets["unlabeled"],
        validation=sets["validation"],
        hidden_truth=sets["hidden_truth"],
        cases=cases,
        seed=int(get("seed", int)),
        labeled_fraction=float(get("labeled_fraction", (int, float))),
        excluded={str(k): str(v) for k, v in get("excluded", dict).items()},
        validation_fraction=None if validation_fraction is None else float(validation_fraction),
    )


def make_split(
    cases: Sequence[CaseRecord],
    labeled_fraction: float,
    validation_fraction: float,
    seed: int,
    labeled_sites: Sequence[str] | None = None,
    unlabeled_sites: Sequence[str] | None = None,
    validation_sites: Sequence[str] | None = None,
    max_labeled: int | None = None,
) -> Split:
    """Split cases into labeled, unlabeled (pseudo-labeled) and validation sets.

    The ids are sorted, then shuffled with ``numpy.random.default_rng(seed).permutation``, so the
    split depends on the seed and the set of cases only, not on their input order. In that order:

    1. Validation: ``n_val = max(1, round_half_up(validation_fraction * n))`` of the ``n`` cases
       that have a segmentation and whose site is a validation site (0 when the fraction is 0).
    2. Labeled: of the remaining cases with a segmentation from a labeled site,
       ``max(1, round_half_up(labeled_fraction * n))``, capped at ``max_labeled``.
    3. Unlabeled: every other case from an unlabeled site. Those with a segmentation on disk are
       listed in ``hidden_truth``.
    4. Excluded: what is left (site not in the lists that would take it), with the reason.

    A site list of None allows every site (also cases of unknown site); a site may appear in
    several lists.

    Args:
        cases: the cases (unique ids).
        labeled_fraction: in (0, 1], share of the non-validation labeled cases that keep labels.
        validation_fraction: in [0, 1), share of the cases with segmentation held out.
        seed: seed of the permutation.
        labeled_sites, unlabeled_sites, validation_sites: sites allowed in each set (None: all).
        max_labeled: at most this many labeled cases (None: no cap).

    Raises:
        DataError: on bad fractions or duplicate ids, and when the labeled set, the validation
            set (if ``validation_fraction > 0``) or the unlabeled set (if ``unlabeled_sites`` is
            given) ends up empty; the message names the set and its sites.
    """
    if not 0.0 < labeled_fraction <= 1.0:
        raise DataError(f"labeled_fraction must be in (0, 1], got {labeled_fraction}")
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if max_labeled is not None and max_labeled < 1:
        raise DataError(f"max_labeled must be at least 1, got {max_labeled}")
    by_id: dict[str, CaseRecord] = {}
    for case in cases:
        if case.case_id in by_id:
            raise DataError(f"duplicate case id {case.case_id!r}: {by_id[case.case_id].folder} and {case.folder}")
        by_id[case.case_id] = case

    sorted_ids = sorted(by_id)
    order = [sorted_ids[i] for i in np.random.default_rng(seed).permutation(len(sorted_ids))]

    def allowed(case_id: str, sites: Sequence[str] | None) -> bool:
        return sites is None or by_id[case_id].site in sites

    with_seg = [c for c in order if by_id[c].labeled]
    validation: list[str] = []
    if validation_fraction > 0:
        candidates = [c for c in with_seg if allowed(c, validation_sites)]
        if candidates:
            validation = candidates[: max(1, _round_half_up(validation_fraction * len(candidates)))]

    candidates = [c for c in with_seg if c not in validation and allowed(c, labeled_sites)]
    n_labeled = max(1, _round_half_up(labeled_fraction * len(candidates))) if candidates else 0
    if max_labeled is not None:
        n_labeled = min(n_labeled, max_labeled)
    labeled = candidates[:n_labeled]

    taken = set(validation) | set(labeled)
    unlabeled: list[str] = []
    excluded: dict[str, str] = {}
    for case_id in order:
        if case_id in taken:
            continue
        if allowed(case_id, unlabeled_sites):
            unlabeled.append(case_id)
        else:
            excluded[case_id] = (
                f"site {by_id[case_id].site!r} is not an unlabeled site {list(unlabeled_sites or [])}, and the case "
                "was not drawn for the labeled or validation set"
            )

    _require_not_empty(
        "labeled", labeled, labeled_sites, True,
        f" ({len(with_seg)} case(s) have a segmentation, {len(validation)} went to validation)",
    )
    _require_not_empty("validation", validation, validation_sites, validation_fraction > 0)
    _require_not_empty("unlabeled", unlabeled, unlabeled_sites, unlabeled_sites is not None)

    return Split(
        labeled=sorted(labeled),
        unlabeled=sorted(unlabeled),
        validation=sorted(validation),
        hidden_truth=sorted(c for c in unlabeled if by_id[c].labeled),
        cases={c: by_id[c] for c in sorted_ids},
        seed=seed,
        labeled_fraction=labeled_fraction,
        excluded=dict(sorted(excluded.items())),
        validation_fraction=validation_fraction,
    )


def _require_not_empty(
    name: str, ids: list[str], sites: Sequence[str] | None, requested: bool, detail: str = ""
) -> None:
    if requested and not ids:
        where = f"sites {list(sites)}" if sites is not None else "any site"
        need = "with a segmentation " if name in ("labeled", "validation") else ""
        raise DataError(f"the {name} set is empty: no case {need}from {where} was left for it{detail}")


def _round_half_up(value: float) -> int:
    # Python's round() rounds half to even (round(2.5) == 2); half-up is easier to state.
    return math.floor(value + 0.5)
