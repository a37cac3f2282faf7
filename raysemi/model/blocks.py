"""Building blocks of TransASPP-UNet: residual conv block, ASPP-3D, Transformer bottleneck.

All blocks take and return feature maps shaped ``(B, C, X, Y, Z)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_NEGATIVE_SLOPE = 0.01


def _conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                   dilation: int = 1) -> nn.Sequential:
    """3D conv (padding keeps the size at stride 1) -> InstanceNorm -> LeakyReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        # No conv bias: instance norm removes it anyway.
        nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                  dilation=dilation, bias=False),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(_NEGATIVE_SLOPE, inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two (conv3x3x3 - InstanceNorm - LeakyReLU) layers plus a skip connection.

    The skip is the identity when shapes match, otherwise a 1x1x1 conv (with the block's stride)
    followed by instance norm, so that a block can also downsample (``stride=2``).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first conv and of the projection skip; 2 halves every side.

    Shapes:
        ``(B, in_channels, X, Y, Z) -> (B, out_channels, X/stride, Y/stride, Z/stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(in_channels, out_channels, stride=stride)
        self.conv2 = _conv_norm_act(out_channels, out_channels)
        if in_channels == out_channels and stride == 1:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.InstanceNorm3d(out_channels, affine=True),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + self.skip(x)


class ASPP3D(nn.Module):
    """Atrous spatial pyramid pooling in 3D (DeepLabv3 style).

    Parallel branches see the input at different context sizes: a 1x1x1 conv, one 3x3x3
    atrous conv per dilation, and a global-average-pooling branch broadcast back to the grid.
    Their concatenation is fused by a 1x1x1 conv.

    Args:
        in_channels: channels of the input.
        out_channels: channels of every branch and of the output.
        dilations: dilation of each 3x3x3 atrous branch (three in the method). At the bottleneck
            the grid is small (4^3 for a 64^3 patch, 8^3 for 128^3), so dilations much larger
            than the grid side mostly see zero padding.

    Shapes:
        ``(B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z)``.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"ASPP3D dilations must be positive integers, got {tuple(dilations)}")
        self.pointwise = _conv_norm_act(in_channels, out_channels, kernel_size=1)
        self.atrous = nn.ModuleList(
            _conv_norm_act(in_channels, out_channels, kernel_size=3, dilation=int(d)) for d in dilations
        )
        # No instance norm here: on a 1x1x1 map it would zero every channel.
        self.global_pool = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(in_channels, out_channels, 1),
            nn.LeakyReLU(_NEGATIVE_SLOPE, inplace=True),
        )
        # The fusion is not instance-normalised: instance norm subtracts each channel's spatial
        # mean, which would erase the spatially constant global-pooling branch (its weights
        # would get no gradient). Every branch is normalised already.
        self.fuse = nn.Sequential(
            nn.Conv3d(out_channels * (len(dilations) + 2), out_channels, 1),
            nn.LeakyReLU(_NEGATIVE_SLOPE, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.global_pool(x).expand(-1, -1, *x.shape[2:])
        branches = [self.pointwise(x), *(conv(x) for conv in self.atrous), pooled]
        return self.fuse(torch.cat(branches, dim=1))


class TransformerBottleneck(nn.Module):
    """Pre-norm Transformer encoder over the voxels of a feature map, used as tokens.

    A learned position embedding is stored for a reference token grid ``pos_grid`` and
    trilinearly resized to the grid of the actual input, so that the same weights serve
    patches of any size (and non-cubic ones) without retraining.

    Args:
        channels: feature channels = token width; must be divisible by ``heads``.
        layers: number of ``nn.TransformerEncoderLayer`` (pre-norm, batch-first).
        heads: attention heads per layer.
        dropout: dropout inside attention and the feed-forward part (kept on for MC dropout).
        pos_grid: token grid ``(X, Y, Z)`` the position embedding is stored for.

    Shapes:
        ``(B, channels, X, Y, Z) -> (B, channels, X, Y, Z)``.
    """

    def __init__(self, channels: int, layers: int, heads: int, dropout: float,
                 pos_grid: Sequence[int]) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"transformer_layers must be >= 1, got {layers}")
        if heads < 1 or channels % heads != 0:
            raise ValueError(
                f"transformer_heads={heads} must divide the bottleneck channels ({channels})"
            )
        if len(pos_grid) != 3 or any(int(s) < 1 for s in pos_grid):
            raise ValueError(f"pos_grid must be three positive ints (X, Y, Z), got {tuple(pos_grid)}")
        self.position = nn.Parameter(torch.zeros(1, channels, *(int(s) for s in pos_grid)))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=channels, nhead=heads, dim_feedforward=4 * channels, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # Pre-norm layers leave the residual stream unnormalised, hence the final LayerNorm.
        # Nested tensors only help with padding masks, which we never use.
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, norm=nn.LayerNorm(channels),
                                             enable_nested_tensor=False)

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embedding ``(1, C, X, Y, Z)`` for a token grid ``(X, Y, Z)``."""
        if tuple(grid) == tuple(self.position.shape[2:]):
            return self.position
        return F.interpolate(self.position, size=tuple(grid), mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *grid = x.shape
        x = x + self.position_embedding(grid)
        tokens = x.flatten(2).transpose(1, 2)  # (B, X*Y*Z, C)
        tokens = self.encoder(tokens)
        return tokens.transpose(1, 2).reshape(batch, channels, *grid)


class UpBlock(nn.Module):
    """Decoder step: transposed conv x2 upsampling, concatenate the skip, residual block, dropout.

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder skip at the finer level (also the output width).
        dropout: channel dropout probability (``nn.Dropout3d``), kept on for MC dropout.

    Shapes:
        ``(B, in_channels, X, Y, Z), (B, skip_channels, 2X, 2Y, 2Z) -> (B, skip_channels, 2X, 2Y, 2Z)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, dropout: float) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, skip_channels, kernel_size=2, stride=2)
        self.block = ResidualBlock(2 * skip_channels, skip_channels)
        self.dropout = nn.Dropout3d(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.upsample(x), skip], dim=1)
        return self.dropout(self.block(x))
