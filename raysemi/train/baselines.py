"""Baselines that share raysemi's model, data stream, loop and evaluation, for fair comparisons.

- ``supervised``: the teacher alone (labeled cases only), for as many iterations as asked.
- ``mean-teacher``: Mean Teacher (Tarvainen & Valpola 2017; the SSL4MIS recipe): labeled cases with
  Dice+CE, unlabeled cases with the consistency loss to an EMA teacher.

Both run as Ray Train fits in ``<run>/baseline_<method>/`` and log a child-free MLflow run tagged
``raysemi.role = baseline-<method>``. The budget is ``train.epochs x train.steps_per_epoch``.
"""

from __future__ import annotations

from typing import Any

from raysemi import tracking
from raysemi.config import RaysemiConfig
from raysemi.data.pipeline import PatchSpec, TrainingItem, balance_labeled, training_dataset
from raysemi.train.checkpoint import load_meta
from raysemi.train.launch import best_checkpoint_dir, ensure_ray, fit
from raysemi.train.loop import TrainJob, epoch_steps, stream_repeats
from raysemi.train.pipeline import RunContext, base_tags, mlflow_run, prepare_run, validation_table

METHODS = ("supervised", "mean-teacher")


def train_baseline(ctx: RunContext, method: str) -> dict[str, Any]:
    """Train one baseline (resumable like every other step); returns its checkpoint and metrics."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {METHODS}")
    key = f"baseline_{method.replace('-', '_')}"
    if ctx.state.done(key):
        return ctx.state.get(key)
    cfg = ctx.cfg
    items = [TrainingItem(case) for case in ctx.cases(ctx.split.labeled)]
    if method == "mean-teacher":
        unlabeled = [TrainingItem(case, unlabeled=True) for case in ctx.cases(ctx.split.unlabeled)]
        # The same labeled share of the stream as the raysemi student (SSL4MIS: half of every batch).
        items = balance_labeled(items, unlabeled, cfg.curriculum.labeled_share)
    steps = epoch_steps(cfg, len(ctx.split.labeled) + (len(ctx.split.unlabeled) if method == "mean-teacher" else 0))
    run_id = mlflow_run(ctx, key, f"{cfg.train.run_name}-{method}", base_tags(ctx, f"baseline-{method}"))
    job = TrainJob(
        role="mean_teacher" if method == "mean-teacher" else "teacher",
        epochs=cfg.train.epochs,
        steps_per_epoch=steps,
        validation=[c.to_dict() for c in ctx.cases(ctx.split.validation)],
        mlflow_uri=ctx.mlflow_uri,
        mlflow_run_id=run_id,
        # SSL4MIS ramps the consistency weight up over the first 40% of training.
        rampup_steps=int(0.4 * cfg.train.epochs * steps),
        plots_dir=str(ctx.run_dir / "results" / "plots"),
    )
    print(f"[raysemi] baseline {method}: {len(items)} cases, {cfg.train.epochs} epochs x {steps} steps", flush=True)
    dataset = training_dataset(items, PatchSpec.from_config(cfg.data, cfg.train.seed), stream_repeats(cfg, len(items), cfg.train.epochs, steps))
    result = fit(cfg, job, dataset, ctx.run_dir, key)
    checkpoint = best_checkpoint_dir(result)
    metrics = {k: v for k, v in load_meta(checkpoint)["metrics"].items() if k.startswith("val_")}
    tracking.finish_run(ctx.mlflow_uri, run_id)
    outputs = {"checkpoint": checkpoint, "metrics": metrics, "mlflow_run_id": run_id, "iterations": cfg.train.epochs * steps}
    ctx.state.finish(key, **outputs)
    return outputs


def train_baseline_command(cfg: RaysemiConfig, method: str) -> dict[str, Any]:
    """``raysemi train-baseline --method M``."""
    ensure_ray(cfg)
    ctx = prepare_run(cfg)
    outputs = train_baseline(ctx, method)
    print(f"\n{method} validation Dice (best checkpoint):")
    print(validation_table({method: outputs["metrics"]}))
    print(f"\ncheckpoint: {outputs['checkpoint']}")
    return outputs
