"""The student's losses: supervised Dice+CE, Dice+CE on confident voxels, bounded unlearning.

METHOD.md, "Dual loss":

    L = L_sup(labeled)
      + λ_h · DiceCE(student, ŷ; only voxels in H)
      + λ_l(t) · mean_{v ∈ L} −log(1 − p^S_v,ŷ_v + ε)

with H = {u ≤ τ_h}, L = {u ≥ τ_l} and λ_l(t) ramped up with a sigmoid (Laine & Aila 2017, UA-MT).

One batch may mix labeled and pseudo-labeled patches. :class:`DualLoss` therefore takes the whole
batch's logits once, a per-sample ``is_pseudo`` flag, and a single target tensor that holds ground
truth for labeled samples and the pseudo-label for pseudo-labeled ones; the training loop does one
forward pass per batch whatever the mix.

Masks on disk (``mask_path`` in the pool) use one uint8 volume: see :func:`encode_masks`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, MaskedDiceLoss
from torch import nn

# MONAI's defaults. With soft Dice 1 − (2·tp + s_nr) / (Σp + Σg + s_dr), a class absent from both
# prediction and target inside the mask scores 1 − s/s = 0 loss, and an empty mask gives exactly 0.
DICE_SMOOTH_NUMERATOR = 1e-5
DICE_SMOOTH_DENOMINATOR = 1e-5

# Values of the mask volume written next to each pseudo-label.
MASK_IGNORED = 0
MASK_HIGH = 1
MASK_LOW = 2


def _label_volume(target: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 1, X, Y, Z) or (B, X, Y, Z) integer labels -> (B, X, Y, Z) long."""
    if target.dim() == 5 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 4:
        raise ValueError(f"{name}: expected (B, 1, X, Y, Z) or (B, X, Y, Z) labels, got {tuple(target.shape)}")
    return target.long()


def _mask_volume(mask: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, X, Y, Z) or (B, X, Y, Z) mask -> (B, X, Y, Z) bool, shape-checked against ``like``."""
    if mask.dim() == 5 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != like.shape:
        expected = tuple(like.shape)
        raise ValueError(f"{name}: expected shape {expected} (optionally with a channel of 1), got {tuple(mask.shape)}")
    return mask.bool()


def _zero_with_graph(logits: torch.Tensor) -> torch.Tensor:
    """A 0 that stays connected to ``logits``, so ``backward`` works on a batch without this part."""
    return logits.sum() * 0.0


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MONAI Dice + cross-entropy on labeled patches (both terms weighted 1, background included).

    Args:
        logits: (B, K, X, Y, Z) raw network outputs.
        labels: (B, 1, X, Y, Z) or (B, X, Y, Z) integer labels in 0..K-1.

    Returns:
        Scalar loss; 0 (connected to ``logits``) when B == 0.
    """
    labels = _label_volume(labels, "labels")
    if logits.shape[0] == 0:
        return _zero_with_graph(logits)
    dice_ce = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        smooth_nr=DICE_SMOOTH_NUMERATOR,
        smooth_dr=DICE_SMOOTH_DENOMINATOR,
    )
    return dice_ce(logits, labels[:, None])


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the voxels where ``mask`` is True (pooled over the batch).

    Args:
        logits: (B, K, X, Y, Z).
        target: (B, 1, X, Y, Z) or (B, X, Y, Z) integer labels.
        mask: (B, 1, X, Y, Z) or (B, X, Y, Z) bool.

    Returns:
        Scalar; exactly 0 with a zero gradient when the mask is empty.
    """
    target = _label_volume(target, "target")
    mask = _mask_volume(mask, "mask", target)
    per_voxel = F.cross_entropy(logits, target, reduction="none")  # (B, X, Y, Z)
    weight = mask.to(per_voxel.dtype)
    # clamp: an empty mask divides 0 by 1 instead of 0 by 0.
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


def masked_dice(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss on the voxels where ``mask`` is True (MONAI ``MaskedDiceLoss``).

    Probabilities and the one-hot target are both multiplied by the mask, so voxels outside it add
    neither true nor false positives. Intersections and sums are pooled over the batch
    (``batch=True``): a patch whose mask is empty (e.g. a labeled patch in a mixed batch) then adds
    nothing instead of a spurious 0 that would dilute the mean. The loss is averaged over the K
    classes, background included, with the smoothing constants above.

    Args:
        logits: (B, K, X, Y, Z).
        target: (B, 1, X, Y, Z) or (B, X, Y, Z) integer labels.
        mask: (B, 1, X, Y, Z) or (B, X, Y, Z) bool.

    Returns:
        Scalar; exactly 0 when the mask is empty.
    """
    target = _label_volume(target, "target")
    mask = _mask_volume(mask, "mask", target)
    num_classes = logits.shape[1]
    # One-hot here, not via to_onehot_y: MaskedLoss multiplies the target by the mask *before*
    # DiceLoss one-hots it, which would turn every masked-out voxel into a background target.
    one_hot = F.one_hot(target, num_classes).movedim(-1, 1).to(logits.dtype)
    dice = MaskedDiceLoss(
        softmax=True,
        batch=True,
        smooth_nr=DICE_SMOOTH_NUMERATOR,
        smooth_dr=DICE_SMOOTH_DENOMINATOR,
    )
    return dice(logits, one_hot, mask=mask[:, None].to(logits.dtype))


def masked_dice_ce(logits: torch.Tensor, pseudo_label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy restricted to ``mask`` (the confident set H); see the two parts.

    Args:
        logits: (B, K, X, Y, Z).
        pseudo_label: (B, 1, X, Y, Z) or (B, X, Y, Z) integer labels.
        mask: (B, 1, X, Y, Z) or (B, X, Y, Z) bool.

    Returns:
        Scalar; exactly 0 (finite, zero gradient) when the mask is empty.
    """
    return masked_dice(logits, pseudo_label, mask) + masked_cross_entropy(logits, pseudo_label, mask)


def unlearning_loss(
    logits: torch.Tensor, pseudo_label: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Negative learning on unreliable voxels: mean over the mask of −log(1 − p_ŷ + eps).

    Minimising it pushes the probability of the pseudo-label ŷ *down* (NLNL, Kim et al. 2019;
    UPS, Rizve et al. 2021). Unlike gradient ascent on cross-entropy it is bounded: at most
    −log(eps) per voxel.

    Args:
        logits: (B, K, X, Y, Z).
        pseudo_label: (B, 1, X, Y, Z) or (B, X, Y, Z) integer labels to unlearn.
        mask: (B, 1, X, Y, Z) or (B, X, Y, Z) bool, the low-confidence set L.
        eps: keeps the log finite where p_ŷ = 1.

    Returns:
        Scalar; exactly 0 (finite, zero gradient) when the mask is empty.
    """
    target = _label_volume(pseudo_label, "pseudo_label")
    mask = _mask_volume(mask, "mask", target)
    probs = torch.softmax(logits, dim=1)
    prob_of_label = probs.gather(1, target[:, None])[:, 0]  # (B, X, Y, Z)
    # clamp_min(0): softmax may round p_ŷ a hair above 1 in float32.
    per_voxel = -torch.log((1.0 - prob_of_label).clamp_min(0.0) + eps)
    weight = mask.to(per_voxel.dtype)
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


def sigmoid_rampup(step: float, rampup_steps: float) -> float:
    """Sigmoid-shaped ramp from exp(−5) to 1: exp(−5 (1 − t)²), t = clip(step / rampup_steps, 0, 1).

    Laine & Aila 2017; the same curve UA-MT uses for its consistency weight.

    Returns:
        1.0 when ``rampup_steps <= 0`` (no ramp).
    """
    if rampup_steps <= 0:
        return 1.0
    progress = min(max(float(step), 0.0), float(rampup_steps)) / float(rampup_steps)
    return float(math.exp(-5.0 * (1.0 - progress) ** 2))


def _check_thresholds(tau_high: float, tau_low: float) -> None:
    if not (0.0 <= tau_high < tau_low <= 1.0):
        raise ValueError(
            f"uncertainty thresholds must satisfy 0 <= tau_high < tau_low <= 1 "
            f"(voxels in between are ignored); got tau_high={tau_high}, tau_low={tau_low}"
        )


def masks_from_uncertainty(
    uncertainty: torch.Tensor, tau_high: float, tau_low: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split voxels by normalised uncertainty: H = {u ≤ τ_h}, L = {u ≥ τ_l}, the rest ignored.

    Args:
        uncertainty: any shape, values in [0, 1].
        tau_high: upper bound of the confident set.
        tau_low: lower bound of the unreliable set; must be > ``tau_high``.

    Returns:
        (high, low) bool tensors of the input's shape, disjoint.
    """
    _check_thresholds(tau_high, tau_low)
    uncertainty = torch.as_tensor(uncertainty)
    return uncertainty <= tau_high, uncertainty >= tau_low


def encode_masks(high: torch.Tensor | np.ndarray, low: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pack the two disjoint masks into one uint8 volume: 0 ignored, 1 high (H), 2 low (L)."""
    high = np.asarray(torch.as_tensor(high).cpu(), dtype=bool)
    low = np.asarray(torch.as_tensor(low).cpu(), dtype=bool)
    if high.shape != low.shape:
        raise ValueError(f"high and low masks differ in shape: {high.shape} vs {low.shape}")
    if np.any(high & low):
        raise ValueError(f"{int(np.sum(high & low))} voxels are in both the high and the low mask")
    encoded = np.full(high.shape, MASK_IGNORED, dtype=np.uint8)
    encoded[high] = MASK_HIGH
    encoded[low] = MASK_LOW
    return encoded


def decode_masks(encoded: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_masks`: uint8 volume -> (high, low) bool tensors."""
    encoded = torch.as_tensor(np.asarray(encoded))
    unknown = ~torch.isin(encoded, torch.tensor([MASK_IGNORED, MASK_HIGH, MASK_LOW], dtype=encoded.dtype))
    if unknown.any():
        values = sorted(torch.unique(encoded[unknown]).tolist())
        raise ValueError(f"mask volume holds values other than 0, 1, 2: {values}")
    return encoded == MASK_HIGH, encoded == MASK_LOW


class DualLoss(nn.Module):
    """Supervised + confident (H) + unlearning (L) loss over one batch that may mix both kinds.

    Args:
        tau_high: H = {u ≤ tau_high} (used by :meth:`masks`).
        tau_low: L = {u ≥ tau_low}; must exceed ``tau_high``.
        lambda_high: weight λ_h of the Dice+CE term on H.
        lambda_low: final weight λ_l of the unlearning term on L.
        rampup_steps: optimiser steps over which λ_l rises along :func:`sigmoid_rampup`
            (the first stage's share; 0 = no ramp).
        eps: ε inside the unlearning log.
        unlearn_background: also unlearn voxels of L whose pseudo-label is background. False keeps
            only tumour-labelled voxels of L: "not background" over wide uncertain regions tells
            the student "tumour" without saying where, and it over-segmented (README, domain shift).
    """

    def __init__(
        self,
        tau_high: float = 0.2,
        tau_low: float = 0.5,
        lambda_high: float = 1.0,
        lambda_low: float = 0.3,
        rampup_steps: int = 0,
        eps: float = 1e-6,
        unlearn_background: bool = True,
    ) -> None:
        super().__init__()
        _check_thresholds(tau_high, tau_low)
        if lambda_high < 0 or lambda_low < 0:
            raise ValueError(f"loss weights must be >= 0; got lambda_high={lambda_high}, lambda_low={lambda_low}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.tau_high = tau_high
        self.tau_low = tau_low
        self.lambda_high = lambda_high
        self.lambda_low = lambda_low
        self.rampup_steps = rampup_steps
        self.eps = eps
        self.unlearn_background = unlearn_background

    def masks(self, uncertainty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(high, low) masks from an uncertainty map with this loss's thresholds."""
        return masks_from_uncertainty(uncertainty, self.tau_high, self.tau_low)

    def lambda_low_at(self, step: int) -> float:
        """The ramped weight λ_l(t) of the unlearning term at optimiser step ``step``."""
        return self.lambda_low * sigmoid_rampup(step, self.rampup_steps)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        is_pseudo: torch.Tensor,
        high_mask: torch.Tensor | None = None,
        low_mask: torch.Tensor | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of one batch.

        Args:
            logits: (B, K, X, Y, Z) student outputs.
            target: (B, 1, X, Y, Z) or (B, X, Y, Z): ground truth where ``is_pseudo`` is False,
                the pseudo-label ŷ where it is True.
            is_pseudo: (B,) bool.
            high_mask: (B, [1,] X, Y, Z) bool, H per sample; ignored for labeled samples. May be
                None only when no sample is pseudo-labeled.
            low_mask: same for L.
            step: global optimiser step of the student, for the λ_l ramp-up.

        Returns:
            (total, parts) where parts holds floats for logging: ``supervised``, ``high``, ``low``
            (unweighted terms), ``lambda_low`` (ramped weight) and ``total``.
        """
        target = _label_volume(target, "target")
        is_pseudo = torch.as_tensor(is_pseudo, device=logits.device).bool().reshape(-1)
        if is_pseudo.shape[0] != logits.shape[0]:
            raise ValueError(f"is_pseudo has {is_pseudo.shape[0]} entries for a batch of {logits.shape[0]}")
        labeled = ~is_pseudo

        supervised = supervised_loss(logits[labeled], target[labeled]) if labeled.any() else _zero_with_graph(logits)

        if is_pseudo.any():
            if high_mask is None or low_mask is None:
                raise ValueError("high_mask and low_mask are required when the batch holds pseudo-labeled samples")
            # Labeled samples take no part in H or L, whatever their mask rows hold.
            sample_is_pseudo = is_pseudo[:, None, None, None]
            high = _mask_volume(high_mask, "high_mask", target) & sample_is_pseudo
            low = _mask_volume(low_mask, "low_mask", target) & sample_is_pseudo
            if not self.unlearn_background:
                low = low & (target > 0)
            confident = masked_dice_ce(logits, target, high)
            unlearn = unlearning_loss(logits, target, low, eps=self.eps)
        else:
            confident = _zero_with_graph(logits)
            unlearn = _zero_with_graph(logits)

        lambda_low = self.lambda_low_at(step)
        total = supervised + self.lambda_high * confident + lambda_low * unlearn
        parts = {
            "supervised": float(supervised.detach()),
            "high": float(confident.detach()),
            "low": float(unlearn.detach()),
            "lambda_low": lambda_low,
            "total": float(total.detach()),
        }
        return total, parts
