"""Shared fixtures: one local Ray cluster per test session, generated cases, tiny configs.

Ray Train fits cost 20-30 s of start-up on a 2-core machine, so the tests that need Ray share one
cluster (``ray_cluster``) and one small generated data set (``synth_root``), and use the ``tiny``
model on 32-48^3 volumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Tests never talk to a user's MLflow server or Ray cluster.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the session (4 logical CPUs so that 2 training workers and
    Ray Data tasks fit at once on a 2-core machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, object_store_memory=512 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """10 generated site-A cases of 48^3 at 2 mm (seconds to write)."""
    from raysemi.data.synth import synth_dataset

    root = tmp_path_factory.mktemp("synth") / "cases"
    synth_dataset(root, 10, (48, 48, 48), spacing=(2.0, 2.0, 2.0), seed=7, sites=("A",))
    return root


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
