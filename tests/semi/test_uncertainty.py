"""Tests of MC-dropout uncertainty: entropy, mutual information, batched passes, sliding window,
image-level confidence. Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raysemi.model import build_model
from raysemi.semi.uncertainty import (
    brain_mask_from_image,
    confidence_region,
    enable_mc_dropout,
    image_confidence,
    mc_dropout_probs,
    mc_predict,
    mc_sliding_window,
    mutual_information,
    normalised_entropy,
)


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # Larger dropout than the preset so that passes visibly differ.
    return build_model("tiny", dropout=0.3)


class PointwiseModel(nn.Module):
    """Deterministic toy: a fixed 1x1x1 conv, so each voxel's logits depend only on that voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 4, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(16, dtype=torch.float32).reshape(4, 4, 1, 1, 1) / 10 - 0.8)
            self.conv.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ---------------------------------------------------------------- entropy and mutual information

def test_entropy_of_uniform_is_one_and_of_one_hot_is_zero() -> None:
    uniform = torch.full((2, 4, 3, 3, 3), 0.25)
    one_hot = torch.zeros(2, 4, 3, 3, 3)
    one_hot[:, 2] = 1.0
    torch.testing.assert_close(normalised_entropy(uniform), torch.ones(2, 3, 3, 3))
    torch.testing.assert_close(normalised_entropy(one_hot), torch.zeros(2, 3, 3, 3))


@pytest.mark.parametrize(
    "probs, expected",
    [
        # -(0.25 log2 0.25 + 0.75 log2 0.75) = 0.5 + 0.75 * log2(4/3) = 0.5 + 0.75 * 0.4150375
        ([0.25, 0.75], 0.8112781),
        # two of three classes at 0.5: log 2 / log 3; the zero class contributes nothing
        ([0.5, 0.5, 0.0], math.log(2) / math.log(3)),
    ],
    ids=["two_classes", "three_classes_one_empty"],
)
def test_entropy_hand_values(probs: list[float], expected: float) -> None:
    tensor = torch.tensor(probs).reshape(1, -1, 1, 1, 1)
    assert normalised_entropy(tensor).item() == pytest.approx(expected, abs=1e-6)


def test_entropy_along_another_axis() -> None:
    channel_last = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    torch.testing.assert_close(normalised_entropy(channel_last, dim=-1), torch.tensor([0.8112781, 0.0]))


def test_entropy_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        normalised_entropy(torch.ones(1, 1, 2, 2, 2))


def test_mutual_information_is_zero_for_identical_passes() -> None:
    single = torch.softmax(torch.randn(1, 2, 4, 3, 3, 3), dim=2)
    identical = single.expand(5, -1, -1, -1, -1, -1)
    torch.testing.assert_close(mutual_information(identical), torch.zeros(2, 3, 3, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "first_pass, second_pass, expected",
    [
        # mean (0.5, 0.5): H = 1; each pass one-hot: H = 0 -> MI = 1
        ([1.0, 0.0], [0.0, 1.0], 1.0),
        # mean (0.75, 0.25): H = 0.8112781; pass entropies 1 and 0 -> mean 0.5 -> MI = 0.3112781
        ([0.5, 0.5], [1.0, 0.0], 0.3112781),
    ],
    ids=["opposite_one_hots", "flat_and_one_hot"],
)
def test_mutual_information_hand_values(first_pass: list[float], second_pass: list[float], expected: float) -> None:
    pass_probs = torch.tensor([first_pass, second_pass]).reshape(2, 1, 2, 1)  # (T, B, K, X)
    assert mutual_information(pass_probs).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- MC-dropout mode and passes

def test_enable_mc_dropout_switches_only_dropout_and_restores_modes(tiny_model: nn.Module) -> None:
    tiny_model.train()
    with enable_mc_dropout(tiny_model):
        assert not tiny_model.training
        dropouts = [m for m in tiny_model.modules() if isinstance(m, (nn.Dropout, nn.Dropout3d))]
        norms = [m for m in tiny_model.modules() if isinstance(m, nn.InstanceNorm3d)]
        assert dropouts and all(m.training for m in dropouts)
        assert norms and not any(m.training for m in norms)
    assert all(m.training for m in tiny_model.modules())


def test_enable_mc_dropout_as_plain_call_keeps_the_modes(tiny_model: nn.Module) -> None:
    enable_mc_dropout(tiny_model)
    assert not tiny_model.training
    assert all(m.training for m in tiny_model.modules() if isinstance(m, nn.Dropout3d))
    tiny_model.eval()


def test_passes_differ_with_dropout_and_agree_without(tiny_model: nn.Module) -> None:
    x = torch.randn(1, 4, 32, 32, 32)
    stochastic = mc_dropout_probs(tiny_model, x, passes=3, dropout=True)
    deterministic = mc_dropout_probs(tiny_model, x, passes=3, dropout=False)
    assert stochastic.shape == deterministic.shape == (3, 1, 4, 32, 32, 32)
    assert (stochastic[0] - stochastic[1]).abs().max() > 1e-3
    torch.testing.assert_close(deterministic[1], deterministic[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(deterministic[2], deterministic[0], rtol=0, atol=1e-6)


def test_batched_passes_equal_sequential_passes_without_dropout(tiny_model: nn.Module) -> None:
    x = torch.randn(2, 4, 32, 32, 32)
    batched = mc_dropout_probs(tiny_model, x, passes=3, max_batch=None, dropout=False)
    tiny_model.eval()
    with torch.no_grad():
        sequential = torch.stack([torch.softmax(tiny_model(x), dim=1) for _ in range(3)])
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_batch", [1, 3, 4, None], ids=["one", "three", "T", "all"])
def test_chunking_does_not_change_the_passes(max_batch: int | None) -> None:
    model = PointwiseModel()
    x = torch.randn(2, 4, 5, 6, 7)
    with torch.no_grad():
        direct = torch.softmax(model(x), dim=1)
    passes = mc_dropout_probs(model, x, passes=4, max_batch=max_batch)
    assert passes.shape == (4, 2, 4, 5, 6, 7)
    torch.testing.assert_close(passes, direct.expand(4, -1, -1, -1, -1, -1), rtol=1e-6, atol=1e-7)


def test_chunks_never_exceed_max_batch() -> None:
    model = PointwiseModel()
    seen_batch_sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen_batch_sizes.append(args[0].shape[0]))
    mc_dropout_probs(model, torch.randn(2, 4, 2, 2, 2), passes=4, max_batch=3)
    assert seen_batch_sizes == [3, 3, 2]  # 8 samples in chunks of at most 3


def test_mc_passes_share_one_encoder_run_and_keep_their_own_dropout(tiny_model: nn.Module) -> None:
    # The encoder has no dropout, so T passes of B windows encode the B windows once; the
    # bottleneck and decoder run for all T·B samples, each with its own dropout masks.
    encoder_batches: list[int] = []
    decoder_batches: list[int] = []
    hooks = [
        tiny_model.down_layers[0].register_forward_pre_hook(lambda m, a: encoder_batches.append(a[0].shape[0])),
        tiny_model.head.register_forward_pre_hook(lambda m, a: decoder_batches.append(a[0].shape[0])),
    ]
    try:
        x = torch.randn(2, 4, 32, 32, 32)
        passes = mc_dropout_probs(tiny_model, x, passes=4, max_batch=3)
    finally:
        for hook in hooks:
            hook.remove()
    assert encoder_batches == [2]
    assert decoder_batches == [3, 3, 2]
    # Passes of the same window differ (own masks); deterministic passes equal the plain forward.
    assert (passes[0, 0] - passes[1, 0]).abs().max() > 1e-3
    tiny_model.eval()
    with torch.no_grad():
        plain = torch.softmax(tiny_model(x), dim=1)
    torch.testing.assert_close(mc_dropout_probs(tiny_model, x, passes=4, dropout=False)[3], plain, rtol=1e-4, atol=1e-5)


def test_a_model_with_encoder_dropout_runs_whole_passes() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", dropout=0.3)
    model.down_layers[0] = nn.Sequential(model.down_layers[0], nn.Dropout3d(0.3))
    encoder_batches: list[int] = []
    model.down_layers[0].register_forward_pre_hook(lambda m, a: encoder_batches.append(a[0].shape[0]))
    mc_dropout_probs(model, torch.randn(2, 4, 32, 32, 32), passes=4, max_batch=3)
    assert encoder_batches == [3, 3, 2]  # the encoder is stochastic now: it runs in every pass


def test_mc_predict_matches_the_per_pass_formulas(tiny_model: nn.Module) -> None:
    x = torch.randn(2, 4, 32, 32, 32)
    torch.manual_seed(7)
    pass_probs = mc_dropout_probs(tiny_model, x, passes=4, max_batch=3)
    torch.manual_seed(7)  # same chunks in the same order -> same dropout masks
    result = mc_predict(tiny_model, x, passes=4, max_batch=3)
    mean_probs = pass_probs.mean(0)
    torch.testing.assert_close(result["mean_probs"], mean_probs)
    assert torch.equal(result["label"], mean_probs.argmax(1))
    torch.testing.assert_close(result["entropy"], normalised_entropy(mean_probs))
    torch.testing.assert_close(result["mutual_info"], mutual_information(pass_probs), rtol=0, atol=1e-5)
    assert result["mutual_info"].max() > 0


def test_single_pass_is_the_plain_prediction(tiny_model: nn.Module) -> None:
    tiny_model.train()
    x = torch.randn(1, 4, 32, 32, 32)
    result = mc_predict(tiny_model, x, passes=1)
    assert tiny_model.training  # mode restored
    tiny_model.eval()
    with torch.no_grad():
        plain = torch.softmax(tiny_model(x), dim=1)
    torch.testing.assert_close(result["mean_probs"], plain)
    torch.testing.assert_close(result["mutual_info"], torch.zeros(1, 32, 32, 32))


@pytest.mark.parametrize("passes, max_batch", [(0, None), (2, 0)], ids=["zero_passes", "zero_max_batch"])
def test_bad_pass_arguments_raise(passes: int, max_batch: int | None) -> None:
    with pytest.raises(ValueError):
        mc_predict(PointwiseModel(), torch.zeros(1, 4, 2, 2, 2), passes=passes, max_batch=max_batch)


# ---------------------------------------------------------------- sliding window

def test_sliding_window_mc_shapes_and_probabilities(tiny_model: nn.Module) -> None:
    image = torch.randn(1, 4, 40, 36, 28)
    result = mc_sliding_window(tiny_model, image, roi_size=(32, 32, 32), passes=2, sw_batch_size=2, max_batch=3)
    assert result["mean_probs"].shape == (1, 4, 40, 36, 28)
    for key in ("label", "entropy", "mutual_info"):
        assert result[key].shape == (1, 40, 36, 28), key
    torch.testing.assert_close(result["mean_probs"].sum(1), torch.ones(1, 40, 36, 28))
    assert torch.equal(result["label"], result["mean_probs"].argmax(1))
    assert 0 <= result["entropy"].min() and result["entropy"].max() <= 1
    assert result["mutual_info"].min() >= 0 and result["mutual_info"].max() > 0


def test_sliding_window_of_a_pointwise_model_equals_direct_prediction() -> None:
    # Each voxel sees only itself, so any blend of windows must give the direct softmax.
    model = PointwiseModel()
    image = torch.randn(1, 4, 40, 36, 28)
    result = mc_sliding_window(model, image, roi_size=(16, 32, 16), passes=1, overlap=0.5)
    with torch.no_grad():
        direct = torch.softmax(model(image), dim=1)
    torch.testing.assert_close(result["mean_probs"], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["entropy"], normalised_entropy(direct), rtol=1e-5, atol=1e-5)
    assert result["mutual_info"].abs().max() < 1e-6


def test_sliding_window_roi_must_be_divisible_by_16() -> None:
    with pytest.raises(ValueError, match=r"roi_size.*\(32, 24, 32\)"):
        mc_sliding_window(PointwiseModel(), torch.zeros(1, 4, 40, 36, 28), roi_size=(32, 24, 32), passes=1)


# ---------------------------------------------------------------- image-level confidence

def _centre_tumour_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5^3 brain, u = 0.1 everywhere except the tumour voxel (centre, 0.5) and a corner (0.9)."""
    uncertainty = np.full((5, 5, 5), 0.1)
    uncertainty[2, 2, 2] = 0.5
    uncertainty[0, 0, 0] = 0.9
    label = np.zeros((5, 5, 5), dtype=np.int64)
    label[2, 2, 2] = 3
    return uncertainty, label, np.ones((5, 5, 5), dtype=bool)


@pytest.mark.parametrize(
    "margin, region_size, expected_confidence",
    [
        # R = {centre, corner}; the corner is the only brain voxel above the median 0.1
        (0, 2, 1 - (0.5 + 0.9) / 2),
        # 3^3 cube around the centre + corner: (26 * 0.1 + 0.5 + 0.9) / 28 = 4 / 28
        (1, 28, 1 - 4 / 28),
        # 5^3 cube = the whole volume: (123 * 0.1 + 1.4) / 125
        (2, 125, 1 - 13.7 / 125),
    ],
    ids=["margin0", "margin1_cube", "margin2_everything"],
)
def test_confidence_hand_example(margin: int, region_size: int, expected_confidence: float) -> None:
    uncertainty, label, brain = _centre_tumour_volume()
    assert confidence_region(uncertainty, label, brain, margin).sum() == region_size
    assert image_confidence(uncertainty, label, brain, margin) == pytest.approx(expected_confidence)


def test_confidence_region_median_rule_on_a_line() -> None:
    # A (1, 1, 9) volume is a line: the cube dilation reaches `margin` voxels along z.
    uncertainty = np.array([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.95, 0.99]).reshape(1, 1, 9)
    label = np.zeros((1, 1, 9), dtype=np.int64)
    label[0, 0, 1] = 1
    brain = np.zeros((1, 1, 9), dtype=bool)
    brain[0, 0, :7] = True
    # Dilated tumour: z = 0..3. Brain median of (0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6) = 0.4;
    # strictly above: z = 1, 5, 6. z = 4 equals the median; z = 7, 8 are outside the brain.
    region = confidence_region(uncertainty, label, brain, margin=2)
    assert region.ravel().tolist() == [True, True, True, True, False, True, True, False, False]
    expected = 1 - (0.1 + 0.9 + 0.2 + 0.3 + 0.5 + 0.6) / 6
    assert image_confidence(uncertainty, label, brain, margin=2) == pytest.approx(expected)


def test_confidence_accepts_torch_tensors() -> None:
    uncertainty, label, brain = _centre_tumour_volume()
    value = image_confidence(torch.from_numpy(uncertainty).float(), torch.from_numpy(label),
                             torch.from_numpy(brain), margin=1)
    assert value == pytest.approx(1 - 4 / 28, abs=1e-6)


def test_clean_scan_ranks_above_noisy_scan() -> None:
    brain = np.zeros((16, 16, 16), dtype=bool)
    brain[2:14, 2:14, 2:14] = True
    label = np.zeros((16, 16, 16), dtype=np.int64)
    label[6:10, 6:10, 6:10] = 2
    clean = np.where(brain, 0.02, 0.0)
    clean[5:11, 5:11, 5:11] = 0.2  # a thin uncertain rim around the tumour
    noisy = clean.copy()
    noisy[2:14:2, 2:14:3, 2:14] = 0.7  # scattered uncertain voxels all over the brain
    clean_confidence = image_confidence(clean, label, brain, margin=1)
    noisy_confidence = image_confidence(noisy, label, brain, margin=1)
    assert 0 <= noisy_confidence < clean_confidence <= 1


@pytest.mark.parametrize(
    "brain_voxels, tumour, expected",
    [
        ("all", False, 1 - 0.2),  # constant u: nobody above the median, no tumour -> brain mean
        ("none", False, 1.0),  # nothing to average at all
        ("none", True, 1 - 0.2),  # no brain, but the dilated tumour is a region
    ],
    ids=["constant_map", "empty_brain", "tumour_without_brain"],
)
def test_confidence_fallbacks(brain_voxels: str, tumour: bool, expected: float) -> None:
    uncertainty = np.full((4, 4, 4), 0.2)
    label = np.zeros((4, 4, 4), dtype=np.int64)
    if tumour:
        label[1, 1, 1] = 1
    brain = np.full((4, 4, 4), brain_voxels == "all")
    assert image_confidence(uncertainty, label, brain, margin=1) == pytest.approx(expected)


@pytest.mark.parametrize(
    "label_shape, margin, message",
    [((4, 4, 5), 1, "share one 3D shape"), ((4, 4, 4), -1, "margin")],
    ids=["shape_mismatch", "negative_margin"],
)
def test_confidence_bad_input_raises(label_shape: tuple[int, ...], margin: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_confidence(np.zeros((4, 4, 4)), np.zeros(label_shape), np.ones((4, 4, 4), bool), margin)


def test_brain_mask_is_any_modality_nonzero() -> None:
    image = np.zeros((4, 2, 2, 1), dtype=np.float32)
    image[0, 0, 0, 0] = 1.0
    image[3, 1, 1, 0] = -0.5
    assert brain_mask_from_image(image)[..., 0].tolist() == [[True, False], [False, True]]
