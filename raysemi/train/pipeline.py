"""The steps of a raysemi run, each resumable from the run folder's ``state.json``.

``prepare_run`` (validate + split + manifest) -> ``train_teacher`` -> (``raysemi run`` adds, in
:mod:`raysemi.train.semi_pipeline`) pseudo-labels -> curriculum stages -> final evaluation.

The driver only orchestrates: case validation runs in Ray tasks, training in Ray Train workers,
pseudo-labeling in Ray Data actor pools.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raysemi import tracking
from raysemi.config import RaysemiConfig
from raysemi.data.brats import CaseProblem, CaseRecord, Split, discover_cases, make_split, read_manifest, validate_case
from raysemi.data.pipeline import PatchSpec, TrainingItem, training_dataset
from raysemi.errors import DataError
from raysemi.evaluation.metrics import DICE_KEYS
from raysemi.evaluation.report import markdown_table
from raysemi.train.checkpoint import load_meta, load_model
from raysemi.train.launch import best_checkpoint_dir, ensure_ray, fit
from raysemi.train.loop import TrainJob, epoch_steps, stream_repeats
from raysemi.train.state import RunState

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BAD_CASES_FILE = "bad_cases.json"


@dataclass
class RunContext:
    """What every step of one run shares."""

    cfg: RaysemiConfig
    run_dir: Path
    split: Split
    state: RunState
    mlflow_uri: str

    def cases(self, ids: list[str]) -> list[CaseRecord]:
        return [self.split.cases[i] for i in ids]


@ray.remote(num_cpus=1)
def _validate_chunk(cases: list[dict[str, Any]], require_seg: list[str]) -> dict[str, list[dict[str, str]]]:
    needed = set(require_seg)
    out = {}
    for raw in cases:
        case = CaseRecord.from_dict(raw)
        out[case.case_id] = [vars(p) for p in validate_case(case, require_seg=case.case_id in needed)]
    return out


def validate_with_ray(cases: list[CaseRecord], require_seg: list[str], chunk: int = 8) -> dict[str, list[CaseProblem]]:
    """Validate cases in parallel Ray tasks (a BraTS folder holds thousands of volumes)."""
    refs = [
        _validate_chunk.remote([c.to_dict() for c in cases[i : i + chunk]], require_seg)
        for i in range(0, len(cases), chunk)
    ]
    problems: dict[str, list[CaseProblem]] = {}
    for result in ray.get(refs):
        for case_id, items in result.items():
            problems[case_id] = [CaseProblem(**item) for item in items]
    return problems


def prepare_run(cfg: RaysemiConfig) -> RunContext:
    """Validate every case and write the split manifest, or reuse the manifest of an earlier attempt.

    A broken labeled or validation case stops the run here, before any training, with its reason.
    A broken unlabeled case is reported (log, ``bad_cases.json``, MLflow) and left out.
    """
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(run_dir)
    manifest = run_dir / MANIFEST_FILE
    uri = cfg.tracking_uri()
    if state.done("prepare") and manifest.exists():
        return RunContext(cfg, run_dir, read_manifest(manifest), state, uri)

    cases = discover_cases(cfg.data.root, site_map=cfg.data.site_map)
    split = make_split(
        cases,
        labeled_fraction=cfg.data.labeled_fraction,
        validation_fraction=cfg.data.validation_fraction,
        seed=cfg.data.seed,
        labeled_sites=cfg.data.labeled_sites,
        unlabeled_sites=cfg.data.unlabeled_sites,
        validation_sites=cfg.data.validation_sites,
        max_labeled=cfg.data.max_labeled,
    )
    in_use = split.labeled + split.validation + split.unlabeled
    must_have_seg = split.labeled + split.validation + split.hidden_truth
    print(f"[raysemi] validating {len(in_use)} cases ...", flush=True)
    problems = validate_with_ray([split.cases[i] for i in in_use], must_have_seg)
    fatal = {i: p for i in split.labeled + split.validation if (p := problems.get(i))}
    if fatal:
        lines = "\n".join(f"  {problem}" for items in fatal.values() for problem in items)
        raise DataError(
            f"{len(fatal)} labeled/validation case(s) are broken; fix or remove them before training:\n{lines}"
        )
    bad_unlabeled = {i: "; ".join(str(p) for p in items) for i in split.unlabeled if (items := problems.get(i))}
    for case_id, reason in bad_unlabeled.items():
        log.error("skipping unlabeled case %s: %s", case_id, reason)
        print(f"[raysemi] skipping unlabeled case {case_id}: {reason}", flush=True)
    split = split.exclude(bad_unlabeled)
    from raysemi.atomic import atomic_write_json

    atomic_write_json(run_dir / BAD_CASES_FILE, bad_unlabeled)
    split.write_manifest(manifest)
    cfg.save(run_dir / "config.yaml")
    state.finish("prepare", manifest=str(manifest), bad_cases=sorted(bad_unlabeled))
    print(
        f"[raysemi] split: {len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled, "
        f"{len(split.validation)} validation, {len(bad_unlabeled)} skipped -> {manifest}",
        flush=True,
    )
    return RunContext(cfg, run_dir, split, state, uri)


def mlflow_run(ctx: RunContext, key: str, run_name: str, tags: dict[str, Any], parent: str | None = None) -> str:
    """Get the MLflow run recorded under ``key`` in state.json, or create it (nested under ``parent``).

    A nested run that a killed driver created but did not record is found by name and adopted.
    """
    run_id = ctx.state.mlflow.get(key)
    if tracking.run_exists(ctx.mlflow_uri, run_id):
        return run_id
    run_id = parent and tracking.find_child_run(ctx.mlflow_uri, ctx.cfg.tracking.experiment, parent, run_name)
    if not run_id:
        run_id = tracking.create_run(ctx.mlflow_uri, ctx.cfg.tracking.experiment, run_name, tags, parent)
    tracking.log_params(ctx.mlflow_uri, run_id, ctx.cfg.flat())  # the same values again when adopted
    ctx.state.set_run_id(key, run_id)
    return run_id


def base_tags(ctx: RunContext, role: str, stage: int = 0) -> dict[str, Any]:
    return {
        "raysemi.role": role,
        "raysemi.stage": stage,
        "raysemi.labeled_fraction": ctx.cfg.data.labeled_fraction,
        "raysemi.run": ctx.cfg.train.run_name,
        "raysemi.labeled_cases": len(ctx.split.labeled),
        "raysemi.unlabeled_cases": len(ctx.split.unlabeled),
    }


def train_teacher(ctx: RunContext, parent_run_id: str | None = None) -> dict[str, Any]:
    """Supervised teacher on the labeled cases; resumes a partly trained teacher at its next epoch."""
    cfg = ctx.cfg
    if ctx.state.done("teacher"):
        return ctx.state.get("teacher")
    run_id = mlflow_run(ctx, "teacher", f"{cfg.train.run_name}-teacher", base_tags(ctx, "teacher"), parent_run_id)
    items = [TrainingItem(case) for case in ctx.cases(ctx.split.labeled)]
    steps = epoch_steps(cfg, len(items))
    job = TrainJob(
        role="teacher",
        epochs=cfg.train.epochs,
        steps_per_epoch=steps,
        validation=[c.to_dict() for c in ctx.cases(ctx.split.validation)],
        mlflow_uri=ctx.mlflow_uri,
        mlflow_run_id=run_id,
        plots_dir=str(ctx.run_dir / "results" / "plots"),
    )
    repeats = stream_repeats(cfg, len(items), cfg.train.epochs, steps)
    dataset = training_dataset(items, PatchSpec.from_config(cfg.data, cfg.train.seed), repeats=repeats)
    print(f"[raysemi] teacher: {len(items)} labeled cases, {cfg.train.epochs} epochs x {steps} steps", flush=True)
    result = fit(cfg, job, dataset, ctx.run_dir, "teacher")
    best = best_checkpoint_dir(result)
    metrics = {k: v for k, v in load_meta(best)["metrics"].items() if k.startswith("val_")}
    registered = finish_model(ctx, run_id, best, cfg.tracking.register_model and f"{cfg.tracking.register_model}-teacher")
    outputs = {"checkpoint": best, "metrics": metrics, "mlflow_run_id": run_id, "registered_version": registered}
    ctx.state.finish("teacher", **outputs)
    return outputs


def finish_model(ctx: RunContext, run_id: str, checkpoint_dir: str, registered_name: str | None) -> str | None:
    """Log the best checkpoint's model to MLflow (signature + weights-only checkpoint) and register it."""
    if not ctx.cfg.tracking.log_models:
        return None
    model, _ = load_model(checkpoint_dir)
    side = ctx.cfg.data.patch_size
    example = np.zeros((1, 4, *side), dtype=np.float32)
    try:
        return tracking.log_model(ctx.mlflow_uri, run_id, model, checkpoint_dir, example, registered_name or None)
    except Exception as exc:  # noqa: BLE001 - the trained checkpoint is on disk either way
        log.warning("could not log/register the model in MLflow: %s", exc)
        return None


def validation_table(named: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per model, Dice per region (ET/TC/WT) and per class (NCR/NET, ED, ET)."""
    keys = [k for k in DICE_KEYS]
    headers = ["model", *[k.removeprefix("dice_").replace("region_", "").replace("class_", "class ") for k in keys]]
    rows = [[name, *[metrics.get(f"val_{k}", metrics.get(k, float("nan"))) for k in keys]] for name, metrics in named.items()]
    return markdown_table(headers, rows)


def train_teacher_command(cfg: RaysemiConfig) -> dict[str, Any]:
    """``raysemi train-teacher``: prepare, train, log, print the validation table."""
    ensure_ray(cfg)
    ctx = prepare_run(cfg)
    outputs = train_teacher(ctx)
    print("\nTeacher validation Dice (best checkpoint):")
    print(validation_table({"teacher": outputs["metrics"]}))
    print(f"\ncheckpoint: {outputs['checkpoint']}\nMLflow: {ctx.mlflow_uri} (run {outputs['mlflow_run_id']})")
    tracking.finish_run(ctx.mlflow_uri, outputs["mlflow_run_id"])
    return outputs


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
