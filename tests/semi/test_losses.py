"""Losses against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysemi.semi.losses import (
    DICE_SMOOTH_DENOMINATOR,
    DICE_SMOOTH_NUMERATOR,
    DualLoss,
    decode_masks,
    encode_masks,
    masked_cross_entropy,
    masked_dice,
    masked_dice_ce,
    masks_from_uncertainty,
    sigmoid_rampup,
    supervised_loss,
    unlearning_loss,
)

# Three voxels along X of a (B=1, K=4, 3, 1, 1) volume. Logits = log(probs) so that softmax gives
# back exactly these probabilities. Voxel 2 is outside the mask and deliberately extreme.
PROBS = [[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01]]
LABELS = [0, 3, 1]
MASK = [True, True, False]


def _volume(probs=PROBS, labels=LABELS, mask=MASK):
    logits = torch.log(torch.tensor(probs, dtype=torch.float64)).T.reshape(1, 4, len(probs), 1, 1)
    target = torch.tensor(labels).reshape(1, len(labels), 1, 1)
    mask_tensor = torch.tensor(mask).reshape(1, len(mask), 1, 1)
    return logits, target, mask_tensor


def test_masked_cross_entropy_hand_value():
    logits, target, mask = _volume()
    expected = (-math.log(0.25) - math.log(0.4)) / 2  # voxel 0 label 0, voxel 1 label 3
    assert masked_cross_entropy(logits, target, mask).item() == pytest.approx(expected, rel=1e-9)


def test_masked_cross_entropy_accepts_channel_dim():
    logits, target, mask = _volume()
    with_channel = masked_cross_entropy(logits, target[:, None], mask[:, None])
    assert with_channel.item() == pytest.approx((-math.log(0.25) - math.log(0.4)) / 2, rel=1e-9)


def test_masked_dice_hand_value():
    logits, target, mask = _volume()
    s_nr, s_dr = DICE_SMOOTH_NUMERATOR, DICE_SMOOTH_DENOMINATOR
    # Per class over voxels 0 and 1: 1 - (2 tp + s) / (sum p + sum g + s).
    # class 0: tp = .25, sum p = .25 + .1,  sum g = 1
    # class 1: tp = 0,   sum p = .25 + .2,  sum g = 0
    # class 2: tp = 0,   sum p = .25 + .3,  sum g = 0
    # class 3: tp = .4,  sum p = .25 + .4,  sum g = 1
    per_class = [
        1 - (0.5 + s_nr) / (1.35 + s_dr),
        1 - s_nr / (0.45 + s_dr),
        1 - s_nr / (0.55 + s_dr),
        1 - (0.8 + s_nr) / (1.65 + s_dr),
    ]
    expected = sum(per_class) / 4
    assert masked_dice(logits, target, mask).item() == pytest.approx(expected, rel=1e-6)


def test_masked_dice_ce_is_the_sum_of_its_parts_and_ignores_outside_voxels():
    logits, target, mask = _volume()
    changed = logits.clone()
    changed[0, :, 2, 0, 0] = torch.tensor([-9.0, 9.0, 0.0, 3.0], dtype=changed.dtype)  # outside the mask
    other_label = target.clone()
    other_label[0, 2] = 0
    expected = masked_dice(logits, target, mask) + masked_cross_entropy(logits, target, mask)
    assert masked_dice_ce(changed, other_label, mask).item() == pytest.approx(expected.item(), rel=1e-9)


def test_unlearning_hand_value():
    eps = 1e-6
    logits, target, mask = _volume(
        probs=[[0.8, 0.1, 0.05, 0.05], [0.1, 0.2, 0.3, 0.4]], labels=[0, 2], mask=[True, True]
    )
    expected = (-math.log(0.2 + eps) - math.log(0.7 + eps)) / 2
    assert unlearning_loss(logits, target, mask, eps=eps).item() == pytest.approx(expected, rel=1e-6)


def test_unlearning_is_bounded_by_minus_log_eps():
    eps = 1e-6
    logits = torch.tensor([60.0, 0.0, 0.0, 0.0]).reshape(1, 4, 1, 1, 1)  # p_0 == 1 in float32
    target = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    value = unlearning_loss(logits, target, torch.ones(1, 1, 1, 1, dtype=torch.bool), eps=eps)
    assert math.isfinite(value.item())
    assert value.item() <= -math.log(eps) + 1e-4
    assert value.item() == pytest.approx(-math.log(eps), rel=1e-3)


def test_unlearning_step_lowers_probability_of_label_only_inside_mask():
    logits, target, mask = _volume(
        probs=[[0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2], [0.1, 0.1, 0.7, 0.1]],
        labels=[0, 1, 2],
        mask=[True, True, False],
    )
    logits = logits.clone().requires_grad_(True)
    before = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0].detach()
    unlearning_loss(logits, target, mask).backward()
    with torch.no_grad():
        after = torch.softmax(logits - 1.0 * logits.grad, 1).gather(1, target[:, None])[:, 0]
    assert after[0, 0] < before[0, 0]
    assert after[0, 1] < before[0, 1]
    assert after[0, 2] == before[0, 2]  # outside the mask: untouched
    assert torch.all(logits.grad[0, :, 2] == 0)


@pytest.mark.parametrize("loss", [masked_cross_entropy, masked_dice, masked_dice_ce, unlearning_loss])
def test_empty_mask_gives_zero_and_finite_zero_gradient(loss):
    logits = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    target = torch.randint(0, 4, (2, 3, 3, 3))
    value = loss(logits, target, torch.zeros(2, 3, 3, 3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert torch.all(logits.grad == 0)


def test_supervised_loss_near_zero_for_a_confident_correct_prediction_and_shape_forms_agree():
    target = torch.randint(0, 4, (2, 4, 4, 4))
    logits = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).float() * 30.0
    assert supervised_loss(logits, target).item() < 1e-4
    wrong = torch.roll(logits, 1, dims=1)
    assert supervised_loss(wrong, target).item() > 1.0
    assert supervised_loss(wrong, target[:, None]).item() == pytest.approx(supervised_loss(wrong, target).item())


@pytest.mark.parametrize(
    ("step", "rampup_steps", "expected"),
    [
        (0, 100, math.exp(-5.0)),
        (50, 100, math.exp(-5.0 * 0.5**2)),
        (75, 100, math.exp(-5.0 * 0.25**2)),
        (100, 100, 1.0),
        (250, 100, 1.0),
        (-10, 100, math.exp(-5.0)),
        (0, 0, 1.0),
    ],
)
def test_sigmoid_rampup_hand_values(step, rampup_steps, expected):
    assert sigmoid_rampup(step, rampup_steps) == pytest.approx(expected, rel=1e-12)


def test_masks_from_uncertainty_splits_at_thresholds():
    uncertainty = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.49, 0.5, 0.9])
    high, low = masks_from_uncertainty(uncertainty, tau_high=0.2, tau_low=0.5)
    assert high.tolist() == [True, True, True, False, False, False, False]
    assert low.tolist() == [False, False, False, False, False, True, True]


@pytest.mark.parametrize(("tau_high", "tau_low"), [(0.5, 0.5), (0.6, 0.5), (-0.1, 0.5), (0.2, 1.5)])
def test_bad_thresholds_rejected(tau_high, tau_low):
    with pytest.raises(ValueError, match="tau_high"):
        masks_from_uncertainty(torch.zeros(3), tau_high, tau_low)
    with pytest.raises(ValueError, match="tau_high"):
        DualLoss(tau_high=tau_high, tau_low=tau_low)


def test_mask_encoding_round_trip_and_overlap_rejected():
    high = np.array([True, False, False, True])
    low = np.array([False, True, False, False])
    encoded = encode_masks(high, low)
    assert encoded.dtype == np.uint8
    assert encoded.tolist() == [1, 2, 0, 1]
    decoded_high, decoded_low = decode_masks(encoded)
    assert decoded_high.tolist() == high.tolist()
    assert decoded_low.tolist() == low.tolist()
    with pytest.raises(ValueError, match="both"):
        encode_masks(high, high)
    with pytest.raises(ValueError, match="other than"):
        decode_masks(np.array([0, 3], dtype=np.uint8))


def _mixed_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 4, 4, 4, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 4, 4, 4), generator=generator)
    uncertainty = torch.rand(3, 4, 4, 4, generator=generator, dtype=torch.float64)
    is_pseudo = torch.tensor([False, True, True])
    return logits, target, uncertainty, is_pseudo


def test_dual_loss_total_matches_separately_computed_parts():
    logits, target, uncertainty, is_pseudo = _mixed_batch()
    loss = DualLoss(tau_high=0.2, tau_low=0.5, lambda_high=0.7, lambda_low=0.3, rampup_steps=100, eps=1e-6)
    high, low = masks_from_uncertainty(uncertainty, 0.2, 0.5)
    step = 40

    total, parts = loss(logits, target, is_pseudo, high, low, step=step)

    supervised = supervised_loss(logits[:1], target[:1])
    pseudo_high = high.clone()
    pseudo_high[0] = False
    pseudo_low = low.clone()
    pseudo_low[0] = False
    confident = masked_dice_ce(logits, target, pseudo_high)
    unlearn = unlearning_loss(logits, target, pseudo_low, eps=1e-6)
    ramp = math.exp(-5.0 * (1.0 - 40 / 100) ** 2)
    expected = supervised + 0.7 * confident + ramp * 0.3 * unlearn
    assert total.item() == pytest.approx(expected.item(), rel=1e-9)
    assert parts["supervised"] == pytest.approx(supervised.item())
    assert parts["high"] == pytest.approx(confident.item())
    assert parts["low"] == pytest.approx(unlearn.item())
    assert parts["lambda_low"] == pytest.approx(0.3 * ramp)
    assert parts["supervised"] > 0 and parts["high"] > 0 and parts["low"] > 0


def test_dual_loss_ignores_masks_of_labeled_samples():
    logits, target, uncertainty, is_pseudo = _mixed_batch(seed=1)
    loss = DualLoss(rampup_steps=0)
    high, low = masks_from_uncertainty(uncertainty, 0.2, 0.5)
    cleared_high, cleared_low = high.clone(), low.clone()
    cleared_high[0] = False
    cleared_low[0] = False
    with_rows, _ = loss(logits, target, is_pseudo, high, low)
    without_rows, _ = loss(logits, target, is_pseudo, cleared_high, cleared_low)
    assert with_rows.item() == pytest.approx(without_rows.item(), rel=1e-12)


def test_dual_loss_labeled_only_and_pseudo_only_batches():
    logits, target, uncertainty, _ = _mixed_batch(seed=2)
    logits.requires_grad_(True)
    loss = DualLoss(rampup_steps=0)

    labeled_total, parts = loss(logits, target, torch.zeros(3, dtype=torch.bool))
    assert labeled_total.item() == pytest.approx(supervised_loss(logits, target).item(), rel=1e-9)
    assert parts["high"] == 0.0 and parts["low"] == 0.0

    high, low = masks_from_uncertainty(uncertainty, 0.2, 0.5)
    pseudo_total, parts = loss(logits, target, torch.ones(3, dtype=torch.bool), high, low, step=5)
    expected = masked_dice_ce(logits, target, high) + 0.3 * unlearning_loss(logits, target, low)
    assert pseudo_total.item() == pytest.approx(expected.item(), rel=1e-9)
    assert parts["supervised"] == 0.0
    pseudo_total.backward()
    assert torch.isfinite(logits.grad).all()


def test_dual_loss_requires_masks_for_pseudo_samples():
    logits, target, _, is_pseudo = _mixed_batch()
    with pytest.raises(ValueError, match="high_mask and low_mask"):
        DualLoss()(logits, target, is_pseudo)


def test_dual_loss_without_background_unlearning_unlearns_only_tumour_labels():
    # One pseudo-labeled sample, all three voxels in L, λ_h = 0 so only the unlearning term is left.
    # Voxel 0 is labelled background (p = 0.25), voxel 1 class 3 (p = 0.4), voxel 2 class 1 (p = 0.01).
    logits, target, _ = _volume()
    low = torch.ones_like(target, dtype=torch.bool)
    high = torch.zeros_like(low)
    is_pseudo = torch.tensor([True])
    every_voxel = -(math.log(1 - 0.25) + math.log(1 - 0.4) + math.log(1 - 0.01)) / 3
    tumour_only = -(math.log(1 - 0.4) + math.log(1 - 0.01)) / 2
    with_bg, parts = DualLoss(lambda_high=0.0, lambda_low=1.0, eps=1e-12)(logits, target, is_pseudo, high, low)
    assert parts["low"] == pytest.approx(every_voxel, rel=1e-9)
    without_bg, parts = DualLoss(lambda_high=0.0, lambda_low=1.0, eps=1e-12, unlearn_background=False)(
        logits, target, is_pseudo, high, low
    )
    assert parts["low"] == pytest.approx(tumour_only, rel=1e-9)
    assert without_bg.item() == pytest.approx(tumour_only, rel=1e-9)
