"""``raysemi predict``, ``raysemi evaluate`` and ``raysemi suggest-labels``.

**predict** segments every case of a BraTS folder (labels are not needed) with a trained checkpoint:

- ``--model`` is a raysemi checkpoint folder (``model.pt`` + ``meta.json``) or an MLflow URI
  (``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>``), downloaded
  from ``cfg.tracking_uri()`` into a hidden temporary folder inside the output folder (so that
  inference actors on other nodes of a cluster with shared storage can read it) and removed after.
- Every case is validated first (:func:`raysemi.data.brats.validate_case`, without its seg); a
  case that fails is skipped with its reason and the rest complete.
- The valid cases go through a Ray Data actor pool (:func:`raysemi.inference.batch.run_batch_inference`
  with :class:`raysemi.inference.predictor.Predictor`, ``train.inference_actors`` actors with
  ``train.inference_gpus_per_actor`` GPUs each; when that is 0, one GPU each where
  ``train.use_gpu`` allows it: ``auto``, the default, when the cluster has GPUs). The sliding
  window is the patch size the checkpoint was trained with (its ``meta.json`` config), so the
  model sees inputs of the size it learned on; ``model.mc_passes`` (or ``--passes``),
  ``model.sw_*`` and ``curriculum.confidence_margin`` come from the command's config.

Output folder of predict (and of suggest-labels, which runs the same inference)::

    <out>/<case>/<case>_seg.nii.gz          BraTS labels 0/1/2/4, the input's shape, affine and header
    <out>/<case>/<case>_uncertainty.nii.gz  normalised entropy in [0, 1], float32, same grid
    <out>/<case>/<case>_overlay.png         with predict --png, and for every suggested case
    <out>/predictions.csv                   case_id, confidence, tumour_voxels, seg_path, uncertainty_path
    <out>/skipped.csv                       case_id, step (validation | inference), reason (header only if none)
    <out>/suggestions.csv                   suggest-labels: rank, case_id, confidence, tumour_voxels, overlay_png

Paths in the CSVs are relative to ``<out>``. Every file is written atomically.

**evaluate** scores predictions against a BraTS reference folder (Dice and HD95 per region and
class, :func:`raysemi.evaluation.metrics.brats_metrics`) and writes ``evaluation.{csv,json,md}``
(:func:`raysemi.evaluation.report.write_reports`). Predictions are found in ``--pred`` as

- ``<pred>/<case>/<case>_seg.nii[.gz]`` (predict's layout), or flat files
- ``<pred>/<case>_seg.nii[.gz]`` or ``<pred>/<case>.nii[.gz]`` (``*_uncertainty`` files are ignored).

Both volumes are read in RAS, so a prediction stored in another orientation of the same voxel grid
is compared voxel for voxel; any other grid (shape or affine) is an error naming the case. HD95
uses the reference's voxel spacing. Evaluation runs in plain Python, not Ray: it reads two label
files per case and needs no model. MONAI's HD95 costs several seconds per BraTS-sized case, so
``--workers N`` spreads cases over N local processes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from raysemi.atomic import atomic_write_text
from raysemi.data.brats import CaseRecord, check_case_id, discover_cases, validate_case
from raysemi.errors import DataError, RaysemiError

if TYPE_CHECKING:  # the config module pulls in pydantic; the CLI imports this module for every command
    from raysemi.config import RaysemiConfig

MODEL_URI_SCHEMES = ("models:/", "runs:/")
PREDICTIONS_CSV, SKIPPED_CSV, SUGGESTIONS_CSV = "predictions.csv", "skipped.csv", "suggestions.csv"
EVALUATION_STEM = "evaluation"

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_PREDICTION_LAYOUTS = (
    "<pred>/<case>/<case>_seg.nii.gz (raysemi predict), <pred>/<case>_seg.nii.gz or <pred>/<case>.nii.gz"
)
_AFFINE_TOLERANCE = 1e-4  # as in data validation: the same grid up to float noise of the writers


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CasePrediction:
    """One predicted case; paths are absolute."""

    case_id: str
    confidence: float
    tumour_voxels: int
    seg_path: Path
    uncertainty_path: Path


@dataclass(frozen=True)
class SkippedCase:
    """A case that was not predicted: ``step`` is ``validation`` or ``inference``."""

    case_id: str
    step: str
    reason: str


@dataclass(frozen=True)
class PredictionRun:
    """What predict wrote: predictions sorted by case id, skipped cases, and the two CSVs."""

    out_dir: Path
    predictions: list[CasePrediction]
    skipped: list[SkippedCase]
    predictions_csv: Path
    skipped_csv: Path


@dataclass(frozen=True)
class Suggestion:
    """A case to annotate next; rank 1 is the least confident."""

    rank: int
    prediction: CasePrediction
    overlay_png: Path


@dataclass(frozen=True)
class Evaluation:
    """Per-case metric rows (sorted by case id), their summary and the report files."""

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    reports: dict[str, Path]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def is_model_uri(model: str) -> bool:
    """True for an MLflow URI (``models:/...``, ``runs:/...``) rather than a checkpoint folder."""
    return model.startswith(MODEL_URI_SCHEMES)


@contextlib.contextmanager
def model_checkpoint(model: str, tracking_uri: str, download_root: Path) -> Iterator[Path]:
    """Yield the raysemi checkpoint folder of ``model``, downloading an MLflow URI first.

    Args:
        model: a checkpoint folder or an MLflow URI (see the module docstring).
        tracking_uri: the MLflow tracking URI to resolve a URI against.
        download_root: an existing folder to download into (a temporary sub-folder, removed on exit).

    Raises:
        RaysemiError: the folder is not a checkpoint, or the URI cannot be resolved or downloaded.
    """
    if not is_model_uri(model):
        folder = Path(model)
        missing = [name for name in ("model.pt", "meta.json") if not (folder / name).is_file()]
        if missing:
            raise RaysemiError(
                f"--model {model}: not a raysemi checkpoint folder (missing {', '.join(missing)}) nor an "
                "MLflow URI (models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>)"
            )
        yield folder.resolve()
        return

    from mlflow.exceptions import MlflowException

    from raysemi.tracking import download_checkpoint

    # Hidden, so that evaluate and case discovery never mistake it for a case folder.
    download_dir = Path(tempfile.mkdtemp(prefix=".model-", dir=download_root))
    try:
        try:
            checkpoint = download_checkpoint(model, tracking_uri, download_dir)
        except (MlflowException, FileNotFoundError, OSError) as err:
            raise RaysemiError(f"--model {model}: cannot load it from MLflow at {tracking_uri}: {err}") from err
        yield checkpoint
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)


def inference_config(cfg: RaysemiConfig, checkpoint_dir: Path) -> RaysemiConfig:
    """``cfg`` with the sliding-window size (``data.patch_size``) the checkpoint was trained with."""
    from raysemi.train.checkpoint import load_meta

    trained = load_meta(checkpoint_dir).get("config", {}).get("data", {}).get("patch_size")
    return cfg if trained is None else cfg.with_overrides({"data.patch_size": list(trained)})


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def predict(
    cfg: RaysemiConfig,
    model: str,
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    passes: int | None = None,
    png: bool = False,
) -> PredictionRun:
    """Segment every case in ``input_dir`` into ``out_dir`` (layout in the module docstring).

    Args:
        cfg: inference settings and the MLflow tracking URI.
        model: checkpoint folder or MLflow URI.
        input_dir: BraTS folder, one sub-folder per case; segmentations are not needed.
        out_dir: output folder (created); must not be ``input_dir``.
        passes: MC-dropout passes (None: ``model.mc_passes``).
        png: also write ``<case>_overlay.png`` per case.

    Raises:
        DataError: no case in ``input_dir``, or ``out_dir`` is ``input_dir``.
        RaysemiError: the model cannot be loaded, or no case could be predicted (after the CSVs
            are written).
    """
    cases = discover_cases(input_dir)
    out = _prepare_output(input_dir, out_dir)
    with model_checkpoint(model, cfg.tracking_uri(), out) as checkpoint:
        run = predict_cases(cfg, checkpoint, cases, out, passes)
    if png:
        records = {case.case_id: case for case in cases}
        for prediction in run.predictions:
            write_overlay(records[prediction.case_id], prediction, _overlay_path(out, prediction.case_id))
    return run


def predict_cases(
    cfg: RaysemiConfig, checkpoint: Path, cases: Sequence[CaseRecord], out: Path, passes: int | None = None
) -> PredictionRun:
    """Validate ``cases``, run batch inference on the valid ones, write the two CSVs.

    Raises:
        RaysemiError: when no case could be predicted; the CSVs are written first.
    """
    skipped: list[SkippedCase] = []
    valid: list[CaseRecord] = []
    for case in cases:
        # Predict needs the four modalities only: a broken seg file must not stop a case.
        problems = [f"{p.field}: {p.problem}" for p in validate_case(replace(case, seg=None))]
        # Case ids are checked when a record is built; this also catches a symbolic link out of <out>.
        if not _inside(out, out / case.case_id):
            problems.append(f"output: {out / case.case_id} would lie outside {out}")
        if problems:
            skipped.append(SkippedCase(case.case_id, "validation", "; ".join(problems)))
            print(f"[raysemi] skipping case {case.case_id}: {'; '.join(problems)}", flush=True)
        else:
            valid.append(case)

    predictions: list[CasePrediction] = []
    if valid:
        from raysemi.inference.batch import case_rows, run_batch_inference
        from raysemi.inference.predictor import Predictor
        from raysemi.train.launch import ensure_ray, use_gpu

        ensure_ray(cfg)
        run_cfg = inference_config(cfg, checkpoint)
        if run_cfg.train.inference_gpus_per_actor == 0 and use_gpu(run_cfg):
            # GPU where present: with train.use_gpu auto (the default), when the cluster has one.
            run_cfg = run_cfg.with_overrides({"train.inference_gpus_per_actor": 1.0})
        gpus = run_cfg.train.inference_gpus_per_actor
        print(
            f"[raysemi] predicting {len(valid)} cases ({passes or run_cfg.model.mc_passes} MC passes, window "
            f"{list(run_cfg.data.patch_size)}, {run_cfg.train.inference_actors} actor(s) with "
            f"{f'{gpus:g} GPU' if gpus else '1 CPU'} each) -> {out}",
            flush=True,
        )
        results = run_batch_inference(
            Predictor,
            case_rows(valid),
            run_cfg,
            {"checkpoint_dir": str(checkpoint), "cfg": run_cfg.to_dict(), "out_dir": str(out), "passes": passes},
        )
        for result in results:
            if result.get("error"):
                skipped.append(SkippedCase(result["case_id"], "inference", result["error"]))
                print(f"[raysemi] prediction failed for case {result['case_id']}: {result['error']}", flush=True)
                continue
            predictions.append(
                CasePrediction(
                    case_id=result["case_id"],
                    confidence=float(result["confidence"]),
                    tumour_voxels=int(result["tumour_voxels"]),
                    seg_path=Path(result["seg_path"]),
                    uncertainty_path=Path(result["uncertainty_path"]),
                )
            )

    predictions.sort(key=lambda p: p.case_id)
    skipped.sort(key=lambda s: s.case_id)
    run = PredictionRun(out, predictions, skipped, out / PREDICTIONS_CSV, out / SKIPPED_CSV)
    _write_csv(
        run.predictions_csv,
        ["case_id", "confidence", "tumour_voxels", "seg_path", "uncertainty_path"],
        [
            [p.case_id, repr(p.confidence), p.tumour_voxels, _relative(p.seg_path, out),
             _relative(p.uncertainty_path, out)]
            for p in predictions
        ],
    )
    _write_csv(run.skipped_csv, ["case_id", "step", "reason"], [[s.case_id, s.step, s.reason] for s in skipped])
    if not predictions:
        raise RaysemiError(f"no case could be predicted ({len(skipped)} skipped); reasons in {run.skipped_csv}")
    return run


def write_overlay(case: CaseRecord, prediction: CasePrediction, out_png: Path) -> Path:
    """The four modalities of the most tumorous axial slice with the predicted segmentation and the
    uncertainty map (:func:`raysemi.evaluation.plots.segmentation_overlay`), all in RAS."""
    from raysemi.data.nifti import labels_to_internal, load_case_arrays, load_ras
    from raysemi.evaluation.plots import segmentation_overlay

    image = load_case_arrays(case, with_seg=False).image  # (4, X, Y, Z) RAS
    labels, _ = load_ras(prediction.seg_path)
    uncertainty, _ = load_ras(prediction.uncertainty_path, dtype=np.float32)
    return segmentation_overlay(
        image,
        out_png,
        pred=labels_to_internal(labels),
        uncertainty=uncertainty,
        title=f"{case.case_id}: confidence {prediction.confidence:.3f}",
    )


# ---------------------------------------------------------------------------------------------
# suggest-labels
# ---------------------------------------------------------------------------------------------


def suggest_labels(
    cfg: RaysemiConfig,
    model: str,
    input_dir: str | os.PathLike,
    k: int,
    out_dir: str | os.PathLike,
    passes: int | None = None,
) -> tuple[list[Suggestion], PredictionRun]:
    """The ``k`` least-confident unlabeled cases of ``input_dir``: the scans to annotate next.

    Runs predict's inference on every case without a segmentation file (cases that have one are
    already labeled and are left out), ranks them by image-level confidence, ascending (ties by
    case id), and writes an overlay PNG per suggested case and ``suggestions.csv``.

    Returns:
        the suggestions (at most ``k``; fewer when fewer cases could be predicted) and the
        prediction run they come from.

    Raises:
        DataError: ``k`` < 1, or no unlabeled case in ``input_dir``.
    """
    if k < 1:
        raise DataError(f"-k must be at least 1 (the number of scans to suggest), got {k}")
    cases = discover_cases(input_dir)
    unlabeled = [case for case in cases if not case.labeled]
    if not unlabeled:
        raise DataError(f"{input_dir}: every case already has a segmentation file; nothing to suggest")
    if len(unlabeled) < len(cases):
        print(f"[raysemi] {len(cases) - len(unlabeled)} labeled cases left out (they have a seg file)", flush=True)
    out = _prepare_output(input_dir, out_dir)
    with model_checkpoint(model, cfg.tracking_uri(), out) as checkpoint:
        run = predict_cases(cfg, checkpoint, unlabeled, out, passes)

    ranked = sorted(run.predictions, key=lambda p: (p.confidence, p.case_id))[:k]
    if len(ranked) < k:
        print(f"[raysemi] only {len(ranked)} cases could be predicted; suggesting all of them", flush=True)
    records = {case.case_id: case for case in unlabeled}
    suggestions = [
        Suggestion(rank, p, write_overlay(records[p.case_id], p, _overlay_path(out, p.case_id)))
        for rank, p in enumerate(ranked, start=1)
    ]
    _write_csv(
        out / SUGGESTIONS_CSV,
        ["rank", "case_id", "confidence", "tumour_voxels", "overlay_png"],
        [
            [s.rank, s.prediction.case_id, repr(s.prediction.confidence), s.prediction.tumour_voxels,
             _relative(s.overlay_png, out)]
            for s in suggestions
        ],
    )
    return suggestions, run


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def find_predictions(pred_dir: str | os.PathLike) -> dict[str, Path]:
    """Prediction files in ``pred_dir`` by case id (layouts in the module docstring).

    Hidden files and folders are skipped (temporary files of atomic writes, predict's model download).

    Raises:
        DataError: ``pred_dir`` is not a folder, or two files give the same case id.
    """
    root = Path(pred_dir)
    if not root.is_dir():
        raise DataError(f"predictions folder {root} does not exist or is not a folder")
    found: dict[str, Path] = {}

    def add(case_id: str, path: Path) -> None:
        check_case_id(case_id, str(path))
        if case_id in found:
            raise DataError(f"case {case_id!r} has two predictions: {found[case_id]} and {path}")
        found[case_id] = path

    for entry in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if entry.is_dir():
            for suffix in _NIFTI_SUFFIXES:
                candidate = entry / f"{entry.name}_seg{suffix}"
                if candidate.is_file():
                    add(entry.name, candidate)
        elif entry.is_file():
            stem = _nifti_stem(entry.name)
            if stem is None or stem.endswith("_uncertainty"):
                continue
            add(stem.removesuffix("_seg"), entry)
    return found


def evaluate(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    workers: int = 1,
) -> Evaluation:
    """Dice and HD95 of every prediction against its reference; writes ``evaluation.{csv,json,md}``.

    Args:
        pred_dir: predictions (see :func:`find_predictions`).
        ref_dir: BraTS folder whose cases all have a segmentation.
        out_dir: report folder (default ``<pred_dir>/evaluation``).
        workers: local processes scoring cases (1: in this process).

    Raises:
        DataError: case ids present on one side only (all listed), a reference case without a
            segmentation, a grid (shape or affine) mismatch, or labels outside {0, 1, 2, 4}; each
            names the case and file.
    """
    from raysemi.evaluation.metrics import summarise
    from raysemi.evaluation.report import write_reports

    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    references = {case.case_id: case for case in discover_cases(ref_dir)}
    unlabeled = sorted(case_id for case_id, case in references.items() if not case.labeled)
    if unlabeled:
        raise DataError(f"reference cases without a segmentation file in {ref_dir}: {unlabeled}")
    predictions = find_predictions(pred_dir)
    if not predictions:
        raise DataError(f"no predictions found in {pred_dir}; expected {_PREDICTION_LAYOUTS}")
    only_pred = sorted(set(predictions) - set(references))
    only_ref = sorted(set(references) - set(predictions))
    if only_pred or only_ref:
        raise DataError(
            "predictions and references do not hold the same case ids: "
            f"only in predictions ({pred_dir}): {only_pred or 'none'}; "
            f"only in references ({ref_dir}): {only_ref or 'none'}"
        )

    jobs = [(case_id, str(predictions[case_id]), str(references[case_id].seg)) for case_id in sorted(references)]
    if workers == 1:
        rows = [score_case(*job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: forking a process that holds torch's thread pools can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(score_case, *zip(*jobs)))

    out = Path(out_dir) if out_dir is not None else Path(pred_dir) / "evaluation"
    reports = write_reports(rows, out, stem=EVALUATION_STEM)
    return Evaluation(rows, summarise(rows), reports)


def score_case(case_id: str, pred_path: str, ref_path: str) -> dict[str, Any]:
    """BraTS metrics of one case: ``{"case_id": ..., <metric key>: value, ...}``.

    Both files are read in RAS and must share one voxel grid; HD95 is in mm of the reference's spacing.
    """
    import nibabel as nib

    from raysemi.data.nifti import labels_to_internal, load_ras
    from raysemi.evaluation.metrics import brats_metrics

    pred, pred_affine = load_ras(pred_path)
    ref, ref_affine = load_ras(ref_path)
    if pred.shape != ref.shape:
        raise DataError(
            f"case {case_id}: prediction {pred_path} has RAS shape {pred.shape}, its reference {ref_path} "
            f"has {ref.shape}; both must lie on the same voxel grid"
        )
    if not np.allclose(pred_affine, ref_affine, atol=_AFFINE_TOLERANCE):
        raise DataError(
            f"case {case_id}: prediction {pred_path} has RAS affine\n{pred_affine}\nits reference {ref_path} "
            f"has\n{ref_affine}\nboth must lie on the same voxel grid"
        )
    labels = {}
    for name, data, path in (("pred", pred, pred_path), ("ref", ref, ref_path)):
        try:
            labels[name] = labels_to_internal(data)
        except DataError as err:
            raise DataError(f"case {case_id}: {path}: {err}") from err
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(ref_affine))
    return {"case_id": case_id, **brats_metrics(labels["pred"], labels["ref"], spacing=spacing, case_id=case_id)}


def log_evaluation(cfg: RaysemiConfig, evaluation: Evaluation, pred_dir: str, ref_dir: str) -> str:
    """Log an evaluation as an MLflow run in ``cfg.tracking.experiment``; returns the run id.

    Metrics: ``<key>_mean``, ``<key>_median``, ``<key>_std`` for every metric key, and ``cases``;
    artifacts: the three report files under ``evaluation/``.
    """
    from raysemi import tracking

    uri = cfg.tracking_uri()
    run_id = tracking.create_run(uri, cfg.tracking.experiment, "evaluate", tags={"raysemi.command": "evaluate"})
    tracking.log_params(uri, run_id, {"pred_dir": os.path.abspath(pred_dir), "ref_dir": os.path.abspath(ref_dir)})
    metrics: dict[str, float] = {"cases": float(len(evaluation.rows))}
    for statistic in ("mean", "median", "std"):
        metrics.update({f"{key}_{statistic}": value for key, value in evaluation.summary[statistic].items()})
    tracking.log_metrics(uri, run_id, metrics)
    tracking.log_artifacts(uri, run_id, evaluation.reports.values(), artifact_path="evaluation")
    tracking.finish_run(uri, run_id)
    return run_id


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit status 0 when every case was predicted, 1 when some were skipped (the rest are written)."""
    from raysemi.config import load_config

    run = predict(load_config(args.config, args.overrides), args.model, args.input, args.output, args.passes, args.png)
    _print_run(run)
    return 1 if run.skipped else 0


def cmd_suggest_labels(args: argparse.Namespace) -> int:
    """Exit status 0 when every unlabeled case was predicted, 1 when some were skipped."""
    from raysemi.config import load_config
    from raysemi.evaluation.report import markdown_table

    suggestions, run = suggest_labels(
        load_config(args.config, args.overrides), args.model, args.input, args.k, args.output, args.passes
    )
    print(markdown_table(
        ["rank", "case", "confidence", "tumour voxels", "overlay"],
        [[s.rank, s.prediction.case_id, s.prediction.confidence, s.prediction.tumour_voxels, str(s.overlay_png)]
         for s in suggestions],
    ))
    _print_run(run)
    print(f"suggestions: {run.out_dir / SUGGESTIONS_CSV}")
    return 1 if run.skipped else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from raysemi.config import load_config
    from raysemi.evaluation.report import markdown_table

    cfg = load_config(args.config, args.overrides)  # read first: a config error must not cost an evaluation
    evaluation = evaluate(args.pred, args.ref, args.out, workers=args.workers)
    mean, median, std = (evaluation.summary[name] for name in ("mean", "median", "std"))
    keys = [key for key in mean if key.startswith(("dice_", "hd95_"))]
    rows = [[key, mean[key], median[key], std[key]] for key in keys]
    print(markdown_table(["metric", "mean", "median", "std"], rows))
    print(f"\n{len(evaluation.rows)} cases; reports: {', '.join(str(p) for p in evaluation.reports.values())}")
    if args.mlflow:
        run_id = log_evaluation(cfg, evaluation, args.pred, args.ref)
        print(f"MLflow: {cfg.tracking_uri()} (experiment {cfg.tracking.experiment}, run {run_id})")
    return 0


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add predict, evaluate and suggest-labels to the ``raysemi`` parser (see ``cli.build_parser``)."""
    model_help = (
        "checkpoint folder (model.pt + meta.json) or MLflow URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID"
    )
    predict_parser = add(
        "predict", cmd_predict, "segment every case of a folder: seg + uncertainty like the input, confidence CSV"
    )
    predict_parser.add_argument("--model", "-m", required=True, help=model_help)
    predict_parser.add_argument("--input", "-i", required=True, help="folder of cases (BraTS layout, seg not needed)")
    predict_parser.add_argument("--output", "-o", required=True, help="output folder")
    predict_parser.add_argument("--passes", type=int, default=None, help="MC-dropout passes (default: model.mc_passes)")
    predict_parser.add_argument("--png", action="store_true", help="also write an overlay PNG per case")

    evaluate_parser = add("evaluate", cmd_evaluate, "Dice and HD95 of predictions against reference segmentations")
    evaluate_parser.add_argument("--pred", required=True, help=f"predictions: {_PREDICTION_LAYOUTS}")
    evaluate_parser.add_argument("--ref", required=True, help="reference folder (BraTS layout with seg files)")
    evaluate_parser.add_argument("--out", default=None, help="report folder (default: <pred>/evaluation)")
    evaluate_parser.add_argument("--workers", type=int, default=1, help="local processes (HD95 costs seconds per case)")
    evaluate_parser.add_argument(
        "--mlflow", action="store_true", help="log the summary and reports to MLflow (tracking.*)"
    )

    suggest_parser = add("suggest-labels", cmd_suggest_labels, "the K least-confident unlabeled scans to annotate next")
    suggest_parser.add_argument("--model", "-m", required=True, help=model_help)
    suggest_parser.add_argument(
        "--input", "-i", required=True, help="folder of cases; cases with a seg file are left out"
    )
    suggest_parser.add_argument("-k", type=int, required=True, help="number of scans to suggest")
    suggest_parser.add_argument("--output", "-o", default="suggestions", help="output folder (default: ./suggestions)")
    suggest_parser.add_argument("--passes", type=int, default=None, help="MC-dropout passes (default: model.mc_passes)")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _prepare_output(input_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).resolve()
    if out == Path(input_dir).resolve():
        # <out>/<case>/<case>_seg.nii.gz would then land in the case folders as ground truth.
        raise DataError(f"the output folder {out} is the input folder; predictions would pass for ground truth")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _inside(root: Path, path: Path) -> bool:
    """True when ``path`` resolves to a location inside ``root`` (symbolic links followed)."""
    return path.resolve().is_relative_to(root.resolve())


def _overlay_path(out: Path, case_id: str) -> Path:
    return out / case_id / f"{case_id}_overlay.png"


def _relative(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)


def _nifti_stem(name: str) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _print_run(run: PredictionRun) -> None:
    print(f"\n{len(run.predictions)} cases predicted -> {run.predictions_csv}")
    if run.skipped:
        print(f"{len(run.skipped)} cases skipped -> {run.skipped_csv}")
        for skipped in run.skipped:
            print(f"  {skipped.case_id} ({skipped.step}): {skipped.reason}")
