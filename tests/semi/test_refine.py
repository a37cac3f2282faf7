"""Refinement rule on hand-built six-voxel volumes (K = 4, shape (4, 6, 1, 1))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from raysemi.semi.refine import refine, tumour_dice
from raysemi.semi.uncertainty import normalised_entropy

TAU_HIGH, TAU_LOW, MARGIN = 0.2, 0.5, 0.1


def confident(label):
    """c = 0.97, u ≈ 0.121 (≤ τ_h)."""
    return [0.97 if k == label else 0.01 for k in range(4)]


def middling(label):
    """c = 0.85, u ≈ 0.424 (between τ_h and τ_l)."""
    return [0.85 if k == label else 0.05 for k in range(4)]


def unsure(label):
    """c = 0.7, u ≈ 0.678 (≥ τ_l)."""
    return [0.7 if k == label else 0.1 for k in range(4)]


def weak(label):
    """c = 0.4, u ≈ 0.961."""
    return [0.4 if k == label else 0.2 for k in range(4)]


def _u(probs):
    return entropy(probs) / math.log(4)  # independent reference (scipy)


def test_the_building_blocks_sit_where_the_tests_assume():
    assert _u(confident(0)) <= TAU_HIGH
    assert TAU_HIGH < _u(middling(0)) < TAU_LOW
    assert _u(unsure(0)) >= TAU_LOW
    assert _u(weak(0)) >= TAU_LOW


def _volume(voxels):
    """list of K-vectors -> (K, n, 1, 1) float64 array."""
    return np.asarray(voxels, dtype=np.float64).T.reshape(4, len(voxels), 1, 1)


# voxel: (teacher probs, student probs)                      expected label, set (H/L/-)
VOXELS = [
    (confident(1), confident(1)),  # agree, both confident       -> 1, H
    (middling(2), confident(2)),  # agree, teacher unsure        -> 2, L ("unlearn") / - ("ignore")
    (unsure(1), confident(3)),  # student .97 vs .7: wins, u_S low  -> 3, H
    (weak(0), unsure(2)),  # student .7 vs .4: wins, u_S high       -> 2, L
    (unsure(0), middling(2)),  # student .85 vs .7: wins, u_S middle -> 2, ignored
    (confident(0), middling(3)),  # student less confident: kept -> 0, L
]
TEACHER = _volume([teacher for teacher, _ in VOXELS])
STUDENT = _volume([student for _, student in VOXELS])


def _flat(tensor):
    return tensor.reshape(-1).tolist()


def test_every_branch_unlearn_mode():
    result = refine(
        TEACHER,
        STUDENT,
        tau_high=TAU_HIGH,
        tau_low=TAU_LOW,
        margin=MARGIN,
        alpha=0.5,
        prior_confidence=0.6,
        uncertain_agreement="unlearn",
    )
    assert _flat(result.label) == [1, 2, 3, 2, 2, 0]
    assert _flat(result.high_mask) == [True, False, True, False, False, False]
    assert _flat(result.low_mask) == [False, True, False, True, False, True]
    assert result.counts == {
        "agree_confident": 1,
        "agree_uncertain": 1,
        "student_high": 1,
        "student_low": 1,
        "student_ignored": 1,
        "disagree_kept": 1,
    }
    # tumour (label > 0): teacher [1,1,1,0,0,0], student [1,1,1,1,1,1] -> Dice 2·3 / (3 + 6)
    assert result.agreement == pytest.approx(2 / 3)
    assert result.confidence == pytest.approx(0.5 * 0.6 + 0.5 * 2 / 3)
    # uncertainty follows the model whose label the voxel now carries
    expected_u = [_u(confident(1)), _u(middling(2)), _u(confident(3)), _u(unsure(2)), _u(middling(2)), _u(confident(0))]
    assert _flat(result.uncertainty) == pytest.approx(expected_u, rel=1e-5)


def test_ignore_mode_leaves_agreeing_uncertain_voxels_out_of_both_sets():
    result = refine(TEACHER, STUDENT, prior_confidence=0.6, uncertain_agreement="ignore")
    assert _flat(result.label) == [1, 2, 3, 2, 2, 0]
    assert _flat(result.high_mask) == [True, False, True, False, False, False]
    assert _flat(result.low_mask) == [False, False, False, True, False, True]


def test_masks_are_disjoint():
    result = refine(TEACHER, STUDENT, prior_confidence=0.6)
    assert not torch.any(result.high_mask & result.low_mask)


def test_larger_margin_keeps_the_teacher_label():
    # margin 0.2: only voxel 2 (.97 - .7 = .27) and voxel 3 (.7 - .4 = .3) still switch; voxel 4 (.15) is kept -> L
    result = refine(TEACHER, STUDENT, margin=0.2, prior_confidence=0.6)
    assert _flat(result.label) == [1, 2, 3, 2, 0, 0]
    assert _flat(result.low_mask) == [False, True, False, True, True, True]
    assert result.counts["student_ignored"] == 0
    assert result.counts["disagree_kept"] == 2


def test_alpha_weights_prior_confidence_and_agreement():
    result = refine(TEACHER, STUDENT, alpha=0.25, prior_confidence=0.2)
    assert result.confidence == pytest.approx(0.25 * 0.2 + 0.75 * 2 / 3)


def test_given_teacher_label_replaces_the_teacher_argmax():
    teacher = _volume([confident(0), confident(1)])
    student = _volume([confident(2), confident(1)])
    # The stored (refined) label says 2 at voxel 0, where the teacher's argmax is 0: with the
    # stored label the models agree there, and both distributions are confident -> kept, H.
    result = refine(teacher, student, teacher_label=np.array([2, 1]).reshape(2, 1, 1), prior_confidence=0.5)
    assert _flat(result.label) == [2, 1]
    assert _flat(result.high_mask) == [True, True]
    assert result.agreement == 1.0


def test_both_tumours_empty_gives_agreement_one():
    teacher = _volume([confident(0)] * 3)
    student = _volume([unsure(0)] * 3)
    result = refine(teacher, student, prior_confidence=0.4)
    assert result.agreement == 1.0
    assert result.confidence == pytest.approx(0.5 * 0.4 + 0.5 * 1.0)


def test_numpy_and_torch_inputs_agree():
    from_numpy = refine(TEACHER, STUDENT, prior_confidence=0.6)
    from_torch = refine(torch.from_numpy(TEACHER), torch.from_numpy(STUDENT), prior_confidence=0.6)
    assert torch.equal(from_numpy.label, from_torch.label)
    assert torch.equal(from_numpy.low_mask, from_torch.low_mask)


@pytest.mark.parametrize(
    ("label_a", "label_b", "expected"),
    [
        ([0, 1, 2, 3], [0, 1, 2, 3], 1.0),
        ([0, 1, 1, 0], [0, 0, 3, 3], 2 * 1 / (2 + 2)),  # labels differ inside the tumour: still tumour
        ([1, 1, 0, 0], [0, 0, 2, 2], 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0),
    ],
)
def test_tumour_dice(label_a, label_b, expected):
    assert tumour_dice(torch.tensor(label_a), torch.tensor(label_b)) == pytest.approx(expected)


def test_normalised_entropy_matches_scipy_and_handles_zero_probabilities():
    probs = torch.tensor([[0.1, 1.0, 0.25], [0.2, 0.0, 0.25], [0.3, 0.0, 0.25], [0.4, 0.0, 0.25]])
    expected = [_u([0.1, 0.2, 0.3, 0.4]), 0.0, 1.0]
    # refine() takes (K, ...) probabilities: the class axis is 0 there.
    assert normalised_entropy(probs, dim=0).tolist() == pytest.approx(expected, abs=1e-6)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        refine(TEACHER, STUDENT[:, :3], prior_confidence=0.5)
    with pytest.raises(ValueError, match="not probabilities"):
        refine(np.log(TEACHER), STUDENT, prior_confidence=0.5)
    with pytest.raises(ValueError, match="teacher_label has shape"):
        refine(TEACHER, STUDENT, teacher_label=np.zeros((5, 1, 1)), prior_confidence=0.5)
    with pytest.raises(ValueError, match="tau_high"):
        refine(TEACHER, STUDENT, tau_high=0.5, tau_low=0.5, prior_confidence=0.5)
    with pytest.raises(ValueError, match="uncertain_agreement"):
        refine(TEACHER, STUDENT, prior_confidence=0.5, uncertain_agreement="keep")
