"""Teacher-student agreement refinement of one scan's pseudo-label after a stage.

METHOD.md, "Agreement-based refinement after each stage". Per voxel, with u the normalised
entropy of a model's mean probabilities and c the probability it gives its label:

================================================  ==================  ==============================
case                                              label afterwards    voxel set next stage
================================================  ==================  ==============================
agree, u_T ≤ τ_h and u_S ≤ τ_h                    kept                H
disagree, c_S − c_T ≥ m                           student's           H if u_S ≤ τ_h, L if u_S ≥ τ_l,
                                                                      else ignored
agree, not both confident                         kept                L ("unlearn", METHOD.md literal)
                                                                      or ignored ("ignore")
disagree, student not more confident by m         kept                L
================================================  ==================  ==============================

A taken student label is judged by the student's own uncertainty with the loss's thresholds,
the rule that made the first pseudo-label's masks. Per scan, agreement A = Dice of the two
binary tumour masks (label > 0) and the new confidence is C' = α·C + (1 − α)·A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from raysemi.semi.uncertainty import normalised_entropy

UncertainAgreement = Literal["unlearn", "ignore"]


@dataclass
class RefinementResult:
    """The refined pseudo-label of one scan.

    Attributes:
        label: (X, Y, Z) long, the refined label 0..K-1.
        high_mask: (X, Y, Z) bool, voxels to learn next stage (H).
        low_mask: (X, Y, Z) bool, voxels to unlearn next stage (L); disjoint from ``high_mask``.
        uncertainty: (X, Y, Z) float, normalised entropy of the model whose label each voxel
            now carries (the student's where its label was taken, else the teacher's). For
            display and storage only: the masks are authoritative, they are not ``u`` thresholds.
        agreement: Dice of teacher and student tumour masks, in [0, 1] (1.0 when both are empty).
        confidence: C' = α·C + (1 − α)·A.
        counts: voxels per branch: ``agree_confident``, ``agree_uncertain``, ``student_high``,
            ``student_low``, ``student_ignored``, ``disagree_kept``; they sum to X·Y·Z.
    """

    label: torch.Tensor
    high_mask: torch.Tensor
    low_mask: torch.Tensor
    uncertainty: torch.Tensor
    agreement: float
    confidence: float
    counts: dict[str, int]


def tumour_dice(label_a: torch.Tensor, label_b: torch.Tensor) -> float:
    """Dice of the binary tumour masks (label > 0) of two label maps; 1.0 when both are empty."""
    tumour_a = label_a > 0
    tumour_b = label_b > 0
    size_sum = int(tumour_a.sum()) + int(tumour_b.sum())
    if size_sum == 0:
        return 1.0
    return 2.0 * int((tumour_a & tumour_b).sum()) / size_sum


def _as_probs(probs: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    probs = torch.as_tensor(probs).float()
    if probs.dim() < 2 or probs.shape[0] < 2:
        raise ValueError(f"{name}: expected (K, X, Y, Z) probabilities with K >= 2, got shape {tuple(probs.shape)}")
    # Catches logits or a channels-last array passed by mistake.
    sums = probs.sum(dim=0)
    if probs.min() < 0 or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise ValueError(f"{name}: values are not probabilities over dim 0 (non-negative, summing to 1)")
    return probs


def refine(
    teacher_probs: torch.Tensor | np.ndarray,
    student_probs: torch.Tensor | np.ndarray,
    teacher_label: torch.Tensor | np.ndarray | None = None,
    *,
    tau_high: float = 0.2,
    tau_low: float = 0.5,
    margin: float = 0.1,
    alpha: float = 0.5,
    prior_confidence: float,
    uncertain_agreement: UncertainAgreement = "unlearn",
) -> RefinementResult:
    """Refine one scan's pseudo-label by teacher-student agreement.

    Args:
        teacher_probs: (K, X, Y, Z) mean MC-dropout probabilities behind the current pseudo-label.
        student_probs: (K, X, Y, Z) the student's mean MC-dropout probabilities.
        teacher_label: (X, Y, Z) the current pseudo-label ŷ^T; defaults to argmax of
            ``teacher_probs``. When given (e.g. an already refined label), c_T is the teacher
            probability of this label rather than the maximum.
        tau_high: confident threshold on normalised entropy.
        tau_low: unreliable threshold; must exceed ``tau_high``.
        margin: m, how much more probable the student's label must be to replace the teacher's.
        alpha: weight of the previous confidence in C' = α·C + (1 − α)·A.
        prior_confidence: C, the scan's confidence before this refinement.
        uncertain_agreement: what to do where both agree but are not both confident:
            "unlearn" puts the voxel in L (METHOD.md), "ignore" leaves it out of both sets.

    Returns:
        A :class:`RefinementResult` on the CPU.
    """
    if not 0.0 <= tau_high < tau_low <= 1.0:
        raise ValueError(f"need 0 <= tau_high < tau_low <= 1; got tau_high={tau_high}, tau_low={tau_low}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    if uncertain_agreement not in ("unlearn", "ignore"):
        raise ValueError(f"uncertain_agreement must be 'unlearn' or 'ignore'; got {uncertain_agreement!r}")

    teacher_probs = _as_probs(teacher_probs, "teacher_probs").cpu()
    student_probs = _as_probs(student_probs, "student_probs").cpu()
    if teacher_probs.shape != student_probs.shape:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} and student_probs {tuple(student_probs.shape)} differ in shape"
        )
    if teacher_label is None:
        teacher_label = teacher_probs.argmax(dim=0)
    else:
        teacher_label = torch.as_tensor(np.asarray(teacher_label)).long().cpu()
        if teacher_label.shape != teacher_probs.shape[1:]:
            raise ValueError(
                f"teacher_label has shape {tuple(teacher_label.shape)}, expected {tuple(teacher_probs.shape[1:])}"
            )
    student_label = student_probs.argmax(dim=0)

    teacher_uncertainty = normalised_entropy(teacher_probs, dim=0)
    student_uncertainty = normalised_entropy(student_probs, dim=0)
    teacher_conf = teacher_probs.gather(0, teacher_label[None])[0]
    student_conf = student_probs.max(dim=0).values

    agree = teacher_label == student_label
    both_confident = (teacher_uncertainty <= tau_high) & (student_uncertainty <= tau_high)
    agree_confident = agree & both_confident
    agree_uncertain = agree & ~both_confident
    student_wins = ~agree & (student_conf - teacher_conf >= margin)
    disagree_kept = ~agree & ~student_wins

    student_high = student_wins & (student_uncertainty <= tau_high)
    student_low = student_wins & (student_uncertainty >= tau_low)
    student_ignored = student_wins & ~student_high & ~student_low

    label = torch.where(student_wins, student_label, teacher_label)
    high_mask = agree_confident | student_high
    low_mask = student_low | disagree_kept
    if uncertain_agreement == "unlearn":
        low_mask = low_mask | agree_uncertain
    uncertainty = torch.where(student_wins, student_uncertainty, teacher_uncertainty)

    agreement = tumour_dice(teacher_label, student_label)
    confidence = alpha * float(prior_confidence) + (1.0 - alpha) * agreement
    counts = {
        "agree_confident": int(agree_confident.sum()),
        "agree_uncertain": int(agree_uncertain.sum()),
        "student_high": int(student_high.sum()),
        "student_low": int(student_low.sum()),
        "student_ignored": int(student_ignored.sum()),
        "disagree_kept": int(disagree_kept.sum()),
    }
    return RefinementResult(
        label=label,
        high_mask=high_mask,
        low_mask=low_mask,
        uncertainty=uncertainty,
        agreement=agreement,
        confidence=confidence,
        counts=counts,
    )
