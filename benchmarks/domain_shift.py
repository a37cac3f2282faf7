"""Domain-shift study (issue 11 item 4): labeled scans from site A, unlabeled and validation scans from site B.

METHOD.md ("Where the method pays off") expects pseudo-labels to pay off when the unlabeled scans come
from another site than the labeled ones. Per seed, on generated phantoms (``synth_dataset`` with
``sites={"A": 8, "B": 32}``, each site with its own contrast, noise, bias, blur and spacing):

- validation: ``data.validation_fraction`` (0.25) of the site-B scans (8), the same for every method;
- (a) **supervised**: the teacher recipe on the 8 labeled site-A scans (``train_baseline("supervised")``);
- (b) **raysemi student**: teacher on A, pseudo-labels for the 24 other site-B scans, curriculum stages
  with refinement (``run_pipeline``);
- (c) **Mean Teacher**: A labeled + the same 24 site-B scans unlabeled (``train_baseline("mean-teacher")``);
- (d) **ceiling**: supervised on those 24 site-B scans *with* their labels (the script checks that its
  split has the same validation cases and labels exactly the student's unlabeled scans).

Same model and the same number of optimiser steps for all four: the student's total (teacher epochs x
steps + stages x epochs per stage x steps, with ``train.steps_per_epoch`` fixed) is the baselines'
``train.epochs x train.steps_per_epoch``. Every final model is scored on the site-B validation cases with
``evaluate_checkpoint`` (BraTS Dice per region and class, HD95); mean ± std over the seeds (each seed
seeds the generated data, the split and training).

Outputs in ``--out`` (default ``benchmarks/out/domain_shift/``): ``domain_shift.json`` (every number per
seed, the pseudo-label quality per stage), ``domain_shift.md`` (tables and a diagnosis drawn from the
pseudo-label numbers), ``domain_shift.png`` (bars), ``domain_shift_stages.png`` (student validation Dice
per stage), plus ``data/`` (phantoms), ``runs/`` (one run folder per method and seed), ``results/``
(finished evaluations) and ``mlflow.db``. Rerunning the same command resumes: finished runs and
evaluations are reused, a half-trained fit continues from its checkpoint.

Usage::

    python benchmarks/domain_shift.py [--quick] [--seeds 0 1 2] [--config jobs/configs/domain_shift.yaml]
                                      [--set key=value ...] [--out DIR]

The aim (issue 11): (b) beats (a) by at least ``study.min_gain`` (0.05) mean ET/TC/WT Dice and beats (c).
Nothing is tuned to meet it; the report says whether it was met.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from _common import machine_info, machine_line, write_report
from _study import (
    QUICK_TRAINING,
    SCORE,
    Progress,
    cached_json,
    check_resume,
    check_shape,
    ensure_synth,
    json_safe,
    load_study,
    mean_std,
    number,
    output_dir,
    pm,
    read_summary,
    spearman,
    study_parser,
)
from raysemi.atomic import atomic_write_text
from raysemi.config import RaysemiConfig
from raysemi.errors import ConfigError, DataError
from raysemi.evaluation import plots
from raysemi.evaluation.metrics import DICE_KEYS, metric_label
from raysemi.evaluation.report import markdown_table
from raysemi.train.baselines import train_baseline
from raysemi.train.launch import ensure_ray
from raysemi.train.loop import epoch_steps
from raysemi.train.pipeline import RunContext, prepare_run
from raysemi.train.semi_pipeline import evaluate_checkpoint, run_pipeline, stage_validation, validation_metrics

NAME = "domain_shift"

METHODS: dict[str, str] = {
    "supervised": "(a) supervised, site A",
    "student": "(b) raysemi student",
    "mean_teacher": "(c) Mean Teacher",
    "ceiling": "(d) supervised, site B (ceiling)",
}
TABLE_KEYS = (
    "dice_mean_regions", "dice_region_ET", "dice_region_TC", "dice_region_WT",
    "dice_class_NCR_NET", "dice_class_ED", "dice_class_ET", "dice_mean_classes",
)
BAR_KEYS = ("dice_mean_regions", "dice_region_ET", "dice_region_TC", "dice_region_WT", "dice_class_NCR_NET", "dice_class_ED")

# --quick: the same structure scaled down (4 labeled A; 8 B = 2 validation + 6 unlabeled), 48^3 volumes,
# 32^3 patches, 2 stages; (2 + 2 x 1) x 4 = 16 optimiser steps per method. A smoke test, not a measurement.
QUICK = ("study.shape=[48, 48, 48]", "study.source_cases=4", "study.target_cases=8", "study.seeds=[0]", *QUICK_TRAINING)


class DomainShiftSettings(BaseModel):
    """The ``study:`` section of ``jobs/configs/domain_shift.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, int, int] = Field((64, 64, 64), description="Generated volume size.")
    source_site: str = Field("A", description="Site of the labeled scans.")
    target_site: str = Field("B", description="Site of the unlabeled and validation scans.")
    source_cases: int = Field(8, ge=1, description="Generated scans of the source site (all labeled).")
    target_cases: int = Field(32, ge=2, description="Generated scans of the target site (validation + unlabeled).")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Seeds of data, split and training.")
    data_root: str | None = Field(None, description="Existing multi-site data instead of generated phantoms.")
    min_gain: float = Field(0.05, description="Aim: student minus supervised, mean ET/TC/WT Dice.")

    @model_validator(mode="after")
    def _distinct_sites(self) -> "DomainShiftSettings":
        if self.source_site == self.target_site:
            raise ValueError(f"source_site and target_site must differ, both are {self.source_site!r}")
        check_shape(self.shape)
        return self


# ------------------------------------------------------------------------------------------------
# Budget and configs
# ------------------------------------------------------------------------------------------------
def steps_per_epoch(cfg: RaysemiConfig) -> int:
    """``train.steps_per_epoch``, which this study needs: a fixed step count makes budgets comparable."""
    if not cfg.train.steps_per_epoch:
        raise ConfigError(
            "train.steps_per_epoch must be set for the domain-shift study: every method gets the same number of "
            "optimiser steps, which needs a fixed step count per epoch (e.g. --set train.steps_per_epoch=16)"
        )
    return cfg.train.steps_per_epoch


def student_budget(cfg: RaysemiConfig) -> dict[str, Any]:
    """Optimiser steps of the student: teacher epochs x steps, plus stages x epochs per stage x steps."""
    k = steps_per_epoch(cfg)
    teacher = cfg.train.epochs * k
    stages = [cfg.curriculum.epochs_per_stage * k for _ in range(cfg.curriculum.stages)]
    return {"teacher": teacher, "stages": stages, "total": teacher + sum(stages)}


def method_configs(base: RaysemiConfig, settings: DomainShiftSettings, seed: int, root: Path, quick: bool) -> dict[str, RaysemiConfig]:
    """The four runs of one seed: the same data, seeds and validation sites; their own run folders."""
    source, target = settings.source_site, settings.target_site
    common = {"data.root": str(root), "data.seed": seed, "train.seed": seed, "data.labeled_fraction": 1.0,
              "data.validation_sites": [target]}
    shifted = {**common, "data.labeled_sites": [source], "data.unlabeled_sites": [target]}
    # The ceiling labels the target site's non-validation scans; every other case (site A) becomes
    # "unlabeled" and is ignored by supervised training (an empty unlabeled list would be an error).
    ceiling = {**common, "data.labeled_sites": [target], "data.unlabeled_sites": None}
    student = base.with_overrides({**shifted, "train.run_name": run_name(seed, "student", quick)})
    baseline_epochs = student_budget(student)["total"] // steps_per_epoch(student)
    return {
        "student": student,
        "supervised": base.with_overrides({**shifted, "train.epochs": baseline_epochs, "train.run_name": run_name(seed, "supervised", quick)}),
        "mean_teacher": base.with_overrides({**shifted, "train.epochs": baseline_epochs, "train.run_name": run_name(seed, "mean_teacher", quick)}),
        "ceiling": base.with_overrides({**ceiling, "train.epochs": baseline_epochs, "train.run_name": run_name(seed, "ceiling", quick)}),
    }


def run_name(seed: int, method: str, quick: bool) -> str:
    return f"{'quick-' if quick else ''}{NAME}-s{seed}-{method.replace('_', '-')}"


# ------------------------------------------------------------------------------------------------
# One seed
# ------------------------------------------------------------------------------------------------
def split_lists(ctx: RunContext) -> dict[str, list[str]]:
    return {"labeled": ctx.split.labeled, "unlabeled": ctx.split.unlabeled, "validation": ctx.split.validation}


def train_student(cfg: RaysemiConfig) -> dict[str, Any]:
    """(b): the whole raysemi pipeline; its final evaluation scores the student on the validation cases."""
    outputs = run_pipeline(cfg)
    ctx = prepare_run(cfg)  # the finished run's context (reads its manifest)
    checkpoint = outputs["stages"][-1]["checkpoint"]
    # The pipeline's final evaluation already scored this checkpoint on these cases (the same
    # evaluate_checkpoint the baselines get): its mean, and its per-case rows from the report.
    mean = outputs["evaluation"]["student"]
    rows = json.loads((Path(outputs["run_dir"]) / "results" / "student_metrics.json").read_text())["cases"]
    # Steps the pipeline took: epoch_steps gives train.steps_per_epoch whatever the case counts.
    stage_steps = [cfg.curriculum.epochs_per_stage * epoch_steps(cfg, len(ctx.split.labeled) + len(s["admitted"]))
                   for s in outputs["stages"]]
    teacher_steps = cfg.train.epochs * epoch_steps(cfg, len(ctx.split.labeled))
    return {
        "method": "student", "run_name": cfg.train.run_name, "run_dir": outputs["run_dir"], "checkpoint": checkpoint,
        "iterations": teacher_steps + sum(stage_steps), "iterations_teacher": teacher_steps, "iterations_stages": stage_steps,
        "split": split_lists(ctx), "mean": mean, "cases": rows,
        # The pipeline's own final evaluation: its teacher (site A, the teacher's share of the budget).
        "own_teacher_mean": outputs["evaluation"]["teacher"],
        "stage_validation": stage_validation(outputs["teacher"], outputs["stages"]),
        "pseudo_labels": pseudo_label_quality(Path(outputs["run_dir"]), cfg.curriculum.stages),
    }


def train_baseline_run(cfg: RaysemiConfig, method: str, student: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """(a), (c) or (d): one baseline fit with the student's budget, then its validation scores."""
    ctx = prepare_run(cfg)
    if ctx.split.validation != student["split"]["validation"]:
        raise RuntimeError(
            f"{cfg.train.run_name}: validation cases {ctx.split.validation} differ from the student's "
            f"{student['split']['validation']}; the methods would not be comparable"
        )
    outputs = train_baseline(ctx, "mean-teacher" if method == "mean_teacher" else "supervised")
    if outputs["iterations"] != student["iterations"]:
        raise RuntimeError(f"{cfg.train.run_name}: {outputs['iterations']} optimiser steps, the student took "
                           f"{student['iterations']}; the budgets must match")
    progress(f"{cfg.train.run_name}: evaluating on {len(ctx.split.validation)} validation cases")
    mean, rows = evaluate_checkpoint(ctx, outputs["checkpoint"], method)
    return {"method": method, "run_name": cfg.train.run_name, "run_dir": str(ctx.run_dir), "checkpoint": outputs["checkpoint"],
            "iterations": outputs["iterations"], "split": split_lists(ctx), "mean": mean, "cases": rows,
            "best_epoch_validation": validation_metrics(outputs["metrics"])}


def run_seed(seed: int, configs: dict[str, RaysemiConfig], results_dir: Path, progress: Progress) -> dict[str, Any]:
    """All four methods of one seed; each finished method is cached in ``results_dir/<method>.json``."""
    progress(f"seed {seed}: {METHODS['student']} ({configs['student'].train.run_name})")
    student = cached_json(results_dir / "student.json", lambda: train_student(configs["student"]))
    runs = {"student": student}
    for method in ("supervised", "mean_teacher", "ceiling"):
        progress(f"seed {seed}: {METHODS[method]} ({configs[method].train.run_name}, {student['iterations']} steps)")
        runs[method] = cached_json(
            results_dir / f"{method}.json", lambda m=method: train_baseline_run(configs[m], m, student, progress)
        )
        progress(f"seed {seed}: {METHODS[method]}: {SCORE} {number(runs[method]['mean'].get(SCORE))}")
    progress(f"seed {seed}: {METHODS['student']}: {SCORE} {number(student['mean'].get(SCORE))}")
    # The ceiling trains on exactly the scans the student saw without labels (unless broken ones were skipped).
    runs["ceiling"]["labels_student_unlabeled_scans"] = sorted(runs["ceiling"]["split"]["labeled"]) == sorted(student["split"]["unlabeled"])
    return runs


def pseudo_label_quality(run_dir: Path, stages: int) -> dict[str, Any]:
    """Teacher pseudo-labels and each stage's refinement, scored against the hidden site-B truth."""
    results = run_dir / "results"
    per_stage = []
    for stage in range(1, stages + 1):
        path = results / f"refinement_stage_{stage:02d}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        cases = data.get("cases", [])
        per_stage.append({
            "stage": stage,
            **data.get("summary", {}),
            # Does the refined confidence C' = a*C + (1-a)*A still rank pseudo-label quality?
            "confidence_truth_spearman_after": spearman([(c.get("confidence"), c.get("truth_dice_after")) for c in cases]),
        })
    return {"teacher": read_summary(results / "pseudo_labels.json") or {}, "stages": per_stage}


# ------------------------------------------------------------------------------------------------
# Summary over seeds
# ------------------------------------------------------------------------------------------------
def summarise_seeds(per_seed: dict[int, dict[str, Any]], min_gain: float) -> dict[str, Any]:
    """Mean ± std over seeds per method and metric, the aims, and the pseudo-label quality."""
    seeds = sorted(per_seed)
    methods = {}
    for method, label in METHODS.items():
        keys = [k for k in per_seed[seeds[0]][method]["mean"]]
        stats = {k: mean_std([per_seed[s][method]["mean"].get(k) for s in seeds]) for k in keys}
        methods[method] = {"label": label, "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
                           "per_seed": {str(s): per_seed[s][method]["mean"].get(SCORE) for s in seeds}}

    def diffs(a: str, b: str) -> list[float]:
        return [per_seed[s][a]["mean"][SCORE] - per_seed[s][b]["mean"][SCORE] for s in seeds]

    gain_a, gain_c, gap = diffs("student", "supervised"), diffs("student", "mean_teacher"), diffs("ceiling", "supervised")
    gain_teacher = [per_seed[s]["student"]["mean"][SCORE] - per_seed[s]["student"]["own_teacher_mean"][SCORE] for s in seeds]
    aims = {
        "student_minus_supervised": mean_std(gain_a), "student_minus_supervised_per_seed": gain_a,
        "student_minus_mean_teacher": mean_std(gain_c), "student_minus_mean_teacher_per_seed": gain_c,
        "ceiling_minus_supervised": mean_std(gap), "student_minus_own_teacher": mean_std(gain_teacher),
        "gap_closed": (mean_std(gain_a)[0] / mean_std(gap)[0]) if (mean_std(gap)[0] or 0.0) > 0 else None,
        "min_gain": min_gain,
        "beats_supervised_by_min_gain": _at_least(mean_std(gain_a)[0], min_gain),
        "beats_mean_teacher": _at_least(mean_std(gain_c)[0], 0.0, strictly=True),
        "seeds_beating_supervised_by_min_gain": sum(g >= min_gain for g in gain_a),
        "seeds_beating_mean_teacher": sum(g > 0 for g in gain_c),
    }
    return {"methods": methods, "aims": aims, "pseudo_labels": summarise_pseudo([per_seed[s]["student"] for s in seeds])}


def _at_least(value: float | None, bound: float, strictly: bool = False) -> bool:
    if value is None:
        return False
    return value > bound if strictly else value >= bound


def summarise_pseudo(students: list[dict[str, Any]]) -> dict[str, Any]:
    """Pseudo-label numbers of the student runs, mean ± std over seeds, per stage."""
    teacher_keys = ("pseudo_truth_dice", "pseudo_confidence_truth_spearman", "pseudo_high_share", "pseudo_low_share",
                    "pseudo_confidence_mean")
    teacher = {k: mean_std([s["pseudo_labels"]["teacher"].get(k) for s in students]) for k in teacher_keys}
    stage_keys = ("pseudo_truth_dice_before", "pseudo_truth_dice_after", "student_truth_dice", "agreement_mean",
                  "high_share_after", "low_share_after", "confidence_truth_spearman_after", "refined_cases")
    n_stages = max((len(s["pseudo_labels"]["stages"]) for s in students), default=0)
    stages = []
    for index in range(n_stages):
        rows = [s["pseudo_labels"]["stages"][index] for s in students if len(s["pseudo_labels"]["stages"]) > index]
        entry = {"stage": index + 1, **{k: mean_std([r.get(k) for r in rows]) for k in stage_keys}}
        changes = [r["pseudo_truth_dice_after"] - r["pseudo_truth_dice_before"] for r in rows
                   if r.get("pseudo_truth_dice_after") is not None and r.get("pseudo_truth_dice_before") is not None]
        entry["refinement_change"] = mean_std(changes)
        entry["refinement_raised"] = sum(c > 0 for c in changes)
        entry["refinement_runs"] = len(changes)
        validation = [s["stage_validation"][index + 1].get(SCORE) for s in students if len(s["stage_validation"]) > index + 1]
        entry["validation_dice_mean_regions"] = mean_std(validation)
        stages.append(entry)
    teacher_validation = mean_std([s["stage_validation"][0].get(SCORE) for s in students])
    # Validation Dice of the teacher (stage 0) and after each stage, every region and class, mean over seeds.
    curve = [
        {"stage": index, **{k: mean_std([s["stage_validation"][index].get(k) for s in students
                                         if len(s["stage_validation"]) > index])[0] for k in DICE_KEYS}}
        for index in range(max(len(s["stage_validation"]) for s in students))
    ]
    return {"teacher": teacher, "teacher_validation_dice_mean_regions": teacher_validation, "stages": stages,
            "validation_curve": curve}


def diagnosis(summary: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    """Plain statements read off the pseudo-label numbers and the final scores (no judgement beyond them)."""
    pseudo, aims = summary["pseudo_labels"], summary["aims"]
    teacher = pseudo["teacher"]
    lines = []
    dice, high, low = teacher["pseudo_truth_dice"][0], teacher["pseudo_high_share"][0], teacher["pseudo_low_share"][0]
    if dice is not None:
        lines.append(
            f"Teacher pseudo-labels (site A only, {budget['teacher']} steps) on the unlabeled site-B scans: mean ET/TC/WT "
            f"Dice {pm(*teacher['pseudo_truth_dice'])} against their hidden truth; "
            f"{number(100 * high, 1) if high is not None else 'n/a'}% of the voxels of each scan's brain box were "
            f"high-confidence (learned), {number(100 * low, 1) if low is not None else 'n/a'}% low-confidence (unlearned)."
        )
    changes = [s for s in pseudo["stages"] if s["refinement_runs"]]
    if changes:
        raised = sum(s["refinement_raised"] for s in changes)
        runs = sum(s["refinement_runs"] for s in changes)
        overall = sum(s["refinement_change"][0] * s["refinement_runs"] for s in changes) / runs
        verdict = ("raised" if overall > 0.005 else "lowered" if overall < -0.005 else "did not measurably change (|change| < 0.005)")
        per_stage = ", ".join(f"stage {s['stage']}: {number(s['pseudo_truth_dice_before'][0])} -> "
                              f"{number(s['pseudo_truth_dice_after'][0])}" for s in changes)
        lines.append(
            f"Refinement {verdict} pseudo-label Dice: mean change {number(overall, 3, signed=True)}, higher after "
            f"refinement in {raised} of {runs} stage runs ({per_stage})."
        )
        student_vs_labels = [(s["student_truth_dice"][0], s["pseudo_truth_dice_before"][0]) for s in changes
                             if s["student_truth_dice"][0] is not None and s["pseudo_truth_dice_before"][0] is not None]
        if student_vs_labels:
            better = sum(a > b for a, b in student_vs_labels)
            lines.append(
                f"The student's own predictions on the admitted scans beat the pseudo-labels it had trained on in "
                f"{better} of {len(student_vs_labels)} stages ("
                + ", ".join(f"{number(a)} vs {number(b)}" for a, b in student_vs_labels) + ")."
            )
        first = changes[0]
        if dice is not None and first["pseudo_truth_dice_before"][0] is not None and first["stage"] == 1:
            lines.append(
                f"The scans admitted first (top-ranked by confidence) had pseudo-label Dice "
                f"{number(first['pseudo_truth_dice_before'][0])} vs {number(dice)} over all unlabeled scans."
            )
    rho = teacher["pseudo_confidence_truth_spearman"][0]
    if rho is not None:
        strength = ("strongly" if rho >= 0.5 else "moderately" if rho >= 0.2 else "negatively" if rho <= -0.2 else "not")
        meaning = {
            "strongly": "the curriculum admits the better pseudo-labels first",
            "moderately": "the ranking puts better pseudo-labels first more often than not",
            "not": "the admission order is close to random with respect to quality",
            "negatively": "the curriculum admits the worse pseudo-labels first",
        }[strength]
        after = [s["confidence_truth_spearman_after"][0] for s in pseudo["stages"] if s["confidence_truth_spearman_after"][0] is not None]
        lines.append(
            f"Image-level confidence was {strength} correlated with pseudo-label quality (Spearman "
            f"{pm(*teacher['pseudo_confidence_truth_spearman'], digits=2)} over seeds): {meaning}."
            + (f" After refinement: {', '.join(number(r, 2) for r in after)} per stage." if after else "")
        )
    own = aims["student_minus_own_teacher"][0]
    if own is not None:
        lines.append(f"Final student vs its own teacher on the site-B validation cases: {number(own, 3, signed=True)} mean "
                     f"ET/TC/WT Dice (the stages' extra {sum(budget['stages'])} steps plus the pseudo-labels).")
    gain, gap = aims["student_minus_supervised"][0], aims["ceiling_minus_supervised"][0]
    lines.append(
        f"Same budget: student minus supervised {pm(*aims['student_minus_supervised'])} (aim >= {aims['min_gain']}: "
        f"{'met' if aims['beats_supervised_by_min_gain'] else 'NOT met'}), student minus Mean Teacher "
        f"{pm(*aims['student_minus_mean_teacher'])} (aim > 0: {'met' if aims['beats_mean_teacher'] else 'NOT met'}); "
        f"ceiling minus supervised {number(gap, 3, signed=True)}"
        + (f", so the student closed {number(100 * gain / gap, 0)}% of that gap." if gain is not None and gap and gap > 0 else ".")
    )
    return lines


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def markdown(summary: dict[str, Any], per_seed: dict[int, dict[str, Any]], context: dict[str, Any]) -> str:
    methods, aims, pseudo = summary["methods"], summary["aims"], summary["pseudo_labels"]
    seeds = sorted(per_seed)
    budget = context["budget"]
    first = per_seed[seeds[0]]
    n_val, n_unl, n_lab = (len(first["student"]["split"][k]) for k in ("validation", "unlabeled", "labeled"))
    lines = [
        f"# Domain shift: labeled site {context['source']}, unlabeled site {context['target']}, validation on site {context['target']}",
        "",
        ("**Quick smoke test: tiny sizes, one seed; not a measurement.**\n" if context["quick"] else ""),
        f"Machine: {context['machine_line']}. Wall time {context['wall_minutes']:.1f} min"
        f"{' (this invocation; earlier attempts not counted)' if context['resumed'] else ''}; the finished "
        f"trainings and evaluations took {context['step_minutes']:.1f} min in all.",
        "",
        f"Data per seed ({context['data']}): {n_lab} labeled site-{context['source']} scans; "
        f"site-{context['target']} scans: {n_val} validation, {n_unl} unlabeled (the ceiling trains on their labels). "
        f"Seeds {seeds}: each seeds the generated data, the split and training.",
        "",
        f"Budget: every method takes {budget['total']} optimiser steps of {context['batch_size']} patches "
        f"{tuple(context['patch_size'])}: the student's teacher {budget['teacher']} + stages {' + '.join(map(str, budget['stages']))}; "
        f"each baseline {budget['total'] // context['steps_per_epoch']} epochs x {context['steps_per_epoch']} steps. "
        f"Model `{context['preset']}`, {context['mc_passes']} MC-dropout passes for pseudo-labels.",
        "",
        f"## Validation Dice on site {context['target']} (mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
        "",
        markdown_table(
            ["method", *[metric_label(k).removeprefix("Dice ") for k in TABLE_KEYS]],
            [[m["label"], *[pm(m["mean"].get(k), m["std"].get(k)) for k in TABLE_KEYS]] for m in methods.values()],
        ),
        "## Aims (mean ET/TC/WT Dice, same budget)",
        "",
        markdown_table(
            ["comparison", "difference (mean ± std)", "per seed", "aim", "met"],
            [
                ["(b) - (a)", pm(*aims["student_minus_supervised"]), ", ".join(number(v, 3, True) for v in aims["student_minus_supervised_per_seed"]),
                 f">= {aims['min_gain']}", f"{'yes' if aims['beats_supervised_by_min_gain'] else 'NO'} "
                 f"(seeds: {aims['seeds_beating_supervised_by_min_gain']} of {len(seeds)})"],
                ["(b) - (c)", pm(*aims["student_minus_mean_teacher"]), ", ".join(number(v, 3, True) for v in aims["student_minus_mean_teacher_per_seed"]),
                 "> 0", f"{'yes' if aims['beats_mean_teacher'] else 'NO'} (seeds: {aims['seeds_beating_mean_teacher']} of {len(seeds)})"],
                ["(d) - (a)", pm(*aims["ceiling_minus_supervised"]), "", "", ""],
                ["(b) - its own teacher", pm(*aims["student_minus_own_teacher"]), "", "", ""],
            ],
        ),
        "## Per seed (mean ET/TC/WT Dice)",
        "",
        markdown_table(["method", *[f"seed {s}" for s in seeds]],
                       [[m["label"], *[number(m["per_seed"][str(s)]) for s in seeds]] for m in methods.values()]),
        f"## Pseudo-labels of the unlabeled site-{context['target']} scans (student runs, against hidden truth)",
        "",
        "Teacher: pseudo-label Dice " + pm(*pseudo["teacher"]["pseudo_truth_dice"])
        + ", confidence-vs-Dice Spearman " + pm(*pseudo["teacher"]["pseudo_confidence_truth_spearman"], digits=2)
        + ", high/low-confidence voxel share " + pm(*pseudo["teacher"]["pseudo_high_share"]) + " / "
        + pm(*pseudo["teacher"]["pseudo_low_share"]) + "; teacher validation Dice "
        + pm(*pseudo["teacher_validation_dice_mean_regions"]) + ".",
        "",
        markdown_table(
            ["stage", "admitted", "Dice before refinement", "Dice after", "student on admitted", "agreement",
             "high share", "low share", "Spearman after", "validation Dice"],
            [[s["stage"], number(s["refined_cases"][0], 0 if len(seeds) == 1 else 1), pm(*s["pseudo_truth_dice_before"]), pm(*s["pseudo_truth_dice_after"]),
              pm(*s["student_truth_dice"]), pm(*s["agreement_mean"]), pm(*s["high_share_after"]), pm(*s["low_share_after"]),
              pm(*s["confidence_truth_spearman_after"], digits=2), pm(*s["validation_dice_mean_regions"])]
             for s in pseudo["stages"]],
        ),
        "## Diagnosis",
        "",
        *[f"- {line}" for line in summary["diagnosis"]],
        "",
        "## Notes",
        "",
        "- Dice per region (ET, TC, WT) and class (NCR/NET, ED, ET) from `evaluate_checkpoint` (dropout off, sliding "
        "window) on the validation cases; HD95 is in the JSON. Std is the population std over seeds.",
        "- Model selection: each fit keeps the epoch with the best validation Dice on these same validation cases "
        "(for every method alike; there is no separate test set, so all numbers are slightly optimistic).",
        f"- Every method validated on the same {n_val} site-{context['target']} scans (checked before training). The ceiling "
        "trained on exactly the student's unlabeled scans, with labels: "
        + ", ".join(f"seed {s}: {'yes' if per_seed[s]['ceiling'].get('labels_student_unlabeled_scans') else 'NO'}" for s in seeds) + ".",
        "- Pseudo-label Dice is the mean ET/TC/WT Dice against the hidden truth; \"before\"/\"after\" are the same "
        "admitted scans before and after that stage's refinement. Shares are of the voxels of each scan's brain box.",
        f"- Files: {NAME}.json (every number per seed and case), {NAME}.png, {NAME}_stages.png; runs in runs/, "
        "MLflow store mlflow.db (unless MLFLOW_TRACKING_URI was set).",
    ]
    return "\n".join(lines) + "\n"


def write_plots(summary: dict[str, Any], out_dir: Path) -> list[str]:
    bars = {m["label"]: {k: (m["mean"][k], m["std"][k] or 0.0) for k in BAR_KEYS if m["mean"].get(k) is not None}
            for m in summary["methods"].values()}
    written = [str(plots.bar_comparison(bars, out_dir / f"{NAME}.png"))]
    points = [{k: v for k, v in point.items() if v is not None} for point in summary["pseudo_labels"]["validation_curve"]]
    if any(len(point) > 1 for point in points):
        written.append(str(plots.stage_dice(points, out_dir / f"{NAME}_stages.png")))
    return written


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def prepare_data(seed: int, settings: DomainShiftSettings, out_dir: Path, progress: Progress) -> Path:
    """Phantoms of one seed in ``<out>/data/seed_<seed>`` (reused when finished), or ``study.data_root``."""
    if settings.data_root:
        return Path(settings.data_root).expanduser().resolve()
    from raysemi.data.synth import synth_dataset

    root = out_dir / "data" / f"seed_{seed}"
    sites = {settings.source_site: settings.source_cases, settings.target_site: settings.target_cases}
    spec = {"shape": list(settings.shape), "sites": sites, "seed": seed, "spacing": "per site"}

    def generate() -> None:
        progress(f"seed {seed}: generating {sum(sites.values())} phantoms {tuple(settings.shape)} {sites} into {root}")
        synth_dataset(root, None, settings.shape, None, seed=seed, sites=sites, workers=min(2, os.cpu_count() or 1))

    ensure_synth(root, spec, generate)
    return root


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study (or resume it) and write the report; returns the report's ``results``."""
    args = study_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    out_dir = output_dir(args.out, NAME, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, settings = load_study(args.config, args.overrides, QUICK if args.quick else (), DomainShiftSettings, out_dir)
    seeds = args.seeds or settings.seeds
    budget = student_budget(base)
    resumed = (out_dir / "results").exists()
    check_resume(out_dir, {"config": {k: v for k, v in base.to_dict().items() if k != "tracking"},
                           "study": settings.model_dump(exclude={"seeds"}), "quick": args.quick})
    progress = Progress(NAME)
    progress(f"output {out_dir}; seeds {seeds}; {budget['total']} optimiser steps per method "
             f"(student: teacher {budget['teacher']} + stages {budget['stages']})")

    roots = {seed: prepare_data(seed, settings, out_dir, progress) for seed in seeds}
    ensure_ray(base)
    per_seed: dict[int, dict[str, Any]] = {}
    for index, seed in enumerate(seeds):
        progress(f"=== seed {seed} ({index + 1}/{len(seeds)}) ===")
        configs = method_configs(base, settings, seed, roots[seed], args.quick)
        per_seed[seed] = run_seed(seed, configs, out_dir / "results" / f"seed_{seed}", progress)

    summary = json_safe(summarise_seeds(per_seed, settings.min_gain))
    summary["diagnosis"] = diagnosis(summary, budget)
    machine = machine_info()
    context = {
        "quick": args.quick, "machine_line": machine_line(machine), "wall_minutes": (time.perf_counter() - started) / 60,
        "resumed": resumed, "step_minutes": sum(r.get("step_seconds", 0.0) for runs in per_seed.values() for r in runs.values()) / 60,
        "budget": budget, "source": settings.source_site, "target": settings.target_site,
        "data": settings.data_root or f"generated phantoms {tuple(settings.shape)}, each site's own spacing",
        "batch_size": base.train.batch_size, "patch_size": base.data.patch_size, "steps_per_epoch": base.train.steps_per_epoch,
        "preset": base.model.preset, "mc_passes": base.model.mc_passes,
    }
    pngs = write_plots(summary, out_dir)
    atomic_write_text(out_dir / f"{NAME}.md", markdown(summary, per_seed, context))
    results = {**summary, "per_seed": {str(s): runs for s, runs in per_seed.items()}, "plots": pngs}
    settings_out = {"config": base.to_dict(), "study": settings.model_dump(), "seeds": seeds, "budget": budget,
                    "wall_minutes": context["wall_minutes"], "resumed": resumed}
    write_report(out_dir / f"{NAME}.json", NAME, args.quick, json_safe(settings_out), json_safe(results), [],
                 notes=summary["diagnosis"], machine=machine)
    print(markdown_table(["method", "mean ET/TC/WT Dice"],
                         [[m["label"], pm(m["mean"].get(SCORE), m["std"].get(SCORE))] for m in summary["methods"].values()]))
    for line in summary["diagnosis"]:
        print(f"- {line}")
    progress(f"done: {out_dir / (NAME + '.md')}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as exc:  # a bad config or data set: the message says what to fix
        sys.exit(f"{NAME}: {exc}")
