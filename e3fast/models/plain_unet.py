"""A plain nnU-Net-style 3D U-Net: the non-equivariant baseline of equal width.

Each level is a :class:`PlainBlock` (twice conv -> instance norm -> LeakyReLU); features double
per level; max pooling on the way down, trilinear upsampling plus skip concatenation on the way
up; a 1x1x1 convolution gives the output. It is the comparison network of the benchmarks (the
paper compares its equivariant U-Net against such a network with 30 top-level features and 5^3
kernels), not a model e3fast accelerates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PlainBlock(torch.nn.Sequential):
    """``(Conv3d -> InstanceNorm3d(affine) -> LeakyReLU(0.01))`` twice, 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        layers = []
        for channels_in in (in_channels, out_channels):
            layers += [
                torch.nn.Conv3d(channels_in, out_channels, kernel_size, padding=kernel_size // 2),
                torch.nn.InstanceNorm3d(out_channels, affine=True),
                torch.nn.LeakyReLU(0.01),
            ]
        super().__init__(*layers)


class PlainUNet(torch.nn.Module):
    """nnU-Net-style plain U-Net.

    Parameters
    ----------
    in_channels, out_channels : channels of the input and output volumes.
    features : channels of the top level; doubled at each level below.
    n_downsample : pooling levels (``n_downsample + 1`` blocks down, ``n_downsample`` up).
    kernel_size : odd edge length of the cubic convolution kernels.

    Input ``[batch, in_channels, x, y, z]``; sizes not divisible by ``2 ** n_downsample`` are
    zero-padded at the start of each axis and cropped back, as :class:`EquivariantUNet` does.
    Memory formats are torch's own: a model moved to channels_last_3d
    (``model.to(memory_format=torch.channels_last_3d)``) runs its convolutions in channels_last_3d,
    but torch's ``InstanceNorm3d`` returns contiguous tensors, so the formats alternate layer by
    layer; the output keeps the last convolution's format.
    """

    def __init__(self, in_channels: int, out_channels: int, features: int = 30, n_downsample: int = 3,
                 kernel_size: int = 5):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        if n_downsample < 0:
            raise ValueError(f"n_downsample must be >= 0, got {n_downsample}")
        widths = [features * 2 ** level for level in range(n_downsample + 1)]
        self.n_downsample = n_downsample
        self.down_blocks = torch.nn.ModuleList(
            PlainBlock(channels_in, width, kernel_size)
            for channels_in, width in zip([in_channels] + widths[:-1], widths))
        self.pool = torch.nn.MaxPool3d(2)
        self.upsample = torch.nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)
        self.up_blocks = torch.nn.ModuleList(
            PlainBlock(widths[level + 1] + widths[level], widths[level], kernel_size)
            for level in reversed(range(n_downsample)))
        self.out = torch.nn.Conv3d(widths[0], out_channels, 1)

    @property
    def pooling_factor(self) -> int:
        return 2 ** self.n_downsample

    def _padding(self, spatial_shape) -> list[int]:
        return [(-size) % self.pooling_factor for size in spatial_shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self._padding(x.shape[-3:])
        x = F.pad(x, (pad[2], 0, pad[1], 0, pad[0], 0))
        skips = []
        for level, block in enumerate(self.down_blocks):
            x = block(x)
            if level < self.n_downsample:
                skips.append(x)
                x = self.pool(x)
        for block, skip in zip(self.up_blocks, reversed(skips)):
            x = block(torch.cat([self.upsample(x), skip], dim=1))
        x = self.out(x)
        output_format = torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format
        return x[..., pad[0]:, pad[1]:, pad[2]:].contiguous(memory_format=output_format)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
