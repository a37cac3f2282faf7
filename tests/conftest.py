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
