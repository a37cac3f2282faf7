"""Batch inference callables for Ray Data ``map_batches`` with an actor pool.

Each actor loads its model once (on its GPU when it has one) and then handles one case per call:
MC-dropout sliding-window inference, image-level confidence, files written atomically. A case that
fails is returned with its error instead of failing the job, so one bad scan never stops the
others; the driver reports it.

- :class:`PseudoLabeler`: the teacher's pseudo-labels, uncertainty, masks and probabilities.
- :class:`Refiner`: the student's prediction on admitted cases, compared with the teacher by the
  agreement rule; writes the next pseudo-label version.
- :class:`Predictor`: ``raysemi predict``: segmentation and uncertainty in the input's own
  orientation, affine and header.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysemi.config import RaysemiConfig
from raysemi.data.brats import CaseRecord
from raysemi.data.nifti import labels_to_internal, write_label_like, write_like
from raysemi.data.transforms import PreprocessedCase, case_seed, paste_back, preprocess_case
from raysemi.evaluation.metrics import dice_per_region
from raysemi.inference.outputs import read_probs, write_pseudo_label
from raysemi.semi.losses import encode_masks, masks_from_uncertainty
from raysemi.semi.refine import refine
from raysemi.semi.uncertainty import image_confidence, mc_sliding_window
from raysemi.train.checkpoint import load_model

log = logging.getLogger(__name__)


class _MCModel:
    """A checkpoint loaded once per actor, with MC-dropout sliding-window inference."""

    def __init__(self, checkpoint_dir: str, cfg: dict[str, Any]) -> None:
        self.cfg = RaysemiConfig.from_dict(cfg, source="inference config")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_model(checkpoint_dir, self.device)

    def infer(self, case: PreprocessedCase, passes: int) -> dict[str, np.ndarray]:
        """Returns ``mean_probs`` (K, x, y, z), ``label``, ``entropy``, ``mutual_info`` over the brain box."""
        image = torch.as_tensor(case.image, device=self.device)[None]
        use_amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = mc_sliding_window(
                self.model,
                image,
                roi_size=tuple(self.cfg.data.patch_size),
                passes=passes,
                sw_batch_size=self.cfg.model.sw_batch_size,
                overlap=self.cfg.model.sw_overlap,
                max_batch=self.cfg.model.mc_max_batch,
            )
        return {key: value[0].float().cpu().numpy() if value.is_floating_point() else value[0].cpu().numpy() for key, value in out.items()}

    def confidence(self, case: PreprocessedCase, out: dict[str, np.ndarray]) -> float:
        return float(image_confidence(out["entropy"], out["label"], case.brain, self.cfg.curriculum.confidence_margin))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """One result per case; a case that raises is returned with its error and the others go on."""
        results = []
        for row in _rows(batch):
            case = CaseRecord.from_dict(json.loads(row["case_json"]))
            # MC-dropout masks seeded by (train.seed, case, pseudo-label version): a rerun, a resumed run
            # or a retried case gets the same pseudo-label, uncertainty and confidence.
            torch.manual_seed(case_seed(self.cfg.train.seed, case.case_id, int(row.get("version", 0))))
            try:
                results.append({"case_id": case.case_id, "error": "", **self.process(case, row)})
            except Exception as exc:  # noqa: BLE001 - reported by the driver, the other cases go on
                log.error("%s failed for %s: %s", type(self).__name__, case.case_id, exc)
                results.append({"case_id": case.case_id, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        return _columns(results)

    def process(self, case: CaseRecord, row: dict[str, Any]) -> dict[str, Any]:
        """Handle one case; returns its result fields."""
        raise NotImplementedError


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [{k: batch[k][i] for k in keys} for i in range(len(batch[keys[0]]))]


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """One JSON column: results of failed and finished cases have different fields."""
    return {"result_json": [json.dumps(row) for row in rows]}


def _truth_dice(case: CaseRecord, box_case: PreprocessedCase, labels: np.ndarray) -> float | None:
    """Mean ET/TC/WT Dice of a pseudo-label against hidden ground truth, when the case has one."""
    if not case.seg:
        return None
    from raysemi.data.nifti import load_ras

    truth, _ = load_ras(case.seg)
    truth = labels_to_internal(box_case.crop(truth).astype(np.int16))
    return dice_per_region(torch.as_tensor(labels), torch.as_tensor(truth))["dice_mean_regions"]


class _PseudoLabelWriter(_MCModel):
    """An MC model that writes pseudo-label files under ``out_dir``."""

    def __init__(self, checkpoint_dir: str, cfg: dict[str, Any], out_dir: str) -> None:
        super().__init__(checkpoint_dir, cfg)
        self.out_dir = Path(out_dir)


class PseudoLabeler(_PseudoLabelWriter):
    """Teacher pseudo-labels for unlabeled cases (version 1 in the pool)."""

    def process(self, case: CaseRecord, row: dict[str, Any]) -> dict[str, Any]:
        prepared = preprocess_case(case, with_seg=False)
        out = self.infer(prepared, self.cfg.model.mc_passes)
        high, low = masks_from_uncertainty(torch.as_tensor(out["entropy"]), self.cfg.loss.tau_high, self.cfg.loss.tau_low)
        paths = write_pseudo_label(prepared, self.out_dir, out["label"], out["entropy"], encode_masks(high, low), probs=out["mean_probs"])
        return {
            "confidence": self.confidence(prepared, out),
            "high_share": float(high.float().mean()),
            "low_share": float(low.float().mean()),
            "truth_dice": _truth_dice(case, prepared, out["label"]) if row.get("score_truth") else None,
            **paths,
        }


class Refiner(_PseudoLabelWriter):
    """Student predictions on admitted cases -> agreement refinement -> the next pseudo-label version."""

    def process(self, case: CaseRecord, row: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        prepared = preprocess_case(case, with_seg=False, extra_paths={"label": row["label_path"]})
        current = labels_to_internal(prepared.extra["label"].astype(np.int16))
        teacher_probs = read_probs(row["probs_path"], prepared)
        out = self.infer(prepared, cfg.model.mc_passes)
        refined = refine(
            teacher_probs,
            out["mean_probs"],
            current,
            tau_high=cfg.loss.tau_high,
            tau_low=cfg.loss.tau_low,
            margin=cfg.curriculum.refine_margin,
            alpha=cfg.curriculum.refine_alpha,
            prior_confidence=float(row["confidence"]),
            uncertain_agreement=cfg.curriculum.uncertain_agreement,
        )
        labels = refined.label.numpy()
        mask = encode_masks(refined.high_mask, refined.low_mask)
        # Files are named by the case's new version: pseudo/v<version>/<case>_*.nii.gz
        out_dir = self.out_dir / f"v{int(row['version']) + 1:02d}"
        paths = write_pseudo_label(prepared, out_dir, labels, refined.uncertainty.numpy(), mask)
        score = bool(row.get("score_truth"))
        return {
            "confidence": float(refined.confidence),
            "agreement": float(refined.agreement),
            "high_share": float(refined.high_mask.float().mean()),
            "low_share": float(refined.low_mask.float().mean()),
            "truth_dice_before": _truth_dice(case, prepared, current) if score else None,
            "truth_dice_after": _truth_dice(case, prepared, labels) if score else None,
            "truth_dice_student": _truth_dice(case, prepared, out["label"]) if score else None,
            "counts_json": json.dumps(refined.counts),
            "probs_path": row["probs_path"],
            **paths,
        }


class Predictor(_MCModel):
    """``raysemi predict``: writes ``<out>/<case>/<case>_seg.nii.gz`` and ``_uncertainty.nii.gz`` like the input."""

    def __init__(self, checkpoint_dir: str, cfg: dict[str, Any], out_dir: str, passes: int | None = None) -> None:
        super().__init__(checkpoint_dir, cfg)
        self.out_dir = Path(out_dir)
        self.passes = passes or self.cfg.model.mc_passes

    def process(self, case: CaseRecord, row: dict[str, Any]) -> dict[str, Any]:
        prepared = preprocess_case(case, with_seg=False)
        out = self.infer(prepared, self.passes)
        reference = case.images["flair"]
        folder = self.out_dir / case.case_id
        seg_path = folder / f"{case.case_id}_seg.nii.gz"
        unc_path = folder / f"{case.case_id}_uncertainty.nii.gz"
        write_label_like(paste_back(out["label"].astype(np.uint8), prepared), reference, seg_path)
        write_like(paste_back(out["entropy"].astype(np.float32), prepared), reference, unc_path, dtype=np.float32)
        return {
            "confidence": self.confidence(prepared, out),
            "seg_path": str(seg_path),
            "uncertainty_path": str(unc_path),
            "tumour_voxels": int((out["label"] > 0).sum()),
        }


class Evaluator(_MCModel):
    """Deterministic prediction on labeled cases, scored with BraTS Dice and HD95 (mm)."""

    def process(self, case: CaseRecord, row: dict[str, Any]) -> dict[str, Any]:
        from raysemi.evaluation.metrics import brats_metrics

        prepared = preprocess_case(case, with_seg=True)
        out = self.infer(prepared, passes=1)
        metrics = brats_metrics(out["label"], prepared.label, spacing=prepared.spacing, case_id=case.case_id)
        return {"site": case.site, **metrics}
