"""Helpers shared by tests (importable as ``tests.helpers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_config(data_root: Path, storage: Path, **sections: dict[str, Any]):
    """A config for fast tests: tiny model, 32^3 patches, few epochs; ``sections`` override fields."""
    from raysemi.config import RaysemiConfig

    raw: dict[str, Any] = {
        "data": {"root": str(data_root), "labeled_fraction": 0.3, "validation_fraction": 0.2, "seed": 0,
                 "patch_size": [32, 32, 32], "patches_per_volume": 2, "augment": True},
        "model": {"preset": "tiny", "mc_passes": 2, "sw_batch_size": 2},
        "curriculum": {"stages": 2, "epochs_per_stage": 1},
        "train": {"storage_path": str(storage), "run_name": "test", "num_workers": 1, "epochs": 2,
                  "batch_size": 2, "val_max_cases": 2, "max_failures": 2},
        "tracking": {"uri": f"sqlite:///{storage / 'mlflow.db'}", "experiment": "raysemi-tests",
                     "register_model": "raysemi-test"},
    }
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields)
    return RaysemiConfig.from_dict(raw)
