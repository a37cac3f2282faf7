"""Tests of TransASPP-UNet: shapes, input checks, presets, gradient flow, position embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raysemi.model import PRESETS, TransASPPUNet, build_model
from raysemi.model.blocks import ASPP3D, TransformerBottleneck


@pytest.fixture(scope="module")
def tiny_model() -> TransASPPUNet:
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.mark.parametrize("spatial", [(32, 32, 32), (32, 48, 64)], ids=["cubic", "non_cubic"])
def test_output_is_four_class_logits_of_input_size(tiny_model: TransASPPUNet, spatial: tuple[int, int, int]) -> None:
    x = torch.randn(1, 4, *spatial)
    with torch.no_grad():
        logits = tiny_model(x)
    assert logits.shape == (1, 4, *spatial)
    assert torch.isfinite(logits).all()


def test_batch_items_are_independent_in_eval(tiny_model: TransASPPUNet) -> None:
    # Instance norm and attention act per sample: an item's output does not depend on its batch mates.
    x = torch.randn(2, 4, 32, 32, 32)
    with torch.no_grad():
        together = tiny_model(x)
        alone = tiny_model(x[1:])
    torch.testing.assert_close(together[1:], alone, rtol=1e-4, atol=1e-5)


def test_position_embedding_adapts_to_token_grid() -> None:
    bottleneck = TransformerBottleneck(channels=8, layers=1, heads=2, dropout=0.0, pos_grid=(4, 4, 4))
    assert bottleneck.position_embedding((4, 4, 4)) is bottleneck.position
    with torch.no_grad():
        bottleneck.position.fill_(0.5)
        # Trilinear interpolation of a constant field is that constant, on any grid.
        resized = bottleneck.position_embedding((2, 3, 6))
    assert resized.shape == (1, 8, 2, 3, 6)
    torch.testing.assert_close(resized, torch.full((1, 8, 2, 3, 6), 0.5))
    assert bottleneck(torch.randn(2, 8, 2, 3, 6)).shape == (2, 8, 2, 3, 6)


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 32, 32, 40), (1, 4, 24, 32, 32), (1, 3, 32, 32, 32), (4, 32, 32, 32)],
    ids=["z_not_divisible", "x_not_divisible", "wrong_channels", "no_batch_axis"],
)
def test_bad_input_shape_raises_naming_it(tiny_model: TransASPPUNet, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        tiny_model(torch.zeros(shape))


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(1)
    model = build_model("tiny", dropout=0.0).train()
    x = torch.randn(2, 4, 32, 32, 32)
    target = torch.randint(0, 4, (2, 32, 32, 32))
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    without_gradient = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_gradient == []
    # A parameter whose path is cancelled (e.g. by a normalisation) still gets rounding noise of
    # ~1e-13; live ones here get at least ~1e-6, so 1e-9 separates the two.
    cut_off = [name for name, p in model.named_parameters() if not p.grad.abs().max() > 1e-9]
    assert cut_off == []


def test_aspp_global_pooling_branch_changes_the_output() -> None:
    # If the fusion normalised each channel over space, the constant pooled branch would vanish.
    torch.manual_seed(2)
    aspp = ASPP3D(4, 4, dilations=(1, 2, 3)).eval()
    x = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        before = aspp(x)
        aspp.global_pool[1].bias.add_(1.0)
        after = aspp(x)
    assert not torch.allclose(before, after)


def test_presets_and_overrides() -> None:
    assert set(PRESETS) == {"tiny", "base"}
    model = build_model("tiny", dropout=0.3, transformer_layers=2)
    assert model.channels == PRESETS["tiny"]["channels"]
    assert len(model.transformer.encoder.layers) == 2
    dropout_probabilities = {m.p for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout3d))}
    assert dropout_probabilities == {0.3}


def test_base_preset_builds_with_expected_widths() -> None:
    model = build_model("base")
    assert model.channels == (32, 64, 128, 256, 320)
    assert len(model.transformer.encoder.layers) == 4
    assert model.transformer.encoder.layers[0].self_attn.num_heads == 8


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"huge.*base.*tiny"):
        build_model("huge")


@pytest.mark.parametrize(
    "kwargs",
    [dict(channels=(8, 16, 32, 64)), dict(transformer_heads=3), dict(dropout=1.0), dict(dilations=(1, 0, 2))],
    ids=["four_levels", "heads_do_not_divide_width", "dropout_one", "zero_dilation"],
)
def test_bad_constructor_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TransASPPUNet(**kwargs)
