"""The pseudo-label pool as a named Ray actor, one per run.

The pool's logic is the plain :class:`~raysemi.semi.pool.PseudoLabelPool`; this actor only makes it
reachable from the driver, the Tune trials and the batch-inference jobs. The pool snapshots itself
after every change; a restarted actor (``max_restarts=-1``) rebuilds itself from that snapshot,
so a crashed pool loses nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ray

from raysemi.config import CurriculumConfig
from raysemi.semi.curriculum import CurriculumSchedule
from raysemi.semi.pool import PoolRecord, PseudoLabelPool


def schedule_from_config(curriculum: CurriculumConfig) -> CurriculumSchedule:
    return CurriculumSchedule(
        stages=curriculum.stages,
        mode=curriculum.mode,
        fractions=curriculum.fractions,
        thresholds=curriculum.thresholds,
    )


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class PoolActor:
    """Ray actor around :class:`PseudoLabelPool`; records cross the wire as plain dicts."""

    def __init__(self, snapshot_path: str, curriculum: dict[str, Any]) -> None:
        schedule = schedule_from_config(CurriculumConfig(**curriculum))
        self.pool = PseudoLabelPool(snapshot_path, schedule)

    def add(self, records: list[dict[str, Any]]) -> int:
        for record in records:
            if record["case_id"] not in self.pool:
                self.pool.add(PoolRecord(**record))
        return len(self.pool)

    def ranked(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.pool.ranked()]

    def admit(self, stage: int) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.pool.admit(stage)]

    def update(self, case_id: str, **fields: Any) -> dict[str, Any]:
        # Ray re-sends a call whose actor died before replying (max_task_retries=-1). If the dead
        # actor had already applied and snapshotted this refinement, applying it again would add
        # a spurious version; the same stage with the same label file is that retry.
        current = self.pool.get(case_id)
        last = current.history[-1] if current.history else {}
        if last.get("stage") == fields.get("stage") and last.get("label_path") == str(fields.get("label_path")):
            return dataclasses.asdict(current)
        return dataclasses.asdict(self.pool.update(case_id, **fields))

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    def records(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.pool.records()]

    def pid(self) -> int:
        import os

        return os.getpid()


def pool_actor(run_dir: Path, curriculum: CurriculumConfig, name: str) -> "ray.actor.ActorHandle":
    """Get the run's named pool actor, or start it (restoring from ``<run>/pool/snapshot.json``)."""
    import zlib

    snapshot = Path(run_dir) / "pool" / "snapshot.json"
    # The run folder's hash keeps two runs with the same name (tests, Tune trials) apart.
    unique = f"raysemi-pool-{name}-{zlib.crc32(str(Path(run_dir).resolve()).encode()):08x}"
    return PoolActor.options(name=unique, get_if_exists=True, namespace="raysemi").remote(
        str(snapshot), curriculum.model_dump()
    )
