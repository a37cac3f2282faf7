"""Faults on a real local Ray cluster: a training worker, the pool actor and a pseudo-labeling actor die.

1. A Ray Train worker is SIGKILLed in the middle of epoch 2 of a 2-worker teacher fit: the worker
   group restarts from the epoch-1 checkpoint (``train.max_failures``) and finishes the configured
   epochs, each trained, checkpointed and logged to MLflow exactly once. (The one Ray Train fit of
   this file; it also checks what a finished teacher leaves behind: checkpoints, MLflow metrics
   and params, a registered model.)
2. The pool actor is killed after an admission: the restarted actor rebuilds every record and the
   stage-1 admission from ``pool/snapshot.json``.
3. A pseudo-labeling actor kills its own process on one case: Ray Data restarts the actor and
   retries the case; every case comes back exactly once, with its files on disk.

Driver deaths are covered by tests/train/test_run.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import ray
import ray.cloudpickle

from raysemi.inference.predictor import PseudoLabeler
from tests.helpers import tiny_config

# Ray workers cannot import this test module; ship the classes defined here by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _wait_for(condition: Callable[[], Any], timeout: float, what: str, alive: Callable[[], bool] = lambda: True) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        assert alive(), f"gave up waiting for {what}: the work it depends on has stopped"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _pid_alive(pid: int) -> bool:
    """True for a running process (a zombie waiting to be reaped counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    try:
        while pid > 1:
            pid = _parent_pid(pid)
            if pid == ancestor:
                return True
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return False


def _train_worker_pids() -> set[int]:
    """Live Ray Train worker processes of *this* session's cluster.

    Ray titles a training worker's process ``ray::RayTrainWorker...``. Other Ray clusters may run on
    the same machine, so only descendants of this test process (which started the local cluster's
    raylet) count.
    """
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        pid = int(entry.name)
        if b"RayTrainWorker" in title and _pid_alive(pid) and _descends_from(pid, me):
            found.add(pid)
    return found


def _both_train_workers() -> set[int] | None:
    pids = _train_worker_pids()
    return pids if len(pids) == 2 else None


# -- 1. a Ray Train worker dies mid-epoch ----------------------------------------------------------------

EPOCHS = 3


def _registered_checkpoints(run_folder: Path) -> int:
    """Checkpoints the Ray Train controller has registered (what a restarted worker group resumes from)."""
    try:
        snapshot = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(snapshot.get("checkpoint_results", []))


@pytest.fixture(scope="module")
def teacher_with_worker_kill(tmp_path_factory, synth_root, ray_cluster) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from raysemi import tracking
    from raysemi.train.launch import ensure_ray
    from raysemi.train.pipeline import prepare_run, train_teacher

    storage = tmp_path_factory.mktemp("faults") / "runs"
    cfg = tiny_config(
        synth_root,
        storage,
        # Epochs of 16 steps (several seconds each, longer than the controller's 2 s poll) leave
        # time to kill a worker inside one; every checkpoint is kept so that each can be inspected.
        train={"num_workers": 2, "epochs": EPOCHS, "steps_per_epoch": 16, "max_failures": 2,
               "checkpoints_to_keep": EPOCHS, "run_name": "worker-kill"},
    )
    ensure_ray(cfg)
    ctx = prepare_run(cfg)
    outcome: dict[str, Any] = {}

    def fit_teacher() -> None:
        try:
            outcome["teacher"] = train_teacher(ctx)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = exc

    fit_thread = threading.Thread(target=fit_teacher, name="teacher-fit", daemon=True)
    fit_thread.start()
    teacher_dir = ctx.run_dir / "teacher"
    # A checkpoint on disk is not yet one to restart from: the Ray Train controller collects the
    # workers' reports every 2 s and only then registers the checkpoint (in its snapshot file).
    _wait_for(lambda: _registered_checkpoints(teacher_dir), 600, "the first registered checkpoint", fit_thread.is_alive)
    run_id = json.loads((ctx.run_dir / "state.json").read_text())["mlflow"]["teacher"]
    # Rank 0 logs an epoch (metrics, then the learning curve, then the validation overlay) after
    # reporting its checkpoint; once the overlay is in MLflow, both workers are in epoch 2.
    client = MlflowClient(tracking_uri=ctx.mlflow_uri)
    _wait_for(lambda: any(a.path.endswith("teacher_validation_overlay.png") for a in client.list_artifacts(run_id, "plots")),
              120, "epoch 1's plots in MLflow", fit_thread.is_alive)
    workers_before = _wait_for(_both_train_workers, 60, "the 2 training workers")
    victim = min(workers_before)
    os.kill(victim, signal.SIGKILL)
    at_kill = {
        "checkpoints_on_disk": len(list(teacher_dir.glob("checkpoint_*/meta.json"))),
        "registered": _registered_checkpoints(teacher_dir),
        "logged_epochs": [step for step, _ in tracking.metric_history(ctx.mlflow_uri, run_id, "train_loss")],
    }

    # The restarted worker group: two new processes, neither of the old ones.
    workers_after: set[int] = set()
    deadline = time.time() + 600
    while fit_thread.is_alive() and time.time() < deadline:
        workers_after |= _train_worker_pids() - workers_before
        time.sleep(0.5)
    fit_thread.join(timeout=1)
    assert not fit_thread.is_alive(), "the teacher fit did not finish in time"
    if "error" in outcome:
        raise outcome["error"]
    return {"cfg": cfg, "ctx": ctx, "run_id": run_id, "teacher": outcome["teacher"], "victim": victim,
            "workers_before": workers_before, "workers_after": workers_after, "at_kill": at_kill}


def test_kill_landed_mid_epoch_and_the_group_restarted(teacher_with_worker_kill):
    run = teacher_with_worker_kill
    # Epoch 1 was checkpointed and logged, epoch 2 was neither: the kill came inside epoch 2.
    assert run["at_kill"] == {"checkpoints_on_disk": 1, "registered": 1, "logged_epochs": [1]}
    assert not _pid_alive(run["victim"])
    assert len(run["workers_after"]) >= 2  # a new worker group trained the rest


def test_resumed_from_checkpoint_each_epoch_once(teacher_with_worker_kill):
    from raysemi.train.checkpoint import load_meta

    run = teacher_with_worker_kill
    checkpoints = [p for p in (run["ctx"].run_dir / "teacher").glob("checkpoint_*") if p.is_dir()]
    for folder in checkpoints:
        assert {"model.pt", "train_state.pt", "meta.json"} <= {p.name for p in folder.iterdir()}
    metas = [load_meta(folder) for folder in checkpoints]
    # One checkpoint per epoch: a restart from scratch would have saved a second epoch-1 checkpoint.
    assert sorted(meta["epoch"] for meta in metas) == list(range(1, EPOCHS + 1))
    last = next(meta for meta in metas if meta["epoch"] == EPOCHS)
    assert [entry["epoch"] for entry in last["history"]] == list(range(1, EPOCHS + 1))
    state = json.loads((run["ctx"].run_dir / "state.json").read_text())
    assert state["steps"]["teacher"]["done"]
    assert Path(run["teacher"]["checkpoint"]).parent == run["ctx"].run_dir / "teacher"


def test_mlflow_has_every_epoch_once_params_and_registered_model(teacher_with_worker_kill):
    from mlflow.tracking import MlflowClient

    from raysemi import tracking

    run = teacher_with_worker_kill
    uri, run_id = run["ctx"].mlflow_uri, run["run_id"]
    # Resuming at epoch 2 logs epoch 1 once; restarting from scratch would log it twice.
    steps = [step for step, _ in tracking.metric_history(uri, run_id, "val_dice_mean_regions")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert params["train.num_workers"] == "2"
    assert params["train.epochs"] == str(EPOCHS)
    version = run["teacher"]["registered_version"]
    assert version is not None
    registered = MlflowClient(tracking_uri=uri).get_model_version(f"{run['cfg'].tracking.register_model}-teacher", str(version))
    assert registered.run_id == run_id


# -- 2. the pool actor dies ------------------------------------------------------------------------------

# Confidences chosen so that the top half (stage 1 of 2 admits ceil(6/2) = 3) is CASE_A, CASE_B, CASE_C.
POOL_CONFIDENCES = {"CASE_A": 0.95, "CASE_B": 0.85, "CASE_C": 0.75, "CASE_D": 0.45, "CASE_E": 0.35, "CASE_F": 0.15}


def _pool_record(case_id: str, confidence: float, folder: Path) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "confidence": confidence,
        "initial_confidence": confidence,
        "label_path": str(folder / f"{case_id}_label.nii.gz"),
        "uncertainty_path": str(folder / f"{case_id}_uncertainty.nii.gz"),
        "mask_path": str(folder / f"{case_id}_mask.nii.gz"),
    }


def test_pool_actor_restarts_from_its_snapshot(tmp_path, ray_cluster):
    from raysemi.train.pool_actor import pool_actor

    cfg = tiny_config(tmp_path / "cases", tmp_path / "runs", curriculum={"stages": 2})
    run_dir = tmp_path / "runs" / "pool-kill"
    pool = pool_actor(run_dir, cfg.curriculum, "pool-kill")
    records = [_pool_record(case_id, c, run_dir / "pseudo" / "v01") for case_id, c in POOL_CONFIDENCES.items()]
    assert ray.get(pool.add.remote(records)) == 6
    assert [r["case_id"] for r in ray.get(pool.admit.remote(1))] == ["CASE_A", "CASE_B", "CASE_C"]
    # Refinement drops CASE_A to the bottom: a pool that recomputed stage 1 from the ranking would
    # now admit B, C, D; the recorded admission is A, B, C.
    refinement = {"confidence": 0.05, "agreement": 0.1, "label_path": "v02/a_label", "uncertainty_path": "v02/a_unc",
                  "mask_path": "v02/a_mask", "stage": 1}
    ray.get(pool.update.remote("CASE_A", **refinement))
    before = ray.get(pool.records.remote())
    old_pid = ray.get(pool.pid.remote())

    ray.kill(pool, no_restart=False)
    _wait_for(lambda: not _pid_alive(old_pid), 60, "the pool actor's process to die")
    restarted = pool_actor(run_dir, cfg.curriculum, "pool-kill")
    try:
        assert ray.get(restarted.pid.remote(), timeout=120) != old_pid
        assert ray.get(restarted.records.remote()) == before
        assert [r["case_id"] for r in ray.get(restarted.admit.remote(1))] == ["CASE_A", "CASE_B", "CASE_C"]
        stats = ray.get(restarted.stats.remote())
        assert stats["current_stage"] == 1 and stats["count"] == 6 and stats["versions"] == {"1": 5, "2": 1}
        # Had the actor died after snapshotting the update but before replying, Ray would re-send
        # the call to the restarted actor: it must not become a third version.
        assert ray.get(restarted.update.remote("CASE_A", **refinement))["version"] == 2
        assert ray.get(restarted.records.remote()) == before
        assert (run_dir / "pool" / "snapshot.json").exists()
    finally:
        ray.kill(restarted, no_restart=True)


# -- 3. a pseudo-labeling actor dies -----------------------------------------------------------------------


class SelfKillingPseudoLabeler(PseudoLabeler):
    """A PseudoLabeler whose process hard-kills itself on ``victim_case``, once.

    The marker file records that the kill happened (and the pid that died); a restarted actor sees
    it and labels the case normally.
    """

    def __init__(self, checkpoint_dir: str, cfg: dict[str, Any], out_dir: str, victim_case: str, marker: str) -> None:
        super().__init__(checkpoint_dir, cfg, out_dir)
        self.victim_case, self.marker = victim_case, Path(marker)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        case_ids = [json.loads(case_json)["case_id"] for case_json in batch["case_json"]]
        if self.victim_case in case_ids and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_pseudo_labeling_actor_killed_case_is_retried_once(tmp_path, synth_root, ray_cluster):
    from raysemi.data.brats import discover_cases
    from raysemi.inference.batch import case_rows, run_batch_inference
    from raysemi.model import build_model_from_config
    from raysemi.train.checkpoint import TrainState, save_checkpoint

    cfg = tiny_config(synth_root, tmp_path / "runs", train={"inference_actors": 2})
    checkpoint = tmp_path / "teacher"
    model = build_model_from_config(cfg.model)  # untrained: labels are noise, but files are files
    save_checkpoint(checkpoint, model, None, None, TrainState(), {"config": cfg.to_dict(), "role": "teacher"})
    cases = discover_cases(synth_root)[:3]
    victim = cases[1].case_id
    marker, out_dir = tmp_path / "killed.pid", tmp_path / "pseudo"

    results = run_batch_inference(
        SelfKillingPseudoLabeler,
        case_rows(cases),
        cfg,
        {"checkpoint_dir": str(checkpoint), "cfg": cfg.to_dict(), "out_dir": str(out_dir),
         "victim_case": victim, "marker": str(marker)},
    )

    assert marker.exists(), "the actor never reached the victim case"
    assert not _pid_alive(int(marker.read_text()))
    assert sorted(r["case_id"] for r in results) == sorted(c.case_id for c in cases)
    assert [r for r in results if r["error"]] == []
    full_shape = nib.load(cases[0].images["flair"]).shape
    for result in results:
        labels = np.asarray(nib.load(result["label_path"]).dataobj)
        assert labels.shape == full_shape and set(np.unique(labels)) <= {0, 1, 2, 4}
        uncertainty = nib.load(result["uncertainty_path"]).get_fdata()
        # uint8 scaled by a float32 slope of 1/255: 255 * slope may exceed 1 in the 8th digit
        assert uncertainty.shape == full_shape and 0 <= uncertainty.min() and uncertainty.max() <= 1 + 1e-6
        assert set(np.unique(np.asarray(nib.load(result["mask_path"]).dataobj))) <= {0, 1, 2}
        with np.load(result["probs_path"]) as probs:
            assert probs["probs"].shape[0] == 4
    # No temporary file of an interrupted write is left behind.
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == []
