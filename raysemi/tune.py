"""``raysemi tune``: Ray Tune sweeps over the method's thresholds, loss weights and curriculum.

The search space comes from ``tune.space`` in the config: a dotted config key -> a distribution
(:class:`~raysemi.config.SearchSpaceEntry`), e.g.::

    tune:
      search: optuna            # grid | random | optuna
      space:
        loss.tau_high: {kind: uniform, low: 0.1, high: 0.3}
        loss.lambda_low: {kind: loguniform, low: 0.05, high: 1.0}
        curriculum.stages: {kind: choice, values: [3, 6]}
        train.lr: {kind: grid, values: [0.001, 0.0003]}

``randint`` draws integers from ``low`` to ``high`` *inclusive*. ``search: grid`` enumerates every
``choice`` too; ``search: random`` samples ``choice`` and enumerates ``grid`` (Tune's semantics);
Optuna takes no ``grid`` entries.

One sweep on disk (``train.storage_path/<tune.name>/``)::

    state.json         # the sweep's MLflow parent run, its config, the exported best trial
    shared/            # a normal run folder: manifest, teacher, pseudo/v01, pool snapshot
    trials/<trial id>/ # one run folder per trial: its own pool, pseudo/v02.., stage_01.., results
    tune/              # Ray Tune's experiment folder (restored when the sweep is rerun)
    trials.md, trials.json, best_config.yaml

What is shared, and what a trial may change:
- The teacher, its pseudo-labels (``shared/pseudo/v01``) and the split are computed once, by the
  driver, with the *base* config, before the Tuner starts. Trials read them and never write there:
  each trial has its own pool actor (named after its run folder) and writes refined labels,
  checkpoints and reports into ``trials/<trial id>``. So ``train.lr``, ``train.seed`` and the rest
  of ``train`` change the *student* only; the teacher is always trained with the base values.
- Keys that would change the shared work are refused when the sweep starts: ``data.*``,
  ``model.*`` (the teacher's architecture and MC passes), ``train.epochs`` (teacher epochs),
  ``curriculum.confidence_margin`` (the teacher's confidence ranking) and the sweep's own plumbing
  (``tune.*``, ``tracking.*``, ``train.storage_path``, ``train.run_name``).
- τ_h and τ_l decide the teacher's high/low training masks. A trial whose thresholds differ from
  the base config recomputes its version-1 masks from the shared uncertainty maps (stored with
  1/255 resolution) into ``trials/<id>/pseudo/v01_masks``; labels and uncertainty stay shared.
- A sampled combination that makes an invalid config (τ_h ≥ τ_l, stage count that does not match
  explicit ``curriculum.thresholds``) fails that trial with a :class:`~raysemi.errors.ConfigError`
  naming the values; the sweep goes on. When ``curriculum.stages`` is sampled and
  ``curriculum.fractions`` is not, base fractions of another length are dropped (default s/S).

Scheduling: ASHA on the per-stage validation Dice (``tune.metric``, mode max, time attribute
``stage``). Every trial reports once per curriculum stage (``run_pipeline``'s ``on_stage``); the
last stage is reported after the trial's final evaluation, so that ASHA's stop at ``max_t`` cannot
cut the evaluation short. Train's per-epoch reports stay inside Train: a stage is ASHA's unit of time
(``ray.tune.integration.ray_train.TuneReportCallback`` would forward every epoch, from each fit).

Train inside Tune (Ray 2.60, where Train V2 is the default: ``RAY_TRAIN_V2_ENABLED`` unset or 1;
``Tuner(trainer)`` is deprecated there): each trial is a thin driver function that builds its own
``TorchTrainer`` (through :func:`~raysemi.train.semi_pipeline.run_pipeline`). The trial function
reserves only ``tune.cpus_per_trial`` CPUs; its Train workers and inference actors request their
own resources when they start. ``tune.gpus_per_trial`` states how many GPUs one trial's training
holds at once; the sweep then runs at most ``cluster GPUs // gpus_per_trial`` trials at a time.

MLflow: one parent run per sweep (role ``sweep``; the shared teacher is its child), one nested
pipeline run per trial (named after the trial id, with all config params and ``stage_*`` metrics
per stage; its stages nested below it). The best completed trial's config goes to
``best_config.yaml`` (loads with :func:`~raysemi.config.load_config`; ``train.run_name`` is
``<tune.name>-best``) and its final student is registered as ``tracking.register_model`` with the
alias ``champion``.

Resume: rerunning the same command restores the Tuner (``Tuner.restore``): finished trials are not
rerun, and an interrupted trial continues at its first unfinished stage (its run folder's state).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from raysemi import tracking
from raysemi.atomic import atomic_write_json, atomic_write_text
from raysemi.config import RaysemiConfig, SearchSpaceEntry, _flatten, set_dotted
from raysemi.errors import ConfigError, RaysemiError
from raysemi.train.state import RunState

log = logging.getLogger(__name__)

SHARED_RUN = "shared"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
BEST_CONFIG_FILE = "best_config.yaml"
CHAMPION_ALIAS = "champion"

# Config keys a trial may not change, because the shared teacher and pseudo-labels depend on them.
SHARED_SECTIONS = ("data", "model", "tune", "tracking")
SHARED_KEYS = frozenset({"train.epochs", "train.storage_path", "train.run_name", "curriculum.confidence_margin"})


# -- search space -----------------------------------------------------------------------------------


def check_space(cfg: RaysemiConfig) -> None:
    """Refuse a ``tune.space`` that names unknown keys, keys of the shared work, or kinds the search can't use."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name at least one config key to sweep, e.g. loss.tau_high")
    leaves = cfg.flat()
    for key, entry in cfg.tune.space.items():
        if key not in leaves:
            raise ConfigError(f"tune.space.{key}: no such config field (expected a dotted key like loss.tau_high)")
        if key.split(".")[0] in SHARED_SECTIONS or key in SHARED_KEYS:
            raise ConfigError(
                f"tune.space.{key}: cannot be swept, the shared teacher and pseudo-labels (computed once with the "
                f"base config) depend on it; tunable: loss.*, curriculum.* (but confidence_margin), train.* (but epochs)"
            )
        if cfg.tune.search == "optuna" and entry.kind == "grid":
            raise ConfigError(f"tune.space.{key}: Optuna search takes no 'grid' entries; use 'choice'")


def _encode(value: Any) -> Any:
    """Lists (e.g. curriculum fractions) travel as JSON strings: Optuna's categorical choices must be scalars."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _domain(entry: SearchSpaceEntry, search: str) -> Any:
    if entry.kind == "grid" or (entry.kind == "choice" and search == "grid"):
        return tune.grid_search([_encode(v) for v in entry.values])
    if entry.kind == "choice":
        return tune.choice([_encode(v) for v in entry.values])
    if entry.kind == "uniform":
        return tune.uniform(entry.low, entry.high)
    if entry.kind == "loguniform":
        return tune.loguniform(entry.low, entry.high)
    return tune.randint(int(entry.low), int(entry.high) + 1)  # Tune's upper bound is exclusive


def search_space(cfg: RaysemiConfig) -> dict[str, Any]:
    """Tune's nested ``param_space``: ``{"loss": {"tau_high": tune.uniform(...)}}``."""
    space: dict[str, Any] = {}
    for key, entry in cfg.tune.space.items():
        set_dotted(space, key, _domain(entry, cfg.tune.search))
    return space


def sampled_values(trial_config: dict[str, Any], cfg: RaysemiConfig) -> dict[str, Any]:
    """A trial's sampled values by dotted key, lists decoded back from JSON."""
    flat = _flatten(trial_config)
    values = {}
    for key, entry in cfg.tune.space.items():
        if key not in flat:
            continue
        value = flat[key]
        encoded = entry.values is not None and any(isinstance(v, (list, dict)) for v in entry.values)
        values[key] = json.loads(value) if encoded and isinstance(value, str) else value
    return values


def max_stages(cfg: RaysemiConfig) -> int:
    """The most curriculum stages any trial can run (ASHA's ``max_t``)."""
    entry = cfg.tune.space.get("curriculum.stages")
    if entry is None:
        return cfg.curriculum.stages
    return int(max(entry.values) if entry.values else entry.high)


def trial_concurrency(cfg: RaysemiConfig, cluster_gpus: float) -> int:
    """Trials at once: ``max_concurrent_trials``, capped by the GPUs when each trial's training needs some.

    The trial function reserves no GPU itself (its Train workers do, when they start), so Tune cannot
    see GPU contention; this cap keeps concurrent trials from queueing for each other's GPUs.
    """
    wanted = cfg.tune.max_concurrent_trials
    if cfg.tune.gpus_per_trial <= 0:
        return wanted
    fits = int(cluster_gpus // cfg.tune.gpus_per_trial)
    if fits < 1:
        raise ConfigError(f"tune.gpus_per_trial is {cfg.tune.gpus_per_trial} but the cluster has {cluster_gpus:g} GPUs")
    return min(wanted, fits)


def apply_sampled(base: RaysemiConfig, sampled: dict[str, Any], label: str) -> RaysemiConfig:
    """The base config with one trial's values; an invalid combination raises a ConfigError naming them."""
    overrides = dict(sampled)
    stages = overrides.get("curriculum.stages")
    if stages is not None and "curriculum.fractions" not in overrides:
        if base.curriculum.fractions is not None and len(base.curriculum.fractions) != stages:
            overrides["curriculum.fractions"] = None
    try:
        return base.with_overrides(overrides)
    except ConfigError as exc:
        reasons = [line.strip() for line in str(exc).splitlines()[1:]] or [str(exc)]  # drop the "invalid config" header
        values = ", ".join(f"{k}={v!r}" for k, v in sampled.items())
        raise ConfigError(f"{label}: {'; '.join(reasons)}; sampled values: {values}; this trial is skipped") from None


def trial_config(base: RaysemiConfig, sampled: dict[str, Any], root: Path, trial_id: str) -> RaysemiConfig:
    """A trial's full config: base + sampled values, its own run folder ``<root>/trials/<trial id>``.

    Trials log no model; the sweep registers the best trial's student once, at the end.
    """
    cfg = apply_sampled(base, sampled, f"trial {trial_id}")
    return cfg.with_overrides(
        {"train.storage_path": str(root / TRIALS_DIR), "train.run_name": trial_id, "tracking.log_models": False}
    )


# -- per-trial training masks -------------------------------------------------------------------


def recompute_mask(uncertainty_path: str, probs_path: str, tau_high: float, tau_low: float, out_path: str) -> None:
    """Training mask (0 ignore, 1 learn, 2 unlearn) for other thresholds, from a stored uncertainty map.

    Only voxels in the case's brain box (stored with the teacher probabilities) get a class, as the
    teacher's own mask does; outside it the uncertainty is 0 by construction, not by confidence.
    """
    import nibabel as nib

    from raysemi.inference.outputs import write_nifti
    from raysemi.semi.losses import encode_masks, masks_from_uncertainty

    image = nib.load(uncertainty_path)
    uncertainty = np.asarray(image.get_fdata(dtype=np.float32))
    with np.load(probs_path) as stored:
        (x0, y0, z0), (x1, y1, z1) = stored["box_start"], stored["box_end"]
    high, low = masks_from_uncertainty(uncertainty[x0:x1, y0:y1, z0:z1], tau_high, tau_low)
    mask = np.zeros(uncertainty.shape, dtype=np.uint8)
    mask[x0:x1, y0:y1, z0:z1] = encode_masks(high, low)
    write_nifti(mask, image.affine, out_path)


@ray.remote(num_cpus=1)
def _recompute_masks(jobs: list[tuple[str, str, str]], tau_high: float, tau_low: float) -> int:
    for uncertainty_path, probs_path, out_path in jobs:
        recompute_mask(uncertainty_path, probs_path, tau_high, tau_low, out_path)
    return len(jobs)


def trial_pool_records(shared: dict[str, Any], cfg: RaysemiConfig, run_dir: Path, chunk: int = 16) -> list[dict[str, Any]]:
    """The shared teacher pseudo-labels as this trial's pool records (masks redone if τ_h/τ_l differ)."""
    from raysemi.inference.outputs import pseudo_paths

    records = [{**r, "history": []} for r in shared["pool_records"]]  # the trial's pool writes its own history
    if (cfg.loss.tau_high, cfg.loss.tau_low) == (shared["tau_high"], shared["tau_low"]):
        return records
    mask_dir = run_dir / "pseudo" / "v01_masks"
    jobs = []
    for record in records:
        out_path = mask_dir / f"{record['case_id']}_mask.nii.gz"
        probs_path = pseudo_paths(shared["pseudo_dir"], record["case_id"])["probs_path"]
        if not out_path.exists():  # written atomically: present means complete
            jobs.append((record["uncertainty_path"], probs_path, str(out_path)))
        record["mask_path"] = str(out_path)
    # An explicit strategy: inside a Tune trial, tasks without one are captured into the trial's
    # placement group, which holds only the trial driver's CPUs.
    recompute = _recompute_masks.options(scheduling_strategy="SPREAD")
    ray.get([recompute.remote(jobs[i : i + chunk], cfg.loss.tau_high, cfg.loss.tau_low) for i in range(0, len(jobs), chunk)])
    return records


def _adopt_shared_split(shared_dir: Path, run_dir: Path, cfg: RaysemiConfig) -> None:
    """A trial uses the shared run's split as it is: same cases as the teacher, and no revalidation of every scan."""
    from raysemi.train.pipeline import BAD_CASES_FILE, MANIFEST_FILE

    state = RunState(run_dir)
    if state.done("prepare"):
        return
    for name in (MANIFEST_FILE, BAD_CASES_FILE):
        if (shared_dir / name).exists():
            atomic_write_text(run_dir / name, (shared_dir / name).read_text())
    cfg.save(run_dir / "config.yaml")
    state.finish("prepare", manifest=str(run_dir / MANIFEST_FILE), shared_from=str(shared_dir))


# -- one trial ------------------------------------------------------------------------------------


def run_trial(trial_config_dict: dict[str, Any], *, base: dict[str, Any], shared: dict[str, Any], sweep_run_id: str) -> None:
    """Ray Tune trial function: the thin driver of one trial (it builds its own TorchTrainers).

    Args:
        trial_config_dict: the sampled values, nested like the config (``{"loss": {"tau_high": 0.15}}``).
        base: the sweep's base config as a dict (absolute paths, pinned tracking URI).
        shared: ``{"teacher", "pseudo_dir", "pool_records", "shared_dir", "tau_high", "tau_low"}`` of the shared run.
        sweep_run_id: the sweep's MLflow parent run; the trial's pipeline run is nested under it.
    """
    from raysemi.train.semi_pipeline import run_pipeline

    base_cfg = RaysemiConfig.from_dict(base, source="sweep base config")
    trial_id = tune.get_context().get_trial_id()
    root = Path(shared["shared_dir"]).parent
    cfg = trial_config(base_cfg, sampled_values(trial_config_dict, base_cfg), root, trial_id)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    _adopt_shared_split(Path(shared["shared_dir"]), run_dir, cfg)
    trial_shared = {**shared, "pool_records": trial_pool_records(shared, cfg, run_dir)}
    last_stage: dict[str, Any] = {}

    def on_stage(stage: int, metrics: dict[str, Any]) -> None:
        result = {"stage": stage, **{k: float(v) for k, v in metrics.items() if _is_number(v)}}
        if stage < cfg.curriculum.stages:
            tune.report(result)
        else:
            last_stage.update(result)  # reported after the final evaluation, see the module docstring

    outputs = run_pipeline(cfg, on_stage=on_stage, shared=trial_shared, parent_run_id=sweep_run_id)
    final = {f"final_student_{k}": float(v) for k, v in outputs["evaluation"]["student"].items() if _is_number(v)}
    tune.report(
        {
            **last_stage,
            **final,
            "mlflow_run_id": outputs["mlflow_run_id"],
            "student_checkpoint": outputs["evaluation"]["student_checkpoint"],
        }
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the sweep ------------------------------------------------------------------------------------


@dataclass
class TrialSummary:
    """One trial as the sweep saw it."""

    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped | error
    last_stage: int
    score: float
    error: str = ""
    mlflow_run_id: str | None = None
    student_checkpoint: str | None = None


def sweep_root(cfg: RaysemiConfig) -> Path:
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.tune.name


def pin_paths(cfg: RaysemiConfig) -> RaysemiConfig:
    """Absolute data/storage paths and tracking URI: trials run in other working directories (and nodes)."""
    overrides: dict[str, Any] = {
        "train.storage_path": str(Path(cfg.train.storage_path).expanduser().resolve()),
        "tracking.uri": cfg.tracking_uri(),
    }
    if "://" not in cfg.data.root:
        overrides["data.root"] = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.data.site_map and "://" not in cfg.data.site_map:
        overrides["data.site_map"] = str(Path(cfg.data.site_map).expanduser().resolve())
    return cfg.with_overrides(overrides)


def prepare_shared(cfg: RaysemiConfig, root: Path, sweep_run_id: str) -> dict[str, Any]:
    """Split, teacher and teacher pseudo-labels, once, in ``<root>/shared`` (resumable like any run)."""
    from raysemi.train.pipeline import prepare_run, train_teacher
    from raysemi.train.pool_actor import pool_actor
    from raysemi.train.semi_pipeline import pseudo_label_step

    shared_cfg = cfg.with_overrides({"train.storage_path": str(root), "train.run_name": SHARED_RUN})
    ctx = prepare_run(shared_cfg)
    teacher = train_teacher(ctx, sweep_run_id)
    pool = pool_actor(ctx.run_dir, shared_cfg.curriculum, SHARED_RUN)
    pseudo_label_step(ctx, teacher["checkpoint"], pool, sweep_run_id)
    return {
        "teacher": teacher,
        "pseudo_dir": str(ctx.run_dir / "pseudo" / "v01"),
        "pool_records": ray.get(pool.records.remote()),
        "shared_dir": str(ctx.run_dir),
        "tau_high": cfg.loss.tau_high,
        "tau_low": cfg.loss.tau_low,
    }


def _sweep_run(cfg: RaysemiConfig, state: RunState) -> str:
    """The sweep's MLflow parent run (reused on resume); refuses to resume a sweep with another config."""
    started = state.get("start").get("config")
    current = cfg.flat()
    # Fields added to the config since the sweep started (with their defaults) do not block a resume.
    changed = sorted(k for k, v in _flatten(started or {}).items() if current.get(k, v) != v)
    if changed:
        raise ConfigError(
            f"sweep {cfg.tune.name} in {state.path.parent} was started with another config (changed: {', '.join(changed)}); "
            "rerun with the same config to resume, or pick a new tune.name"
        )
    uri = cfg.tracking_uri()
    run_id = state.mlflow.get("sweep")
    if not tracking.run_exists(uri, run_id):
        tags = {"raysemi.role": "sweep", "raysemi.search": cfg.tune.search, "raysemi.scheduler": cfg.tune.scheduler,
                "raysemi.swept_keys": ",".join(cfg.tune.space)}
        run_id = tracking.create_run(uri, cfg.tracking.experiment, cfg.tune.name, tags)
        tracking.log_params(uri, run_id, cfg.flat())
        state.set_run_id("sweep", run_id)
    if started is None:
        state.finish("start", config=cfg.to_dict())
    return run_id


def _tuner(cfg: RaysemiConfig, trainable: Any, root: Path) -> tune.Tuner:
    """Restore the sweep's Tuner when it has started before, else build it."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    path = root / TUNE_DIR
    if tune.Tuner.can_restore(path):
        print(f"[raysemi] resuming sweep {cfg.tune.name} from {path} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    concurrency = trial_concurrency(cfg, ray.cluster_resources().get("GPU", 0))
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.train.seed)  # Tune wraps it in a ConcurrencyLimiter
    else:
        # A generator passed in must limit concurrency itself: Tune ignores max_concurrent_trials then.
        search_alg = BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.train.seed)
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="stage", max_t=max_stages(cfg), grace_period=cfg.tune.grace_period,
            reduction_factor=cfg.tune.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode="max", search_alg=search_alg, scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrency if cfg.tune.search == "optuna" else None,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(root)),
    )


def summarise_trials(results: tune.ResultGrid, cfg: RaysemiConfig) -> list[TrialSummary]:
    """Status, sampled values, last stage and score of every trial, in trial order."""
    summaries = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = Path(result.path).name
        params = sampled_values(_trial_params(result), cfg)
        last_stage = int(metrics.get("stage", 0))
        score = float(metrics.get(cfg.tune.metric, math.nan))
        if result.error is not None:
            status, error = "error", _error_message(result.error)
        else:
            status, error = ("completed" if metrics.get("student_checkpoint") else "stopped"), ""
        summaries.append(
            TrialSummary(
                trial_id, params, status, last_stage, score, error,
                metrics.get("mlflow_run_id"), metrics.get("student_checkpoint"),
            )
        )
    return sorted(summaries, key=lambda s: s.trial_id.rsplit("_", 1)[-1])


def _trial_params(result: tune.Result) -> dict[str, Any]:
    """A trial's sampled config; a restored trial that never reported has it only in Tune's ``params.json``."""
    if result.config:
        return result.config
    params = Path(result.path) / "params.json"
    return json.loads(params.read_text()) if params.exists() else {}


def _error_message(error: BaseException) -> str:
    """The trial's own exception message on one line (Tune wraps it in a RayTaskError with a traceback)."""
    cause = getattr(error, "cause", None) or error
    return " ".join(str(cause).split())[:1000]


def best_trial(trials: list[TrialSummary]) -> TrialSummary | None:
    """The completed trial with the highest final-stage score (stopped and failed trials don't count)."""
    done = [t for t in trials if t.status == "completed" and math.isfinite(t.score)]
    return max(done, key=lambda t: t.score) if done else None


def _write_trial_table(trials: list[TrialSummary], cfg: RaysemiConfig, root: Path) -> str:
    from raysemi.evaluation.report import markdown_table

    keys = list(cfg.tune.space)
    rows = [
        [t.trial_id, *[_cell(t.params.get(k)) for k in keys], t.status, t.last_stage, t.score, t.error.removeprefix(f"trial {t.trial_id}: ")[:100]]
        for t in trials
    ]
    table = markdown_table(["trial", *keys, "status", "stage", cfg.tune.metric, "error"], rows)
    atomic_write_text(root / "trials.md", table + "\n")
    atomic_write_json(root / "trials.json", [asdict(t) for t in trials])
    return table


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def export_best(cfg: RaysemiConfig, best: TrialSummary, root: Path, sweep_run_id: str, state: RunState) -> str | None:
    """Write ``best_config.yaml``, log it, and register the best trial's final student as ``champion``.

    Returns:
        the registered model version, or None (no registry name, or model logging off).
    """
    from raysemi.train.checkpoint import load_model

    best_cfg = apply_sampled(cfg, best.params, f"best trial {best.trial_id}")
    best_cfg = best_cfg.with_overrides({"train.run_name": f"{cfg.tune.name}-best"})
    best_cfg.save(root / BEST_CONFIG_FILE)
    uri = cfg.tracking_uri()
    tracking.log_artifact(uri, sweep_run_id, root / BEST_CONFIG_FILE)
    tracking.log_metrics(uri, sweep_run_id, {f"best_{cfg.tune.metric}": best.score})
    tracking.set_tags(uri, sweep_run_id, {"raysemi.best_trial": best.trial_id, "raysemi.best_run_id": best.mlflow_run_id})
    if state.get("best").get("trial_id") == best.trial_id:  # a rerun of a finished sweep registers nothing new
        return state.get("best").get("registered_version")
    version = None
    if cfg.tracking.log_models and best.student_checkpoint:
        model, _ = load_model(best.student_checkpoint)
        example = np.zeros((1, 4, *cfg.data.patch_size), dtype=np.float32)
        version = tracking.log_model(
            uri, best.mlflow_run_id, model, best.student_checkpoint, example,
            registered_name=cfg.tracking.register_model, alias=CHAMPION_ALIAS,
        )
    state.finish("best", trial_id=best.trial_id, registered_version=version, score=best.score)
    return version


def run_sweep(cfg: RaysemiConfig) -> dict[str, Any]:
    """The whole sweep: shared teacher once, trials under Tune, best config + champion model.

    Returns:
        ``{"root", "trials": [TrialSummary], "best": TrialSummary | None, "sweep_run_id", "registered_version"}``.
    """
    from raysemi.train.launch import ensure_ray

    cfg = pin_paths(cfg)
    check_space(cfg)
    ensure_ray(cfg)
    root = sweep_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    state = RunState(root)
    sweep_run_id = _sweep_run(cfg, state)
    shared = prepare_shared(cfg, root, sweep_run_id)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), shared=shared, sweep_run_id=sweep_run_id),
        {"cpu": cfg.tune.cpus_per_trial},
    )
    results = _tuner(cfg, trainable, root).fit()
    trials = summarise_trials(results, cfg)
    table = _write_trial_table(trials, cfg, root)
    uri = cfg.tracking_uri()
    tracking.log_artifacts(uri, sweep_run_id, [root / "trials.md", root / "trials.json"])
    print(f"\nTrials of sweep {cfg.tune.name}:\n{table}", flush=True)
    best = best_trial(trials)
    if best is None:
        errors = [f"  {t.trial_id}: {t.error}" for t in trials if t.error]
        raise RaysemiError(f"sweep {cfg.tune.name}: no trial completed every stage" + ("; errors:\n" + "\n".join(errors) if errors else ""))
    version = export_best(cfg, best, root, sweep_run_id, state)
    tracking.finish_run(uri, sweep_run_id)
    print(
        f"\nbest trial {best.trial_id}: {cfg.tune.metric} = {best.score:.4f} with {best.params}\n"
        f"best config: {root / BEST_CONFIG_FILE}\n"
        + (f"registered {cfg.tracking.register_model} version {version} as @{CHAMPION_ALIAS}\n" if version else ""),
        flush=True,
    )
    return {"root": root, "trials": trials, "best": best, "sweep_run_id": sweep_run_id, "registered_version": version}


# -- command line ---------------------------------------------------------------------------------


def cmd_tune(args) -> int:
    from raysemi.config import load_config

    run_sweep(load_config(args.config, args.overrides))
    return 0


def register(sub, add) -> None:
    """Add ``raysemi tune`` to the CLI (see :func:`raysemi.cli.build_parser`)."""
    add("tune", cmd_tune, "Ray Tune sweep of thresholds, loss weights and curriculum (tune.space); resumable")
