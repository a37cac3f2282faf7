"""``state.json`` of a run folder: finished steps and MLflow run ids, so a rerun resumes.

A step is recorded as finished only after its outputs are on disk; the file is replaced
atomically, so a driver killed at any moment leaves the previous, consistent state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raysemi.atomic import atomic_write_json
from raysemi.errors import RaysemiError

STATE_FILE = "state.json"


class RunState:
    """Finished steps (``teacher``, ``pseudo_labels``, ``stage_01`` …) and MLflow run ids of one run."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / STATE_FILE
        self.steps: dict[str, dict[str, Any]] = {}
        self.mlflow: dict[str, str] = {}
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self.steps = dict(raw["steps"])
                self.mlflow = dict(raw["mlflow"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RaysemiError(f"{self.path}: corrupt run state ({exc}); delete it to start the run over") from None

    def done(self, step: str) -> bool:
        return bool(self.steps.get(step, {}).get("done"))

    def get(self, step: str) -> dict[str, Any]:
        return self.steps.get(step, {})

    def finish(self, step: str, **outputs: Any) -> None:
        self.steps[step] = {"done": True, **outputs}
        self.save()

    def set_run_id(self, key: str, run_id: str) -> None:
        self.mlflow[key] = run_id
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"steps": self.steps, "mlflow": self.mlflow})
