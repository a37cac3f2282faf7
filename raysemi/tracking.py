"""MLflow tracking: one place that knows run ids, parents, params, metrics, artifacts and models.

Conventions:
- The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri``, else a SQLite store
  ``mlflow.db`` in the working directory (resolved to an absolute path on the driver, so that Ray
  workers in other directories log to the same store).
- Run ids are kept in the run folder's ``state.json`` (see :class:`raysemi.train.state.RunState`); a
  rerun appends to the same MLflow runs instead of creating new ones.
- Inside Ray Train only rank 0 logs (:func:`is_rank_zero`).
- Models are logged with ``mlflow.pytorch.log_model`` (with a signature) for the MLflow UI and
  registry, and *also* as a weights-only checkpoint artifact (``checkpoint/model.pt`` + ``meta.json``)
  that ``raysemi predict`` loads with ``torch.load(weights_only=True)``: raysemi never unpickles a
  file it did not produce.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MLFLOW_PARAM_LIMIT = 100  # MLflow accepts at most 100 params per log_batch call


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """Point MLflow's fluent API at ``uri`` for a block, then restore the global URI and the
    ``MLFLOW_TRACKING_URI`` variable (MLflow 3's set_tracking_uri also sets that variable, which
    would otherwise override every later ``tracking.uri`` in this process)."""
    previous_uri = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment ``name``."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        return mlflow_client.get_experiment_by_name(name).experiment_id


def create_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create an MLflow run (nested under ``parent_run_id`` when given) and return its id."""
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(experiment_id(uri, experiment), tags=all_tags, run_name=run_name)
    return run.info.run_id


def find_child_run(uri: str, experiment: str, parent_run_id: str, run_name: str) -> str | None:
    """The id of a run named ``run_name`` nested under ``parent_run_id``, if one exists.

    A driver killed between creating a nested run and recording its id leaves such a run behind;
    the resumed driver adopts it instead of creating a second one.
    """
    runs = client(uri).search_runs(
        [experiment_id(uri, experiment)],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`mlflow.runName` = '{run_name}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run_exists(uri: str, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        client(uri).get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException:
        return False


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches; values are stringified (lists and None included)."""
    items = [Param(str(k), _param_value(v)) for k, v in params.items()]
    mlflow_client = client(uri)
    existing = mlflow_client.get_run(run_id).data.params
    items = [p for p in items if p.key not in existing]  # a resumed run logs params only once
    for start in range(0, len(items), MLFLOW_PARAM_LIMIT):
        mlflow_client.log_batch(run_id, params=items[start : start + MLFLOW_PARAM_LIMIT])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    items = [
        Metric(str(k), float(v), now, int(step or 0))
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and v == v  # MLflow rejects NaN in some stores; NaN means "undefined"
    ]
    if items:
        client(uri).log_batch(run_id, metrics=items)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_artifacts(uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
    for path in paths:
        if Path(path).exists():
            log_artifact(uri, run_id, path, artifact_path)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def log_model(
    uri: str,
    run_id: str,
    model: Any,
    checkpoint_dir: str | os.PathLike,
    example_input: Any,
    registered_name: str | None = None,
    alias: str | None = None,
) -> str | None:
    """Log a torch model to ``run_id`` and optionally register it.

    Args:
        model: the torch module (CPU, eval mode).
        checkpoint_dir: raysemi checkpoint folder (``model.pt`` + ``meta.json``), logged as the
            ``checkpoint`` artifact so that predict can load weights without unpickling.
        example_input: numpy array (B, 4, X, Y, Z) for the signature.
        registered_name: register the model under this name (None: do not).
        alias: set this registry alias on the new version (e.g. ``champion``).

    Returns:
        the registered version, or None.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        example_output = model(torch.as_tensor(example_input)).numpy()
    signature = infer_signature(example_input, example_output)
    checkpoint_dir = Path(checkpoint_dir)
    with _fluent_uri(uri):
        with mlflow.start_run(run_id=run_id):
            # The weights-only checkpoint travels inside the logged model (extra_files), so that
            # models:/name@alias leads to it; it is also a plain run artifact for runs:/ URIs.
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=signature,
                pip_requirements=[],
                serialization_format="pickle",
                extra_files=[str(checkpoint_dir / "model.pt"), str(checkpoint_dir / "meta.json")],
                registered_model_name=registered_name,
            )
            mlflow.log_artifacts(str(checkpoint_dir), artifact_path="checkpoint")
        if registered_name is None:
            return None
        version = str(info.registered_model_version)
        if alias:
            client(uri).set_registered_model_alias(registered_name, alias, version)
        return version


def download_checkpoint(model_uri: str, uri: str, dst: str | os.PathLike) -> Path:
    """Download a raysemi checkpoint folder from an MLflow URI.

    Accepts ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (registered checkpoints) and
    ``runs:/<run id>`` / ``runs:/<run id>/checkpoint``.
    """
    with _fluent_uri(uri):
        if model_uri.startswith("runs:/"):
            rest = model_uri[len("runs:/") :].strip("/")
            run_id = rest.split("/", 1)[0]
            model_uri = f"runs:/{run_id}/checkpoint"
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    path = Path(path)
    for candidate in (path, path / "checkpoint", path / "extra_files"):
        if (candidate / "model.pt").exists() and (candidate / "meta.json").exists():
            return candidate
    raise FileNotFoundError(f"{model_uri}: no raysemi checkpoint (model.pt + meta.json) in the downloaded artifacts")


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]
