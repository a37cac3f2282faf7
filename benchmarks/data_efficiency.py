"""Data-efficiency study (issue 5 item 9): supervised teacher vs raysemi student at several labeled fractions.

On generated single-site phantoms (``study.cases`` scans of ``study.site``), per seed and labeled fraction
(10 %, 25 %, 50 %, 100 % by default):

- ``data.validation_fraction`` of the scans validate (the same scans at every fraction: the split draws
  validation first); of the others, the labeled fraction keeps its labels and the rest are unlabeled
  (their truth stays hidden from training and only scores the pseudo-labels). The labeled sets are
  nested: a larger fraction adds scans to a smaller one's.
- ``run_pipeline``: the teacher on the labeled scans, pseudo-labels, curriculum stages with refinement;
  the validation Dice of the teacher (stage 0) and after every stage (the paper's Figure 5), and both
  final models scored by the pipeline's own evaluation (``evaluate_checkpoint``).
- At 100 % no unlabeled scan is left, and the pipeline needs some (pseudo-labeling would fail on an
  empty set), so only the teacher is trained and reported there: the student would be the teacher. The
  same holds for any fraction whose split leaves no unlabeled scan.

Budgets are documented, not matched (the domain-shift study matches them): with ``train.steps_per_epoch``
fixed, every teacher takes ``train.epochs x steps`` optimiser steps whatever its number of labeled scans,
and every student that plus ``stages x epochs_per_stage x steps``. The report lists both per fraction.

Outputs in ``--out`` (default ``benchmarks/out/data_efficiency/``): ``data_efficiency.json``,
``data_efficiency.md``, ``data_efficiency.png`` (Dice vs labeled fraction) and
``data_efficiency_stages_f<percent>.png`` (validation Dice per stage), plus ``data/``, ``runs/``,
``results/`` and ``mlflow.db``. Rerunning the same command resumes where it stopped.

Usage::

    python benchmarks/data_efficiency.py [--quick] [--seeds 0 1 2] [--config jobs/configs/data_efficiency.yaml]
                                         [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    study_parser,
)
from raysemi.atomic import atomic_write_text
from raysemi.config import RaysemiConfig
from raysemi.errors import ConfigError, DataError
from raysemi.evaluation import plots
from raysemi.evaluation.metrics import DICE_KEYS, metric_label
from raysemi.evaluation.report import markdown_table
from raysemi.train.launch import ensure_ray
from raysemi.train.loop import epoch_steps
from raysemi.train.pipeline import prepare_run, train_teacher
from raysemi.train.semi_pipeline import evaluate_checkpoint, run_pipeline, stage_validation

NAME = "data_efficiency"
TABLE_KEYS = ("dice_mean_regions", "dice_region_ET", "dice_region_TC", "dice_region_WT",
              "dice_class_NCR_NET", "dice_class_ED", "dice_class_ET")
TEACHER, STUDENT = "supervised teacher", "raysemi student"

# --quick: 10 scans of 48^3 (2 validate, 8 in the pool), 32^3 patches, fractions 25 % (2 labeled + 6
# unlabeled: the whole pipeline) and 100 % (teacher only); 2 stages; teachers 8 steps, students 16.
QUICK = ("study.shape=[48, 48, 48]", "study.cases=10", "study.fractions=[0.25, 1.0]", "study.seeds=[0]", *QUICK_TRAINING)


class DataEfficiencySettings(BaseModel):
    """The ``study:`` section of ``jobs/configs/data_efficiency.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, int, int] = Field((64, 64, 64), description="Generated volume size.")
    site: str = Field("A", description="The acquisition site of the generated scans.")
    cases: int = Field(40, ge=3, description="Generated scans (validation + labeled + unlabeled).")
    fractions: list[float] = Field([0.1, 0.25, 0.5, 1.0], min_length=1, description="Labeled fractions.")
    seeds: list[int] = Field([0], min_length=1, description="Seeds of data, split and training.")
    data_root: str | None = Field(None, description="Existing cases instead of generated phantoms.")

    @field_validator("fractions")
    @classmethod
    def _in_unit_interval(cls, value: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in value) or len(set(value)) != len(value):
            raise ValueError(f"fractions must be distinct values in (0, 1], got {value}")
        return sorted(value)

    @field_validator("shape")
    @classmethod
    def _big_enough(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        check_shape(value)
        return value


def run_name(seed: int, fraction: float, quick: bool) -> str:
    return f"{'quick-' if quick else ''}{NAME}-s{seed}-f{percent(fraction)}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:g}".replace(".", "p")


def run_fraction(cfg: RaysemiConfig, progress: Progress) -> dict[str, Any]:
    """One labeled fraction: the whole pipeline, or the teacher alone when no unlabeled scan is left."""
    ctx = prepare_run(cfg)
    n_labeled, n_unlabeled = len(ctx.split.labeled), len(ctx.split.unlabeled)
    teacher_steps = cfg.train.epochs * epoch_steps(cfg, n_labeled)
    common = {"run_name": cfg.train.run_name, "run_dir": str(ctx.run_dir), "labeled_fraction": cfg.data.labeled_fraction,
              "labeled": ctx.split.labeled, "unlabeled": ctx.split.unlabeled, "validation": ctx.split.validation,
              "iterations_teacher": teacher_steps}
    if n_unlabeled == 0:
        progress(f"{cfg.train.run_name}: {n_labeled} labeled, no unlabeled scan: teacher only (the student would be the teacher)")
        teacher = train_teacher(ctx)
        mean, _ = evaluate_checkpoint(ctx, teacher["checkpoint"], "teacher")
        return {**common, "student_trained": False, "teacher": mean, "student": None,
                "stage_validation": stage_validation(teacher, []), "iterations_student": None,
                "pseudo_labels": None}
    progress(f"{cfg.train.run_name}: {n_labeled} labeled + {n_unlabeled} unlabeled scans: the whole pipeline")
    outputs = run_pipeline(cfg)
    stage_steps = [cfg.curriculum.epochs_per_stage * epoch_steps(cfg, n_labeled + len(s["admitted"])) for s in outputs["stages"]]
    results = Path(outputs["run_dir"]) / "results"
    refinements = [read_summary(results / f"refinement_stage_{s:02d}.json") for s in range(1, cfg.curriculum.stages + 1)]
    return {
        **common, "student_trained": True,
        "teacher": outputs["evaluation"]["teacher"], "student": outputs["evaluation"]["student"],
        "stage_validation": stage_validation(outputs["teacher"], outputs["stages"]),
        "iterations_student": teacher_steps + sum(stage_steps),
        "iterations_stages": stage_steps,
        "pseudo_labels": {"teacher": read_summary(results / "pseudo_labels.json") or {},
                          "stages": [{"stage": i + 1, **r} for i, r in enumerate(refinements) if r is not None]},
    }


# ------------------------------------------------------------------------------------------------
# Summary and report
# ------------------------------------------------------------------------------------------------
def summarise(per_seed: dict[int, dict[str, dict[str, Any]]], fractions: list[float]) -> dict[str, Any]:
    """Per fraction: teacher and student Dice (mean ± std over seeds), stage curve, pseudo-labels, budgets."""
    seeds = sorted(per_seed)
    rows = []
    for fraction in fractions:
        runs = [per_seed[s][percent(fraction)] for s in seeds]
        trained = [r for r in runs if r["student_trained"]]
        entry: dict[str, Any] = {
            "labeled_fraction": fraction,
            "labeled": mean_std([len(r["labeled"]) for r in runs])[0],
            "unlabeled": mean_std([len(r["unlabeled"]) for r in runs])[0],
            "teacher": {k: mean_std([r["teacher"].get(k) for r in runs]) for k in DICE_KEYS},
            "student": {k: mean_std([r["student"].get(k) for r in trained]) for k in DICE_KEYS} if trained else None,
            "student_minus_teacher": mean_std([r["student"][SCORE] - r["teacher"][SCORE] for r in trained]) if trained else None,
            "iterations_teacher": runs[0]["iterations_teacher"],
            "iterations_student": runs[0]["iterations_student"],
        }
        n_stages = max(len(r["stage_validation"]) for r in runs)
        entry["stages"] = [
            {"stage": i, **{k: mean_std([r["stage_validation"][i].get(k) for r in runs if len(r["stage_validation"]) > i])[0]
                            for k in DICE_KEYS}}
            for i in range(n_stages)
        ]
        if trained:
            entry["pseudo_teacher_dice"] = mean_std([r["pseudo_labels"]["teacher"].get("pseudo_truth_dice") for r in trained])
            entry["pseudo_spearman"] = mean_std([r["pseudo_labels"]["teacher"].get("pseudo_confidence_truth_spearman") for r in trained])
            n_ref = max(len(r["pseudo_labels"]["stages"]) for r in trained)
            entry["refinement"] = [
                {"stage": i + 1, **{k: mean_std([r["pseudo_labels"]["stages"][i].get(k) for r in trained
                                                  if len(r["pseudo_labels"]["stages"]) > i])
                                    for k in ("pseudo_truth_dice_before", "pseudo_truth_dice_after", "student_truth_dice")}}
                for i in range(n_ref)
            ]
        rows.append(entry)
    points = [{"labeled_fraction": f, "method": TEACHER, "dice": per_seed[s][percent(f)]["teacher"][SCORE]} for f in fractions for s in seeds]
    points += [{"labeled_fraction": f, "method": STUDENT, "dice": per_seed[s][percent(f)]["student"][SCORE]}
               for f in fractions for s in seeds if per_seed[s][percent(f)]["student_trained"]]
    return {"fractions": rows, "points": points}


def markdown(summary: dict[str, Any], context: dict[str, Any]) -> str:
    rows = summary["fractions"]
    n_seeds = len(context["seeds"])
    dice_table = []
    for r in rows:
        dice_table.append([f"{percent(r['labeled_fraction'])}%", TEACHER, int(r["labeled"]), int(r["unlabeled"]), r["iterations_teacher"],
                           *[pm(*r["teacher"][k]) for k in TABLE_KEYS]])
        if r["student"] is None:
            dice_table.append([f"{percent(r['labeled_fraction'])}%", STUDENT, "", "", "",
                               *["— (no unlabeled scans: student = teacher)"] + [""] * (len(TABLE_KEYS) - 1)])
        else:
            dice_table.append([f"{percent(r['labeled_fraction'])}%", STUDENT, "", "", r["iterations_student"],
                               *[pm(*r["student"][k]) for k in TABLE_KEYS]])
    stage_count = max(len(r["stages"]) for r in rows)
    stage_table = [[f"{percent(r['labeled_fraction'])}%", *[number(r["stages"][i].get(SCORE)) if i < len(r["stages"]) else "" for i in range(stage_count)]]
                   for r in rows]
    pseudo_table = []
    for r in rows:
        if r["student"] is None:
            continue
        stages = "; ".join(f"{s['stage']}: {number(s['pseudo_truth_dice_before'][0])} -> {number(s['pseudo_truth_dice_after'][0])} "
                           f"(student {number(s['student_truth_dice'][0])})" for s in r["refinement"])
        pseudo_table.append([f"{percent(r['labeled_fraction'])}%", pm(*r["pseudo_teacher_dice"]), pm(*r["pseudo_spearman"], digits=2),
                             stages, pm(*r["student_minus_teacher"])])
    lines = [
        "# Data efficiency: supervised teacher vs raysemi student",
        "",
        ("**Quick smoke test: tiny sizes, one seed; not a measurement.**\n" if context["quick"] else ""),
        f"Machine: {context['machine_line']}. Wall time {context['wall_minutes']:.1f} min"
        f"{' (this invocation; earlier attempts not counted)' if context['resumed'] else ''}; the finished "
        f"trainings and evaluations took {context['step_minutes']:.1f} min in all.",
        "",
        f"Data: {context['data']}; {context['n_validation']} validation scans (the same at every fraction), the "
        f"labeled fraction of the other {context['n_pool']} keeps its labels, the rest are unlabeled. Seeds "
        f"{context['seeds']} (each seeds the data, the split and training); mean ± population std over "
        f"{n_seeds} seed{'s' if n_seeds > 1 else ''}.",
        "",
        f"Budgets (optimiser steps of {context['batch_size']} patches {tuple(context['patch_size'])}; not matched): every "
        f"teacher {context['teacher_steps']} ({context['epochs']} epochs x {context['steps']} steps), every student that plus "
        f"{context['stages']} stages x {context['epochs_per_stage']} epochs x {context['steps']} steps. Model "
        f"`{context['preset']}`, {context['mc_passes']} MC-dropout passes. At 100 % no unlabeled scans are left and the "
        "pipeline cannot run a student, so only the teacher is reported there.",
        "",
        "## Validation Dice on the held-out scans",
        "",
        markdown_table(["labeled", "model", "labeled scans", "unlabeled scans", "steps",
                        *[metric_label(k).removeprefix("Dice ") for k in TABLE_KEYS]], dice_table),
        "## Validation Dice (mean ET/TC/WT) after every stage (stage 0 = teacher; best epoch of each stage)",
        "",
        markdown_table(["labeled", *[f"stage {i}" for i in range(stage_count)]], stage_table),
    ]
    if pseudo_table:
        lines += [
            "## Pseudo-labels of the unlabeled scans (against their hidden truth)",
            "",
            markdown_table(["labeled", "teacher pseudo-label Dice", "confidence-vs-Dice Spearman",
                            "per stage: Dice before -> after refinement (student's own prediction)",
                            "student - teacher (validation)"], pseudo_table),
        ]
    lines += [
        "## Notes",
        "",
        "- Final Dice from the pipeline's evaluation (`evaluate_checkpoint`: dropout off, sliding window); per region "
        "(ET, TC, WT) and class (NCR/NET, ED, ET), with HD95 in the JSON.",
        "- Model selection: each fit keeps its epoch with the best validation Dice on these same validation scans "
        "(teacher and student alike; no separate test set).",
        "- METHOD.md expects little from pseudo-labels on single-site data (a few labeled phantoms already reach the "
        "Dice of many); benchmarks/domain_shift.py measures the cross-site case with matched budgets.",
        f"- Files: {NAME}.json, {NAME}.png (Dice vs labeled fraction), {NAME}_stages_f<percent>.png; runs in runs/, "
        "MLflow store mlflow.db (unless MLFLOW_TRACKING_URI was set).",
    ]
    return "\n".join(lines) + "\n"


def write_plots(summary: dict[str, Any], out_dir: Path) -> list[str]:
    written = [str(plots.data_efficiency(summary["points"], out_dir / f"{NAME}.png"))]
    for r in summary["fractions"]:
        points = [s for s in r["stages"] if any(s.get(k) is not None for k in DICE_KEYS)]
        if len(points) > 1:
            points = [{k: v for k, v in s.items() if v is not None} for s in points]
            written.append(str(plots.stage_dice(points, out_dir / f"{NAME}_stages_f{percent(r['labeled_fraction'])}.png")))
    return written


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def prepare_data(seed: int, settings: DataEfficiencySettings, out_dir: Path, progress: Progress) -> Path:
    """Phantoms of one seed in ``<out>/data/seed_<seed>`` (reused when finished), or ``study.data_root``."""
    if settings.data_root:
        return Path(settings.data_root).expanduser().resolve()
    from raysemi.data.synth import synth_dataset

    root = out_dir / "data" / f"seed_{seed}"
    spec = {"shape": list(settings.shape), "sites": {settings.site: settings.cases}, "seed": seed, "spacing": [1.0, 1.0, 1.0]}

    def generate() -> None:
        progress(f"seed {seed}: generating {settings.cases} site-{settings.site} phantoms {tuple(settings.shape)} into {root}")
        synth_dataset(root, None, settings.shape, (1.0, 1.0, 1.0), seed=seed, sites={settings.site: settings.cases},
                      workers=min(2, os.cpu_count() or 1))

    ensure_synth(root, spec, generate)
    return root


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study (or resume it) and write the report; returns the report's ``results``."""
    args = study_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    out_dir = output_dir(args.out, NAME, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, settings = load_study(args.config, args.overrides, QUICK if args.quick else (), DataEfficiencySettings, out_dir)
    seeds = args.seeds or settings.seeds
    resumed = (out_dir / "results").exists()
    check_resume(out_dir, {"config": {k: v for k, v in base.to_dict().items() if k != "tracking"},
                           "study": settings.model_dump(exclude={"seeds"}), "quick": args.quick})
    progress = Progress(NAME)
    progress(f"output {out_dir}; seeds {seeds}; labeled fractions {settings.fractions}")

    roots = {seed: prepare_data(seed, settings, out_dir, progress) for seed in seeds}
    ensure_ray(base)
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds:
        per_seed[seed] = {}
        for fraction in settings.fractions:
            cfg = base.with_overrides({"data.root": str(roots[seed]), "data.seed": seed, "train.seed": seed,
                                       "data.labeled_fraction": fraction, "train.run_name": run_name(seed, fraction, args.quick)})
            progress(f"=== seed {seed}, {percent(fraction)}% labeled ({cfg.train.run_name}) ===")
            run = cached_json(out_dir / "results" / f"seed_{seed}" / f"f{percent(fraction)}.json", lambda c=cfg: run_fraction(c, progress))
            per_seed[seed][percent(fraction)] = run
            student = run["student"][SCORE] if run["student"] else None
            progress(f"seed {seed}, {percent(fraction)}%: teacher {number(run['teacher'][SCORE])}, student {number(student)} "
                     f"({SCORE}; {run['step_seconds']:.0f} s)")
        validation_sets = {tuple(run["validation"]) for run in per_seed[seed].values()}
        if len(validation_sets) != 1:
            raise RuntimeError(f"seed {seed}: the labeled fractions got different validation cases; they are not comparable")

    summary = json_safe(summarise(per_seed, settings.fractions))
    machine = machine_info()
    first = next(iter(per_seed[seeds[0]].values()))
    context = {
        "quick": args.quick, "machine_line": machine_line(machine), "wall_minutes": (time.perf_counter() - started) / 60,
        "resumed": resumed, "seeds": seeds,
        "step_minutes": sum(r.get("step_seconds", 0.0) for runs in per_seed.values() for r in runs.values()) / 60,
        "data": settings.data_root or f"{settings.cases} generated site-{settings.site} phantoms {tuple(settings.shape)} at 1 mm",
        "n_validation": len(first["validation"]), "n_pool": len(first["labeled"]) + len(first["unlabeled"]),
        "batch_size": base.train.batch_size, "patch_size": base.data.patch_size, "teacher_steps": first["iterations_teacher"],
        "epochs": base.train.epochs, "steps": base.train.steps_per_epoch or "one pass of", "stages": base.curriculum.stages,
        "epochs_per_stage": base.curriculum.epochs_per_stage, "preset": base.model.preset, "mc_passes": base.model.mc_passes,
    }
    pngs = write_plots(summary, out_dir)
    atomic_write_text(out_dir / f"{NAME}.md", markdown(summary, context))
    results = {**summary, "per_seed": {str(s): runs for s, runs in per_seed.items()}, "plots": pngs}
    settings_out = {"config": base.to_dict(), "study": settings.model_dump(), "seeds": seeds,
                    "wall_minutes": context["wall_minutes"], "resumed": resumed}
    write_report(out_dir / f"{NAME}.json", NAME, args.quick, json_safe(settings_out), json_safe(results), [],
                 notes=["budgets are documented, not matched; see data_efficiency.md"], machine=machine)
    print(markdown_table(["labeled", TEACHER, STUDENT],
                         [[f"{percent(r['labeled_fraction'])}%", pm(*r["teacher"][SCORE]),
                           pm(*r["student"][SCORE]) if r["student"] else "n/a (no unlabeled scans)"] for r in summary["fractions"]]))
    progress(f"done: {out_dir / (NAME + '.md')}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as exc:  # a bad config or data set: the message says what to fix
        sys.exit(f"{NAME}: {exc}")
