"""TransASPP-UNet: a 3D residual U-Net whose bottleneck is ASPP-3D followed by a Transformer.

Diagram (``channels = (c0, c1, c2, c3, c4)``, input sides divisible by 16)::

    x (B, 4, X, Y, Z)
    encode:     c0 @ 1  ->  c1 @ 1/2  ->  c2 @ 1/4  ->  c3 @ 1/8  ->  c4 @ 1/16   (the skips)
    bottleneck: ASPP-3D -> Dropout3d -> L x pre-norm Transformer layers (voxels as tokens)
    decode:     up + skip c3 -> up + skip c2 -> up + skip c1 -> up + skip c0 -> 1x1x1 conv
    logits (B, 4, X, Y, Z)

Dropout sits in the bottleneck (after ASPP and inside the Transformer) and after every decoder
stage, so Monte-Carlo dropout (:mod:`raysemi.semi.uncertainty`) yields per-voxel uncertainty.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from raysemi.model.blocks import ASPP3D, ResidualBlock, TransformerBottleneck, UpBlock

#: Each side of the input must be a multiple of this (four stride-2 downsamplings).
SIZE_DIVISOR = 16


class TransASPPUNet(nn.Module):
    """3D U-Net with an ASPP + Transformer bottleneck for 4-class brain-tumour segmentation.

    Args:
        in_channels: input modalities (t1, t1ce, t2, flair).
        out_channels: classes (0 background, 1 NCR/NET, 2 ED, 3 ET); the output is logits.
        channels: feature widths of the 5 resolution levels, full resolution first.
        dilations: dilations of the three ASPP atrous branches.
        transformer_layers: number of Transformer encoder layers in the bottleneck.
        transformer_heads: attention heads; must divide ``channels[-1]``.
        dropout: dropout probability in the bottleneck and decoder.
        pos_grid: bottleneck token grid the position embedding is stored for; usually the
            training patch size / 16. Other grids are served by interpolation.

    Shapes:
        ``(B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z)``, X, Y, Z divisible by 16.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        channels: Sequence[int] = (8, 16, 32, 48, 64),
        dilations: Sequence[int] = (1, 2, 3),
        transformer_layers: int = 1,
        transformer_heads: int = 2,
        dropout: float = 0.1,
        pos_grid: Sequence[int] = (4, 4, 4),
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be 5 positive ints (one per resolution level), got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels

        self.down_layers = self._make_down_layers(in_channels, channels)
        self.aspp = ASPP3D(channels[-1], channels[-1], dilations)
        self.bottleneck_dropout = nn.Dropout3d(dropout)
        self.transformer = TransformerBottleneck(channels[-1], transformer_layers, transformer_heads,
                                                 dropout, pos_grid)
        self.up_layers = nn.ModuleList(
            UpBlock(coarse, fine, dropout) for coarse, fine in zip(channels[:0:-1], channels[-2::-1])
        )
        self.head = nn.Conv3d(channels[0], out_channels, kernel_size=1)

    @staticmethod
    def _make_down_layers(in_channels: int, channels: tuple[int, ...]) -> nn.ModuleList:
        # Level 0 keeps full resolution; each further level halves every side.
        layers = [ResidualBlock(in_channels, channels[0])]
        layers += [ResidualBlock(channels[i - 1], channels[i], stride=2) for i in range(1, len(channels))]
        return nn.ModuleList(layers)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the shape if ``x`` is not ``(B, in_channels, X, Y, Z)``
        with every side divisible by 16."""
        shape = tuple(x.shape)
        if x.ndim != 5 or shape[1] != self.in_channels:
            raise ValueError(
                f"TransASPPUNet expects input (B, {self.in_channels}, X, Y, Z), got shape {shape}"
            )
        if any(side % SIZE_DIVISOR for side in shape[2:]):
            raise ValueError(
                f"TransASPPUNet input sides must be divisible by {SIZE_DIVISOR} "
                f"(four 2x downsamplings), got shape {shape}; pad or crop, or use sliding-window "
                f"inference with a divisible roi_size"
            )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of all 5 levels, full resolution first; the last one is the deepest."""
        skips = []
        for layer in self.down_layers:
            x = layer(x)
            skips.append(x)
        return skips

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """ASPP-3D, dropout, then the Transformer over the bottleneck voxels."""
        return self.transformer(self.bottleneck_dropout(self.aspp(x)))

    def decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Upsample through the skips (deepest first, the bottleneck level excluded) to logits."""
        for up, skip in zip(self.up_layers, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(x)

    def forward_from_skips(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """Bottleneck and decoder on the encoder's features: the part of :meth:`forward` that holds dropout.

        The encoder has no dropout, so Monte-Carlo dropout can encode a window once and run only
        this part per pass (:func:`raysemi.semi.uncertainty.mc_predict`).
        """
        return self.decode(self.bottleneck(skips[-1]), skips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_from_skips(self.encode(x))


#: Named model sizes. ``tiny``: CPU tests and demos (a 64^3 patch in well under a second on
#: 2 cores). ``base``: GPU training on 128^3 patches (bottleneck grid 8^3 = 512 tokens).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=(8, 16, 32, 48, 64), dilations=(1, 2, 3), transformer_layers=1,
                 transformer_heads=2, dropout=0.1, pos_grid=(4, 4, 4)),
    "base": dict(channels=(32, 64, 128, 256, 320), dilations=(1, 2, 3), transformer_layers=4,
                 transformer_heads=8, dropout=0.1, pos_grid=(8, 8, 8)),
}


def build_model(preset: str, **overrides: Any) -> TransASPPUNet:
    """Build a :class:`TransASPPUNet` from a named preset, with keyword overrides.

    Args:
        preset: a key of :data:`PRESETS`.
        **overrides: constructor arguments replacing the preset's (e.g. ``dropout=0.2``).

    Raises:
        ValueError: unknown preset (the message lists the known ones).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {sorted(PRESETS)}")
    return TransASPPUNet(**{**PRESETS[preset], **overrides})
