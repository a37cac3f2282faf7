"""Ray Data: from the split manifest to a stream of training patches.

The stream has one row per (case, repeat) at first, one block each, so that a block never holds
more than one volume. A ``flat_map`` task decodes the NIfTI files, preprocesses the volume and
returns only its patches: whole volumes never enter the object store, and at most a few volumes
are decoded at once (one per running task), whatever the number of cases.

``repeat`` r of a case is its r-th epoch: patch positions and augmentation are seeded by
(seed, case id, r), so a run is reproducible and every epoch sees new patches. The training loop
draws ``steps_per_epoch`` batches per epoch from one iterator over the whole stream.

Pseudo-labeled cases travel with their pseudo-label and training mask (high / low / ignored
voxels); labeled cases carry their ground truth and ``is_pseudo = False``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray

from raysemi.data.brats import CaseRecord
from raysemi.data.nifti import labels_to_internal
from raysemi.data.transforms import MASK_HIGH, MASK_IGNORE, case_seed, preprocess_case, sample_patches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingItem:
    """One case of a training stream.

    Attributes:
        case: the case record (its images; ``seg`` is used when ``pseudo_label`` is None).
        pseudo_label: NIfTI pseudo-label in the case's RAS frame, BraTS labels (0, 1, 2, 4), or None.
        mask: NIfTI training mask in the same frame (0 ignore, 1 high, 2 low), with ``pseudo_label``.
        unlabeled: a case without any label (the Mean Teacher baseline): label 0 and mask "ignore"
            everywhere, ``is_pseudo`` True; its seg on disk (hidden truth) is never read.
    """

    case: CaseRecord
    pseudo_label: str | None = None
    mask: str | None = None
    unlabeled: bool = False

    def to_row(self, repeat: int) -> dict[str, Any]:
        return {
            "case_json": json.dumps(self.case.to_dict()),
            "pseudo_label": self.pseudo_label or "",
            "mask": self.mask or "",
            "unlabeled": self.unlabeled,
            "repeat": repeat,
        }


@dataclass(frozen=True)
class PatchSpec:
    patch_size: tuple[int, int, int]
    patches_per_volume: int
    foreground_ratio: float
    augment: bool
    seed: int

    @classmethod
    def from_config(cls, data_cfg: Any, seed: int) -> "PatchSpec":
        return cls(
            patch_size=tuple(data_cfg.patch_size),
            patches_per_volume=data_cfg.patches_per_volume,
            foreground_ratio=data_cfg.foreground_ratio,
            augment=data_cfg.augment,
            seed=seed,
        )


def patches_for_row(row: dict[str, Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Decode one case and return its training patches (the body of the ``flat_map`` task).

    A case that fails to load here (it passed validation, so the file changed or the disk failed)
    is logged and skipped: one bad scan never stops a long run.
    """
    patch_spec = PatchSpec(**{**spec, "patch_size": tuple(spec["patch_size"])})
    case = CaseRecord.from_dict(json.loads(row["case_json"]))
    is_pseudo = bool(row["pseudo_label"]) or bool(row.get("unlabeled"))
    try:
        if row.get("unlabeled"):
            prepared = preprocess_case(case, with_seg=False)
            label = np.zeros(prepared.brain.shape, dtype=np.uint8)
            mask = np.full(label.shape, MASK_IGNORE, dtype=np.uint8)
        elif is_pseudo:
            prepared = preprocess_case(
                case, with_seg=False, extra_paths={"label": row["pseudo_label"], "mask": row["mask"]}
            )
            label = labels_to_internal(prepared.extra["label"].astype(np.int16))
            mask = prepared.extra["mask"].astype(np.uint8)
        else:
            prepared = preprocess_case(case, with_seg=True)
            if prepared.label is None:
                raise ValueError(f"case {case.case_id}: labeled case has no seg file")
            label = prepared.label
            mask = np.full(label.shape, MASK_HIGH, dtype=np.uint8)
        patches = sample_patches(
            prepared,
            label,
            mask,
            patch_spec.patch_size,
            patch_spec.patches_per_volume,
            patch_spec.foreground_ratio,
            patch_spec.augment,
            seed=case_seed(patch_spec.seed, case.case_id, int(row["repeat"])),
        )
    except Exception as exc:  # noqa: BLE001 - reported and skipped, see docstring
        log.error("skipping case %s in the training stream: %s", case.case_id, exc)
        return []
    for patch in patches:
        patch["is_pseudo"] = is_pseudo
    return patches


def training_dataset(items: list[TrainingItem], spec: PatchSpec, repeats: int) -> ray.data.Dataset:
    """A lazy Ray Dataset of training patches: ``repeats`` passes over ``items``.

    Each pass visits the cases in a seeded random order. Columns: ``image`` (4, P, P, P) float32,
    ``label`` (P, P, P) uint8, ``mask`` (P, P, P) uint8, ``is_pseudo`` bool.
    """
    if not items:
        raise ValueError("training_dataset: no cases to train on")
    rows = []
    for repeat in range(repeats):
        order = np.random.default_rng([spec.seed, repeat]).permutation(len(items))
        rows.extend(items[i].to_row(repeat) for i in order)
    spec_dict = asdict(spec)
    return ray.data.from_items(rows, override_num_blocks=len(rows)).flat_map(
        patches_for_row, fn_kwargs={"spec": spec_dict}
    )


def configure_data_context(object_store_memory_gb: float | None) -> None:
    """Bound the memory Ray Data's streaming executor may hold in the object store."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # training logs its own progress; bars garble job logs
    if object_store_memory_gb:
        context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
            object_store_memory=int(object_store_memory_gb * 1024**3)
        )


def balance_labeled(labeled: list[TrainingItem], others: list[TrainingItem], share: float | None) -> list[TrainingItem]:
    """Repeat the labeled items so that they make up at least ``share`` of the stream.

    With 8 labeled and 24 pseudo-labeled scans, a plain mix is 25 % ground truth; semi-supervised
    recipes (UA-MT, Mean Teacher) give every batch a fixed labeled part instead. ``share`` None keeps
    the plain mix.
    """
    if not share or not labeled or not others:
        return labeled + others
    needed = share / (1.0 - share) * len(others)
    repeats = max(1, int(np.ceil(needed / len(labeled) - 1e-9)))
    return labeled * repeats + others

