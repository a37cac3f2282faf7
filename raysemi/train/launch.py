"""Ray at the edge: connect to a cluster and run one TorchTrainer fit."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysemi.config import RaysemiConfig
from raysemi.data.pipeline import configure_data_context
from raysemi.train.loop import TrainJob, train_loop_per_worker

log = logging.getLogger(__name__)

SCORE_METRIC = "val_dice_mean_regions"


def ensure_ray(cfg: RaysemiConfig) -> None:
    """Connect to ``RAY_ADDRESS`` (a cluster, or the job's cluster under ``ray job submit``) or start a
    local instance; bound Ray Data's object store use by ``data.object_store_memory_gb``."""
    if not ray.is_initialized():
        kwargs = {}
        if not os.environ.get("RAY_ADDRESS") and cfg.data.object_store_memory_gb:
            kwargs["object_store_memory"] = int(cfg.data.object_store_memory_gb * 1024**3)
        # Workers import raysemi from the same environment; keep driver logs readable.
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True, **kwargs)
    configure_data_context(cfg.data.object_store_memory_gb)


def use_gpu(cfg: RaysemiConfig) -> bool:
    if cfg.train.use_gpu == "yes":
        return True
    if cfg.train.use_gpu == "no":
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


def fit(cfg: RaysemiConfig, job: TrainJob, dataset: ray.data.Dataset, storage: Path, name: str) -> ray.train.Result:
    """One TorchTrainer fit in ``storage/name``; rerunning with the same folder resumes from its checkpoint.

    A worker that dies is restarted from the last checkpoint up to ``train.max_failures`` times.
    """
    gpu = use_gpu(cfg)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "job": asdict(job)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute=SCORE_METRIC,
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": dataset},
    )
    return trainer.fit()


def best_checkpoint_dir(result: ray.train.Result) -> str:
    """The kept checkpoint with the highest validation Dice (the latest if none has the metric)."""
    scored = [(m.get(SCORE_METRIC, float("-inf")), c) for c, m in (result.best_checkpoints or [])]
    scored = [(s if s == s else float("-inf"), c) for s, c in scored]
    if scored:
        return max(scored, key=lambda pair: pair[0])[1].path
    if result.checkpoint is None:
        raise RuntimeError(f"training in {result.path} left no checkpoint")
    return result.checkpoint.path
