"""``raysemi run``: teacher -> pseudo-labels -> curriculum stages (student + refinement) -> evaluation.

Every step records itself in ``state.json`` when its outputs are on disk; rerunning the same command
(same ``train.storage_path`` and ``train.run_name``) continues at the first unfinished step, and a
partly trained teacher or stage resumes at its next epoch from its Ray Train checkpoint.

MLflow: one parent run for the whole pipeline, with nested child runs for the teacher and each stage
(tags ``raysemi.role``, ``raysemi.stage``, ``raysemi.labeled_fraction``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from raysemi import tracking
from raysemi.atomic import atomic_write_json, atomic_write_text
from raysemi.config import RaysemiConfig
from raysemi.data.pipeline import PatchSpec, TrainingItem, balance_labeled, training_dataset
from raysemi.evaluation.metrics import summarise
from raysemi.inference.batch import case_rows, run_batch_inference
from raysemi.inference.outputs import pseudo_paths
from raysemi.inference.predictor import Evaluator, PseudoLabeler, Refiner
from raysemi.train.checkpoint import load_meta
from raysemi.train.launch import best_checkpoint_dir, ensure_ray, fit
from raysemi.train.loop import TrainJob, epoch_steps, stream_repeats
from raysemi.train.pipeline import (
    RunContext,
    base_tags,
    finish_model,
    mlflow_run,
    prepare_run,
    train_teacher,
    validation_table,
)
from raysemi.train.pool_actor import pool_actor

log = logging.getLogger(__name__)

StageCallback = Callable[[int, dict[str, float]], None]


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return float(np.mean(numbers)) if numbers else None


def _report_failures(ctx: RunContext, results: list[dict[str, Any]], what: str, run_id: str) -> list[dict[str, Any]]:
    """Log failed cases (driver log + MLflow) and return the good results."""
    failed = {r["case_id"]: r["error"] for r in results if r.get("error")}
    for case_id, error in failed.items():
        print(f"[raysemi] {what}: skipping case {case_id}: {error}", flush=True)
    if failed:
        path = ctx.run_dir / "results" / f"failed_{what.replace(' ', '_')}.json"
        atomic_write_json(path, failed)
        tracking.log_artifact(ctx.mlflow_uri, run_id, path, "failures")
    return [r for r in results if not r.get("error")]


def pseudo_label_step(ctx: RunContext, teacher_checkpoint: str, pool, parent_run_id: str) -> dict[str, Any]:
    """Teacher MC-dropout pseudo-labels for every unlabeled case, into ``pseudo/v01`` and the pool."""
    if ctx.state.done("pseudo_labels"):
        return ctx.state.get("pseudo_labels")
    cfg = ctx.cfg
    out_dir = ctx.run_dir / "pseudo" / "v01"
    cases = ctx.cases(ctx.split.unlabeled)
    hidden = set(ctx.split.hidden_truth)
    rows = case_rows(cases, score_truth={c.case_id: c.case_id in hidden for c in cases})
    print(f"[raysemi] pseudo-labeling {len(rows)} unlabeled cases ({cfg.model.mc_passes} MC passes) ...", flush=True)
    results = run_batch_inference(
        PseudoLabeler, rows, cfg, {"checkpoint_dir": teacher_checkpoint, "cfg": cfg.to_dict(), "out_dir": str(out_dir)}
    )
    good = _report_failures(ctx, results, "pseudo labeling", parent_run_id)
    if not good:
        raise RuntimeError("pseudo-labeling failed for every unlabeled case; see the errors above")
    ray.get(
        pool.add.remote(
            [
                {
                    "case_id": r["case_id"],
                    "confidence": min(max(r["confidence"], 0.0), 1.0),
                    "initial_confidence": min(max(r["confidence"], 0.0), 1.0),
                    "label_path": r["label_path"],
                    "uncertainty_path": r["uncertainty_path"],
                    "mask_path": r["mask_path"],
                    "truth_path": ctx.split.cases[r["case_id"]].seg if r["case_id"] in hidden else None,
                }
                for r in good
            ]
        )
    )
    summary = {
        "pseudo_cases": len(good),
        "pseudo_failed": len(results) - len(good),
        "pseudo_confidence_mean": _mean([r["confidence"] for r in good]),
        "pseudo_high_share": _mean([r["high_share"] for r in good]),
        "pseudo_low_share": _mean([r["low_share"] for r in good]),
        "pseudo_truth_dice": _mean([r.get("truth_dice") for r in good]),
    }
    # Does confidence rank pseudo-label quality? Spearman correlation of C with hidden-truth Dice.
    scored = [(r["confidence"], r["truth_dice"]) for r in good if r.get("truth_dice") is not None]
    if len(scored) >= 3:
        from scipy.stats import spearmanr

        summary["pseudo_confidence_truth_spearman"] = float(spearmanr(*zip(*scored)).statistic)
    tracking.log_metrics(ctx.mlflow_uri, parent_run_id, {k: v for k, v in summary.items() if v is not None}, step=0)
    atomic_write_json(ctx.run_dir / "results" / "pseudo_labels.json", {"summary": summary, "cases": good})
    ctx.state.finish("pseudo_labels", **summary)
    return summary


def run_stage(ctx: RunContext, stage: int, pool, parent_run_id: str, init_weights: str | None) -> dict[str, Any]:
    """Train the student on labeled + admitted cases, then refine the admitted pseudo-labels."""
    key = f"stage_{stage:02d}"
    if ctx.state.done(key):
        return ctx.state.get(key)
    cfg = ctx.cfg
    admitted = ray.get(pool.admit.remote(stage))
    labeled = [TrainingItem(case) for case in ctx.cases(ctx.split.labeled)]
    pseudo = [TrainingItem(ctx.split.cases[r["case_id"]], r["label_path"], r["mask_path"]) for r in admitted]
    items = balance_labeled(labeled, pseudo, cfg.curriculum.labeled_share)
    steps = epoch_steps(cfg, len(labeled) + len(pseudo))  # distinct cases, not the repeated labeled ones
    epochs = cfg.curriculum.epochs_per_stage
    first_stage_steps = _stage_steps(ctx, 1)
    run_id = mlflow_run(ctx, key, f"{cfg.train.run_name}-{key}", base_tags(ctx, "student", stage), parent_run_id)
    tracking.set_tags(ctx.mlflow_uri, run_id, {"raysemi.admitted_cases": len(admitted)})
    job = TrainJob(
        role="student",
        epochs=epochs,
        steps_per_epoch=steps,
        validation=[c.to_dict() for c in ctx.cases(ctx.split.validation)],
        init_weights=init_weights,
        mlflow_uri=ctx.mlflow_uri,
        mlflow_run_id=run_id,
        step_offset=sum(_stage_steps(ctx, s) for s in range(1, stage)) * epochs,
        epoch_offset=cfg.train.epochs + (stage - 1) * epochs,
        rampup_steps=int(math.ceil(cfg.loss.ramp_up_fraction * first_stage_steps * epochs)),
        stage=stage,
        plots_dir=str(ctx.run_dir / "results" / "plots"),
    )
    print(
        f"[raysemi] stage {stage}/{cfg.curriculum.stages}: {len(labeled)} labeled + {len(pseudo)} pseudo-labeled cases, "
        f"{epochs} epochs x {steps} steps",
        flush=True,
    )
    spec = PatchSpec.from_config(cfg.data, cfg.train.seed + 1000 * stage)
    dataset = training_dataset(items, spec, repeats=stream_repeats(cfg, len(items), epochs, steps))
    result = fit(cfg, job, dataset, ctx.run_dir, key)
    checkpoint = best_checkpoint_dir(result)
    metrics = {k: v for k, v in load_meta(checkpoint)["metrics"].items() if k.startswith("val_")}
    refinement = refine_step(ctx, stage, checkpoint, admitted, run_id) if cfg.curriculum.refine else {}
    stats = ray.get(pool.stats.remote())
    stage_metrics = {**metrics, **refinement, "admitted_cases": len(admitted), "pool_confidence_mean": stats.get("confidence_mean")}
    tracking.log_metrics(ctx.mlflow_uri, run_id, {k: v for k, v in stage_metrics.items() if isinstance(v, (int, float))}, step=stage)
    tracking.log_metrics(
        ctx.mlflow_uri, parent_run_id,
        {f"stage_{k}": v for k, v in stage_metrics.items() if isinstance(v, (int, float))}, step=stage,
    )
    tracking.finish_run(ctx.mlflow_uri, run_id)
    outputs = {"checkpoint": checkpoint, "metrics": stage_metrics, "mlflow_run_id": run_id, "admitted": [r["case_id"] for r in admitted]}
    ctx.state.finish(key, **outputs)
    return outputs


def _stage_steps(ctx: RunContext, stage: int) -> int:
    """Steps per epoch the student takes in ``stage`` (admission counts are known in advance in fraction mode)."""
    cfg = ctx.cfg
    fractions = cfg.curriculum.cumulative_fractions()
    n_pseudo = math.ceil(fractions[stage - 1] * len(ctx.split.unlabeled) - 1e-9)
    return epoch_steps(cfg, len(ctx.split.labeled) + n_pseudo)


def refine_step(ctx: RunContext, stage: int, student_checkpoint: str, admitted: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    """Student predicts on the admitted cases; the agreement rule writes pseudo-label version ``stage + 1``."""
    cfg = ctx.cfg
    out_dir = ctx.run_dir / "pseudo"  # the Refiner writes into v<new version>/
    hidden = set(ctx.split.hidden_truth)
    teacher_dir = ctx.run_dir / "pseudo" / "v01"
    # A rerun after a crash mid-refinement refines only the cases this stage has not refined yet.
    admitted = [r for r in admitted if not any(h.get("stage") == stage for h in r.get("history", []))]
    cases = [ctx.split.cases[r["case_id"]] for r in admitted]
    by_id = {r["case_id"]: r for r in admitted}
    rows = case_rows(
        cases,
        label_path={i: r["label_path"] for i, r in by_id.items()},
        probs_path={i: pseudo_paths(teacher_dir, i)["probs_path"] for i in by_id},
        confidence={i: r["confidence"] for i, r in by_id.items()},
        version={i: r["version"] for i, r in by_id.items()},
        score_truth={i: i in hidden for i in by_id},
    )
    print(f"[raysemi] stage {stage}: refining {len(rows)} pseudo-labels by teacher-student agreement ...", flush=True)
    results = run_batch_inference(
        Refiner, rows, cfg, {"checkpoint_dir": student_checkpoint, "cfg": cfg.to_dict(), "out_dir": str(out_dir)}
    )
    good = _report_failures(ctx, results, f"refinement stage {stage}", run_id)
    pool = pool_actor(ctx.run_dir, cfg.curriculum, cfg.train.run_name)
    ray.get(
        [
            pool.update.remote(
                r["case_id"],
                confidence=min(max(r["confidence"], 0.0), 1.0),
                agreement=min(max(r["agreement"], 0.0), 1.0),
                label_path=r["label_path"],
                uncertainty_path=r["uncertainty_path"],
                mask_path=r["mask_path"],
                stage=stage,
            )
            for r in good
        ]
    )
    summary = {
        "refined_cases": len(good),
        "agreement_mean": _mean([r["agreement"] for r in good]),
        "high_share_after": _mean([r["high_share"] for r in good]),
        "low_share_after": _mean([r["low_share"] for r in good]),
        "pseudo_truth_dice_before": _mean([r.get("truth_dice_before") for r in good]),
        "pseudo_truth_dice_after": _mean([r.get("truth_dice_after") for r in good]),
        "student_truth_dice": _mean([r.get("truth_dice_student") for r in good]),
    }
    atomic_write_json(ctx.run_dir / "results" / f"refinement_stage_{stage:02d}.json", {"summary": summary, "cases": good})
    return {k: v for k, v in summary.items() if v is not None}


def evaluate_checkpoint(ctx: RunContext, checkpoint: str, name: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """BraTS Dice and HD95 of one checkpoint on the validation cases: (mean metrics, per-case rows)."""
    rows = case_rows(ctx.cases(ctx.split.validation))
    results = run_batch_inference(Evaluator, rows, ctx.cfg, {"checkpoint_dir": checkpoint, "cfg": ctx.cfg.to_dict()})
    good = [r for r in results if not r.get("error")]
    for r in results:
        if r.get("error"):
            print(f"[raysemi] evaluation of {name}: case {r['case_id']} failed: {r['error']}", flush=True)
    for r in good:
        r.pop("error", None)
    return summarise(good)["mean"], sorted(good, key=lambda r: r["case_id"])


def validation_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``val_*`` metrics of a fit's best epoch, without the prefix."""
    return {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}


def stage_validation(teacher: dict[str, Any], stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation metrics per curriculum stage, the teacher as stage 0 (the points of ``stage_dice.png``)."""
    points = [{"stage": 0, **validation_metrics(teacher["metrics"])}]
    return points + [{"stage": i + 1, **validation_metrics(s["metrics"])} for i, s in enumerate(stages)]


def final_evaluation(ctx: RunContext, teacher: dict[str, Any], stages: list[dict[str, Any]], parent_run_id: str) -> dict[str, Any]:
    """Teacher vs final student on the validation cases: table, CSV/JSON/Markdown reports, plots, model."""
    if ctx.state.done("evaluation"):
        return ctx.state.get("evaluation")
    from raysemi.evaluation import plots
    from raysemi.evaluation.report import comparison_table, write_reports

    results_dir = ctx.run_dir / "results"
    student_checkpoint = stages[-1]["checkpoint"]
    teacher_mean, teacher_rows = evaluate_checkpoint(ctx, teacher["checkpoint"], "teacher")
    student_mean, student_rows = evaluate_checkpoint(ctx, student_checkpoint, "student")
    write_reports(teacher_rows, results_dir, stem="teacher_metrics")
    write_reports(student_rows, results_dir, stem="student_metrics")
    table = comparison_table({"teacher": teacher_mean, "student": student_mean})
    atomic_write_text(results_dir / "teacher_vs_student.md", table + "\n")
    stage_points = stage_validation(teacher, stages)
    stage_png = plots.stage_dice(stage_points, results_dir / "stage_dice.png")
    final = {f"final_teacher_{k}": v for k, v in teacher_mean.items()}
    final.update({f"final_student_{k}": v for k, v in student_mean.items()})
    atomic_write_json(results_dir / "final_metrics.json", {"teacher": teacher_mean, "student": student_mean, "stages": stage_points})
    tracking.log_metrics(ctx.mlflow_uri, parent_run_id, final)
    tracking.log_artifacts(
        ctx.mlflow_uri, parent_run_id,
        [stage_png, results_dir / "teacher_vs_student.md", results_dir / "final_metrics.json",
         *(results_dir / f"{stem}.{ext}" for stem in ("teacher_metrics", "student_metrics") for ext in ("csv", "json", "md"))],
        "results",
    )
    registered = finish_model(ctx, parent_run_id, student_checkpoint, ctx.cfg.tracking.register_model)
    outputs = {"table": table, "teacher": teacher_mean, "student": student_mean, "registered_version": registered,
               "student_checkpoint": student_checkpoint}
    ctx.state.finish("evaluation", **outputs)
    return outputs


def run_pipeline(
    cfg: RaysemiConfig,
    on_stage: StageCallback | None = None,
    shared: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """The whole method. ``on_stage(stage, metrics)`` is called after every stage (Ray Tune reports there).

    Args:
        shared: precomputed teacher and pseudo-labels (a Tune sweep computes them once):
            ``{"teacher": teacher outputs, "pseudo_dir": folder of v01 pseudo-labels, "pool_records": [...]}``.
        parent_run_id: MLflow run to nest this pipeline's run under (a sweep's run); default: env
            ``RAYSEMI_PARENT_RUN_ID``, else none.
    """
    ensure_ray(cfg)
    ctx = prepare_run(cfg)
    parent = mlflow_run(ctx, "parent", cfg.train.run_name, base_tags(ctx, "pipeline"), parent_run_id or _sweep_parent())
    _log_bad_cases(ctx, parent)
    if shared is None:
        teacher = train_teacher(ctx, parent)
    else:
        teacher = shared["teacher"]
    pool = pool_actor(ctx.run_dir, cfg.curriculum, cfg.train.run_name)
    if shared is None:
        pseudo_label_step(ctx, teacher["checkpoint"], pool, parent)
    elif not ctx.state.done("pseudo_labels"):
        ray.get(pool.add.remote(shared["pool_records"]))
        _link_teacher_probs(ctx, shared["pseudo_dir"])
        ctx.state.finish("pseudo_labels", shared_from=shared["pseudo_dir"])
    stages = []
    init = teacher["checkpoint"] if cfg.curriculum.student_init == "teacher" else None
    for stage in range(1, cfg.curriculum.stages + 1):
        outputs = run_stage(ctx, stage, pool, parent, init)
        stages.append(outputs)
        init = outputs["checkpoint"]
        if on_stage is not None:
            on_stage(stage, outputs["metrics"])
    evaluation = final_evaluation(ctx, teacher, stages, parent)
    tracking.finish_run(ctx.mlflow_uri, parent)
    return {"teacher": teacher, "stages": stages, "evaluation": evaluation, "run_dir": str(ctx.run_dir), "mlflow_run_id": parent}


def _log_bad_cases(ctx: RunContext, run_id: str) -> None:
    """Unlabeled cases left out at validation go to MLflow too: a count and the reasons file."""
    from raysemi.train.pipeline import BAD_CASES_FILE

    import json

    path = ctx.run_dir / BAD_CASES_FILE
    bad = json.loads(path.read_text()) if path.exists() else {}
    tracking.log_metrics(ctx.mlflow_uri, run_id, {"bad_unlabeled_cases": len(bad)})
    if bad:
        tracking.log_artifact(ctx.mlflow_uri, run_id, path, "failures")


def _link_teacher_probs(ctx: RunContext, shared_pseudo_dir: str) -> None:
    """A Tune trial reads the shared teacher probabilities through ``<run>/pseudo/v01`` (a symlink, never a copy)."""
    target = ctx.run_dir / "pseudo" / "v01"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(Path(shared_pseudo_dir).resolve(), target_is_directory=True)


def _sweep_parent() -> str | None:
    import os

    return os.environ.get("RAYSEMI_PARENT_RUN_ID") or None


def run_command(cfg: RaysemiConfig) -> dict[str, Any]:
    outputs = run_pipeline(cfg)
    print("\nValidation Dice per stage (best checkpoint of each stage):")
    named = {"teacher": outputs["teacher"]["metrics"]}
    named.update({f"student stage {i + 1}": s["metrics"] for i, s in enumerate(outputs["stages"])})
    print(validation_table(named))
    print("\nFinal evaluation on the validation cases, teacher vs student (Dice; HD95 in the reports):")
    print(outputs["evaluation"]["table"])
    print(f"\nresults: {outputs['run_dir']}/results\nMLflow parent run: {outputs['mlflow_run_id']}")
    return outputs
