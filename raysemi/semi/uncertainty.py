"""Monte-Carlo dropout uncertainty and image-level confidence (plain torch / numpy, no Ray).

For a scan ``x`` the model runs ``T`` stochastic passes with dropout on. From the per-pass
softmax probabilities ``p_t`` (``K`` classes) we derive, per voxel:

- mean probability   ``p̄ = (1/T) Σ_t p_t``; pseudo-label ``argmax_c p̄_c``;
- uncertainty        ``u = H(p̄) / log K``, the normalised entropy, in [0, 1];
- mutual information ``MI = (H(p̄) − (1/T) Σ_t H(p_t)) / log K``, in [0, 1]: the part of the
  uncertainty that comes from disagreement between passes (model uncertainty), as opposed to
  probabilities that are flat in every pass. It is normalised by ``log K`` like the entropy so
  the two share a scale.

The ``T`` passes are batched: the input is repeated along the batch axis, so ``T·B`` samples
go through the model in as few forward calls as ``max_batch`` allows. Every sample in a batch
draws its own dropout masks, so a batched pass is as stochastic as a sequential one.

Image-level confidence (:func:`image_confidence`) averages ``u`` over a region around the
predicted tumour and the more uncertain half of the brain, because averaging over all voxels
would call every scan confident (background is easy).

Brain mask: callers pass it. For a preprocessed image it is "any modality nonzero" computed
*before* z-scoring (:func:`brain_mask_from_image` on the raw or cropped image; after MONAI's
``NormalizeIntensity(nonzero=True)`` background stays 0, so it also works there).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from raysemi.model.transaspp_unet import SIZE_DIVISOR, TransASPPUNet

_EPS = 1e-8

# Modules whose train/eval mode changes only their randomness. MultiheadAttention applies
# attention dropout only in train mode, and an eval-mode TransformerEncoderLayer may take
# PyTorch's fused "fast path", which skips dropout entirely; LayerNorm inside them behaves
# the same in both modes, so putting them in train mode changes nothing but the dropout.
_STOCHASTIC_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.MultiheadAttention, nn.TransformerEncoderLayer,
)


class enable_mc_dropout:  # noqa: N801 - lower case like torch.set_grad_enabled, which it mirrors
    """Put ``model`` in eval mode with dropout active (Monte-Carlo dropout).

    Normalisation layers (instance norm etc.) stay in eval mode; only dropout (and the
    attention layers that own dropout) are switched to train mode. Like
    ``torch.set_grad_enabled``, it acts when called, so it works both as a plain call
    (modes stay set) and as a context manager (the previous train/eval mode of every
    module is restored on exit).

    Args:
        model: the network.
        enabled: ``False`` gives plain deterministic eval mode instead (dropout off).
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self._previous = {module: module.training for module in model.modules()}
        model.eval()
        if enabled:
            for module in model.modules():
                if isinstance(module, _STOCHASTIC_MODULES):
                    module.train()

    def __enter__(self) -> "enable_mc_dropout":
        return self

    def __exit__(self, *exc_info: object) -> None:
        for module, training in self._previous.items():
            module.training = training


def normalised_entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy of a categorical distribution divided by ``log K``, in [0, 1].

    Args:
        probs: probabilities, summing to 1 along ``dim``, e.g. ``(B, K, X, Y, Z)``.
        dim: the class axis; ``K = probs.shape[dim]`` must be at least 2.

    Returns:
        ``probs`` without ``dim``, e.g. ``(B, X, Y, Z)``: 0 for one-hot, 1 for uniform.
    """
    num_classes = probs.shape[dim]
    if num_classes < 2:
        raise ValueError(f"entropy needs at least 2 classes along dim {dim}, got shape {tuple(probs.shape)}")
    # p·log(max(p, eps)) is exactly 0 where p == 0, as the limit p log p -> 0 requires.
    entropy = -(probs * probs.clamp_min(_EPS).log()).sum(dim)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def mutual_information(pass_probs: torch.Tensor) -> torch.Tensor:
    """Mutual information between prediction and model weights (BALD), normalised by ``log K``.

    ``MI = (H(mean_t p_t) − mean_t H(p_t)) / log K``; zero when all passes agree.

    Args:
        pass_probs: per-pass probabilities ``(T, B, K, ...)``.

    Returns:
        ``(B, ...)``, in [0, 1] (clamped at 0 against rounding).
    """
    if pass_probs.ndim < 3:
        raise ValueError(f"pass_probs must be (T, B, K, ...), got shape {tuple(pass_probs.shape)}")
    entropy_of_mean = normalised_entropy(pass_probs.mean(0), dim=1)
    mean_entropy = normalised_entropy(pass_probs, dim=2).mean(0)
    return (entropy_of_mean - mean_entropy).clamp_min(0.0)


def _check_passes(passes: int, max_batch: int | None) -> None:
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, got {passes!r}")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")


def _deterministic_encoder(model: nn.Module) -> bool:
    """True for a TransASPP-UNet whose encoder holds no stochastic module (so MC passes may share it)."""
    return isinstance(model, TransASPPUNet) and not any(
        isinstance(module, _STOCHASTIC_MODULES) for module in model.down_layers.modules()
    )


def _pass_chunks(model: nn.Module, x: torch.Tensor, passes: int,
                 max_batch: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``passes`` forward passes of ``x`` as repeated batches of at most ``max_batch``.

    Sample ``s = t·B + b`` is pass ``t`` of batch item ``b``. Only one chunk of the repeated
    input exists at a time, so memory is bounded by ``max_batch``, not ``T·B``.

    With several passes of a TransASPP-UNet, whose dropout sits only in the bottleneck and the
    decoder, the encoder runs once per batch item and only the stochastic rest runs per pass: the
    same distribution of outputs for (1 + T·rest/forward)/T of the work (the profile in
    ``benchmarks/results/profile_hot_paths.md``).

    Yields:
        ``(sample_index (N,), probs (N, K, ...))`` per forward call, probabilities in float32.
    """
    batch = x.shape[0]
    total = passes * batch
    chunk = total if max_batch is None else max_batch
    skips = None
    if passes > 1 and _deterministic_encoder(model):
        model.check_input(x)
        skips = model.encode(x)
    for start in range(0, total, chunk):
        sample_index = torch.arange(start, min(start + chunk, total), device=x.device)
        if skips is None:
            logits = model(x[sample_index % batch])
        else:
            logits = model.forward_from_skips([skip[sample_index % batch] for skip in skips])
        yield sample_index, F.softmax(logits.float(), dim=1)


def mc_dropout_probs(model: nn.Module, x: torch.Tensor, passes: int, max_batch: int | None = None,
                     dropout: bool = True) -> torch.Tensor:
    """All ``T`` per-pass probabilities of a batch, with batched stochastic passes.

    Args:
        model: segmentation network returning logits ``(N, K, ...)``; on ``x``'s device.
        x: input ``(B, C, ...)``.
        passes: ``T``, number of passes.
        max_batch: most samples per forward call (``None``: all ``T·B`` at once).
        dropout: ``True`` for Monte-Carlo dropout; ``False`` runs deterministic eval passes.

    Returns:
        ``(T, B, K, ...)`` softmax probabilities. The model's train/eval modes are restored.
    """
    _check_passes(passes, max_batch)
    probs = None
    with enable_mc_dropout(model, dropout), torch.no_grad():
        for sample_index, chunk_probs in _pass_chunks(model, x, passes, max_batch):
            if probs is None:
                probs = chunk_probs.new_empty((passes * x.shape[0], *chunk_probs.shape[1:]))
            probs[sample_index] = chunk_probs
    return probs.view(passes, x.shape[0], *probs.shape[1:])


def _mean_probs_and_pass_entropy(model: nn.Module, x: torch.Tensor, passes: int,
                                 max_batch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running means over passes of the probabilities ``(B, K, ...)`` and of the per-pass
    normalised entropy ``(B, ...)``, without keeping all passes in memory."""
    batch = x.shape[0]
    probs_sum = entropy_sum = None
    for sample_index, probs in _pass_chunks(model, x, passes, max_batch):
        if probs_sum is None:
            probs_sum = probs.new_zeros((batch, *probs.shape[1:]))
            entropy_sum = probs.new_zeros((batch, *probs.shape[2:]))
        batch_index = sample_index % batch
        probs_sum.index_add_(0, batch_index, probs)
        entropy_sum.index_add_(0, batch_index, normalised_entropy(probs, dim=1))
    return probs_sum / passes, entropy_sum / passes


def _summaries(mean_probs: torch.Tensor, mean_pass_entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    entropy = normalised_entropy(mean_probs, dim=1)
    return {
        "mean_probs": mean_probs,
        "label": mean_probs.argmax(dim=1),
        "entropy": entropy,
        # Same formula as mutual_information(), from running means.
        "mutual_info": (entropy - mean_pass_entropy).clamp_min(0.0),
    }


def mc_predict(model: nn.Module, x: torch.Tensor, passes: int,
               max_batch: int | None = None) -> dict[str, torch.Tensor]:
    """Monte-Carlo dropout prediction of a batch of patches.

    Dropout is on when ``passes > 1``; ``passes == 1`` is the plain deterministic prediction.

    Args:
        model: segmentation network returning logits; on ``x``'s device.
        x: input ``(B, C, X, Y, Z)`` the model accepts (sides divisible by 16 for TransASPPUNet).
        passes: ``T``.
        max_batch: most samples per forward call (``None``: all ``T·B`` at once).

    Returns:
        dict with ``mean_probs (B, K, X, Y, Z)``, ``label (B, X, Y, Z)`` int64 (argmax of the
        mean), ``entropy (B, X, Y, Z)`` (normalised entropy of the mean, the uncertainty ``u``)
        and ``mutual_info (B, X, Y, Z)`` (normalised like the entropy).
    """
    _check_passes(passes, max_batch)
    with enable_mc_dropout(model, passes > 1), torch.no_grad():
        return _summaries(*_mean_probs_and_pass_entropy(model, x, passes, max_batch))


def mc_sliding_window(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], passes: int,
                      sw_batch_size: int = 1, overlap: float = 0.5, mode: str = "gaussian",
                      max_batch: int | None = None) -> dict[str, torch.Tensor]:
    """Monte-Carlo dropout prediction of whole volumes with MONAI sliding-window inference.

    Each window batch gets ``passes`` stochastic passes; the predictor returns
    ``[mean probs (K channels), mutual information (1 channel)]`` so MONAI stitches both with
    its blending weights. The entropy is then computed from the stitched mean probabilities.
    Sides of ``image`` need not be divisible by 16 (MONAI pads), but ``roi_size`` must be.
    Memory: the stitched output ``(B, K+1, X, Y, Z)`` plus one chunk of at most ``max_batch``
    window samples at a time.

    Args:
        model: segmentation network returning logits; on ``image``'s device.
        image: ``(B, C, X, Y, Z)``.
        roi_size: window ``(x, y, z)``, each divisible by 16.
        passes: ``T``; ``1`` means dropout off (plain prediction).
        sw_batch_size: windows per predictor call (each becomes ``T`` samples).
        overlap: window overlap fraction, as in MONAI.
        mode: MONAI blending, ``"gaussian"`` or ``"constant"``.
        max_batch: most samples per forward call (``None``: ``T · sw_batch_size``).

    Returns:
        The :func:`mc_predict` dict, with spatial size ``(X, Y, Z)`` of ``image``.
    """
    _check_passes(passes, max_batch)
    roi_size = tuple(int(side) for side in roi_size)
    if len(roi_size) != 3 or any(side < 1 or side % SIZE_DIVISOR for side in roi_size):
        raise ValueError(f"roi_size must be 3 positive sides divisible by {SIZE_DIVISOR}, got {roi_size}")
    if image.ndim != 5:
        raise ValueError(f"image must be (B, C, X, Y, Z), got shape {tuple(image.shape)}")

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        summary = _summaries(*_mean_probs_and_pass_entropy(model, windows, passes, max_batch))
        return torch.cat([summary["mean_probs"], summary["mutual_info"].unsqueeze(1)], dim=1)

    with enable_mc_dropout(model, passes > 1), torch.no_grad():
        stitched = sliding_window_inference(image, roi_size, sw_batch_size, predictor,
                                            overlap=overlap, mode=mode)
    if isinstance(stitched, MetaTensor):
        stitched = stitched.as_tensor()
    mean_probs = stitched[:, :-1]
    # Blending is a convex combination, so this only removes rounding drift.
    mean_probs = mean_probs / mean_probs.sum(dim=1, keepdim=True).clamp_min(_EPS)
    entropy = normalised_entropy(mean_probs, dim=1)
    return {
        "mean_probs": mean_probs,
        "label": mean_probs.argmax(dim=1),
        "entropy": entropy,
        "mutual_info": stitched[:, -1].clamp(0.0, 1.0),
    }


def brain_mask_from_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Brain mask of an image ``(C, X, Y, Z)``: voxels where any modality is nonzero.

    Use it on the image before z-scoring (or after a z-score that keeps background at 0).
    """
    return np.any(_to_numpy(image) != 0, axis=0)


def _to_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def confidence_region(uncertainty: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
                      brain_mask: torch.Tensor | np.ndarray, margin: int) -> np.ndarray:
    """The voxels :func:`image_confidence` averages over, ``R``.

    ``R = dilate(label > 0, margin) ∪ {v ∈ brain : u_v > median_brain(u)}``.
    The dilation is ``margin`` iterations of the full 3x3x3 cube (26-connectivity), i.e. every
    voxel within Chebyshev distance ``margin`` of the predicted tumour: a (2·margin+1)^3 cube
    around a single tumour voxel. It is not restricted to the brain. ``margin = 0`` is the
    tumour itself. "Above the median" is strict, so at most half the brain enters that way.

    Args:
        uncertainty: ``u``, ``(X, Y, Z)``.
        label: predicted label map ``(X, Y, Z)``, 0 background.
        brain_mask: ``(X, Y, Z)`` bool.
        margin: dilation in voxels, ``>= 0``.

    Returns:
        ``(X, Y, Z)`` bool.
    """
    uncertainty, label, brain = _to_numpy(uncertainty), _to_numpy(label), _to_numpy(brain_mask).astype(bool)
    if not uncertainty.shape == label.shape == brain.shape or uncertainty.ndim != 3:
        raise ValueError(
            f"uncertainty, label and brain_mask must share one 3D shape, got {uncertainty.shape}, "
            f"{label.shape}, {brain.shape}"
        )
    if not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 voxels, got {margin!r}")
    tumour = label > 0
    if margin > 0 and tumour.any():
        # iterations=0 would mean "until nothing changes" in scipy, hence the guard above.
        cube = ndimage.generate_binary_structure(3, 3)
        tumour = ndimage.binary_dilation(tumour, structure=cube, iterations=int(margin))
    above_median = np.zeros_like(brain)
    if brain.any():
        above_median = brain & (uncertainty > np.median(uncertainty[brain]))
    return tumour | above_median


def image_confidence(uncertainty: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
                     brain_mask: torch.Tensor | np.ndarray, margin: int) -> float:
    """Image-level confidence ``C = 1 − mean_{v ∈ R} u_v`` (region: :func:`confidence_region`).

    If ``R`` is empty (no tumour predicted and no brain voxel strictly above the median, e.g.
    a constant map), ``C = 1 − mean of u over the brain``; if the brain mask is empty too,
    ``C = 1.0``.

    Args:
        uncertainty: ``u`` ``(X, Y, Z)`` in [0, 1], e.g. the normalised entropy.
        label: predicted label map ``(X, Y, Z)``.
        brain_mask: ``(X, Y, Z)`` bool, see :func:`brain_mask_from_image`.
        margin: tumour dilation in voxels.

    Returns:
        ``C`` in [0, 1]; higher is more confident. Scans are ranked by it, descending.
    """
    region = confidence_region(uncertainty, label, brain_mask, margin)
    uncertainty = _to_numpy(uncertainty).astype(np.float64)
    if region.any():
        return float(1.0 - uncertainty[region].mean())
    brain = _to_numpy(brain_mask).astype(bool)
    if brain.any():
        return float(1.0 - uncertainty[brain].mean())
    return 1.0
