"""The equivariant U-Net of Diaz, Geiger and McKinley, on e3fast's fused ops.

Same constructor, defaults, structure and parameter names as e3nn_Unet's
``equivariant_unet_physical_units.UNet``, so its checkpoints load key for key
(:meth:`EquivariantUNet.load_state_dict`). Each level is a :class:`ConvolutionBlock`
(two steerable convolutions, each followed by fused normalization + gate); levels are joined by
norm max pooling (or average pooling) on the way down and trilinear upsampling plus skip
concatenation on the way up. Kernel diameters and voxel sizes double per level, so the kernels
stay 5x5x5 in the paper's configuration.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from e3nn import o3

from e3fast.irreps_layout import check_voxel_input, irreps_channels, parse_irreps
from e3fast.nn import Dropout, Linear, NormGate, NormMaxPool3d, VoxelConvolution

NORMALIZATIONS = {"instance": "instance", "batch": "batch", "None": "none"}


class ConvolutionBlock(torch.nn.Module):
    """conv -> norm + gate -> dropout, twice.

    The fused norm+gate modules are named ``batchnorm1`` / ``batchnorm2`` as e3nn_Unet's
    normalization modules, whose parameters they hold, so checkpoints map key for key.
    """

    def __init__(self, irreps_in, irreps_hidden, activation, irreps_sh, normalization: str, diameter: float,
                 num_radial_basis: int, steps, dropout_prob: float, cutoff):
        super().__init__()
        irreps_hidden = o3.Irreps(irreps_hidden)
        irreps_scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l == 0])
        irreps_gated = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l > 0])
        irreps_gates = o3.Irreps(f"{irreps_gated.num_irreps}x0e").simplify()
        act_gates = [torch.sigmoid] if irreps_gates.dim > 0 else []

        def norm_gate():
            return NormGate(irreps_scalars, activation, irreps_gates, act_gates, irreps_gated,
                            normalization=NORMALIZATIONS[normalization])

        conv = dict(irreps_sh=irreps_sh, diameter=diameter, num_radial_basis=num_radial_basis, steps=steps,
                    cutoff=cutoff)
        self.batchnorm1 = norm_gate()
        self.conv1 = VoxelConvolution(irreps_in, self.batchnorm1.irreps_in, **conv)
        self.dropout1 = Dropout(self.batchnorm1.irreps_out, dropout_prob)
        self.batchnorm2 = norm_gate()
        self.conv2 = VoxelConvolution(self.batchnorm1.irreps_out, self.batchnorm2.irreps_in, **conv)
        self.dropout2 = Dropout(self.batchnorm2.irreps_out, dropout_prob)
        self.irreps_out = self.batchnorm2.irreps_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout1(self.batchnorm1(self.conv1(x)))
        return self.dropout2(self.batchnorm2(self.conv2(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # e3nn_Unet's blocks also hold parameter-free Gate and Dropout modules.
        for key in [k for k in state_dict if k.startswith((prefix + "gate1.", prefix + "gate2."))]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def pooling_kernel_size(scale: float, steps) -> tuple[int, ...]:
    """Voxels per pooling window: ``floor(scale / step)`` where the voxel is smaller than ``scale``."""
    return tuple(math.floor(scale / step) if step < scale else 1 for step in steps)


class AveragePool3d(torch.nn.Module):
    """Plain average pooling (linear, hence equivariant per channel)."""

    def __init__(self, kernel_size):
        super().__init__()
        self.kernel_size = tuple(kernel_size)

    def forward(self, x):
        return F.avg_pool3d(x, self.kernel_size, stride=self.kernel_size)


class Down(torch.nn.Module):
    def __init__(self, n_downsample, activation, irreps_sh, ne, no, normalization, irreps_in, diameters,
                 num_radial_basis, steps, down_op, scales, dropout_prob, cutoff):
        super().__init__()
        blocks, self.down_irreps_out = [], []
        for level in range(n_downsample + 1):
            irreps_hidden = o3.Irreps(
                f"{4 * ne}x0e + {4 * no}x0o + {2 * ne}x1e + {2 * no}x1o + {ne}x2e + {no}x2o").simplify()
            block = ConvolutionBlock(irreps_in, irreps_hidden, activation, irreps_sh, normalization,
                                     diameters[level], num_radial_basis, steps[level], dropout_prob, cutoff)
            blocks.append(block)
            self.down_irreps_out.append(block.irreps_out)
            irreps_in = block.irreps_out
            ne, no = 2 * ne, 2 * no
        self.down_blocks = torch.nn.ModuleList(blocks)
        pools = []
        for level in range(n_downsample):
            kernel_size = pooling_kernel_size(scales[level], steps[level])
            if down_op == "maxpool3d":
                pools.append(NormMaxPool3d(self.down_irreps_out[level], kernel_size))
            else:
                pools.append(AveragePool3d(kernel_size))
        self.down_pool = torch.nn.ModuleList(pools)

    @property
    def pooling_factor(self) -> tuple[int, int, int]:
        factor = [1, 1, 1]
        for pool in self.down_pool:
            factor = [f * k for f, k in zip(factor, pool.kernel_size)]
        return tuple(factor)

    def forward(self, x):
        features = []
        for level, block in enumerate(self.down_blocks):
            x = block(x)
            features.append(x)
            if level < len(self.down_pool):
                x = self.down_pool[level](x)
        return features


class Up(torch.nn.Module):
    def __init__(self, n_blocks_up, activation, irreps_sh, ne, no, normalization, down_irreps, diameters,
                 num_radial_basis, steps, scales, dropout_prob, scalar_upsampling, cutoff):
        super().__init__()
        self.n_blocks_up = n_blocks_up
        irreps_in = down_irreps[-1]
        blocks, upsample_ops = [], []
        for level in range(n_blocks_up):
            if scalar_upsampling:
                irreps_hidden = o3.Irreps(f"{8 * ne}x0e+{8 * no}x0o").simplify()
            else:
                irreps_hidden = o3.Irreps(
                    f"{4 * ne}x0e + {4 * no}x0o + {2 * ne}x1e + {ne}x2e + {2 * no}x1o + {no}x2o").simplify()
            skip = down_irreps[::-1][level + 1]
            block = ConvolutionBlock(irreps_in + skip, irreps_hidden, activation, irreps_sh, normalization,
                                     diameters[level], num_radial_basis, steps[level], dropout_prob, cutoff)
            blocks.append(block)
            irreps_in = block.irreps_out
            ne, no = ne // 2, no // 2
            factor = pooling_kernel_size(scales[level], steps[level])
            upsample_ops.append(torch.nn.Upsample(scale_factor=factor, mode="trilinear", align_corners=True))
        self.up_blocks = torch.nn.ModuleList(blocks)
        self.upsample_ops = torch.nn.ModuleList(upsample_ops)

    def forward(self, x, down_features):
        skips = down_features[::-1]
        for level in range(self.n_blocks_up):
            x = self.upsample_ops[level](x)
            x = torch.cat([x, skips[level + 1]], dim=1)
            x = self.up_blocks[level](x)
        return x


class EquivariantUNet(torch.nn.Module):
    """Equivariant U-Net with physical units (e3nn_Unet's ``UNet``, same arguments and defaults).

    Parameters
    ----------
    input_irreps, output_irreps : irreps of the input and output voxel channels (e.g. ``"1x0e"``,
        ``"4x0e"``). The first ``count('0e')`` output channels get the ``bias``.
    diameter : kernel diameter at the top level, physical units (doubles per level).
    num_radial_basis : radial basis functions per kernel.
    steps : voxel size per axis, physical units (anisotropic allowed).
    batch_norm : ``'instance'``, ``'batch'`` or ``'None'``.
    n : irreps multiplicity factor: the top level has ``4n x0e + 2n x1e + n x2e`` (SO3).
    n_downsample : pooling levels.
    equivariance : ``'SO3'`` or ``'O3'`` (adds odd irreps, tanh on odd scalars).
    lmax : highest spherical harmonic in the kernels.
    down_op : ``'maxpool3d'`` (norm max pooling) or ``'average'``.
    stride : unused, kept for signature compatibility (pooling stride equals its window).
    scale : pooling window in physical units at the top level (doubles per level).
    is_bias, scalar_upsampling, dropout_prob, cutoff : as e3nn_Unet.
    channels_last : e3fast extra -- run the network in channels-last-3d memory format.

    Input ``[batch, input_irreps.dim, x, y, z]``; sizes not divisible by the pooling factor are
    zero-padded at the start of each axis and cropped back, as e3nn_Unet does.
    """

    def __init__(self, input_irreps, output_irreps, diameter, num_radial_basis, steps, batch_norm="instance", n=2,
                 n_downsample=2, equivariance="SO3", lmax=2, down_op="maxpool3d", stride=2, scale=2,
                 is_bias=True, scalar_upsampling=False, dropout_prob=0, cutoff=False, *, channels_last=True):
        super().__init__()
        self.input_irreps = parse_irreps(input_irreps, "input_irreps")
        self.output_irreps = parse_irreps(output_irreps, "output_irreps")
        self.input_channels = irreps_channels(self.input_irreps)
        if batch_norm not in NORMALIZATIONS:
            raise ValueError(f"batch_norm must be one of {list(NORMALIZATIONS)}, got {batch_norm!r}")
        if down_op not in ("maxpool3d", "average"):
            raise ValueError(f"down_op must be 'maxpool3d' or 'average', got {down_op!r}")
        if equivariance not in ("SO3", "O3"):
            raise ValueError(f"equivariance must be 'SO3' or 'O3', got {equivariance!r}")
        if len(tuple(steps)) != 3:
            raise ValueError(f"steps must give the voxel size along 3 axes, got {steps!r}")
        self.n_classes_scalar = self.output_irreps.count("0e")
        self.num_classes = self.n_classes_scalar
        self.n_downsample = n_downsample
        self.channels_last = channels_last

        if equivariance == "SO3":
            activation = [torch.relu]
            irreps_sh = o3.Irreps.spherical_harmonics(lmax, 1)
            ne, no = n, 0
        else:
            activation = [torch.relu, torch.tanh]
            irreps_sh = o3.Irreps.spherical_harmonics(lmax, -1)
            ne, no = n, n
        scales = [scale * 2 ** i for i in range(n_downsample)]
        diameters = [diameter * 2 ** i for i in range(n_downsample + 1)]
        steps_per_level = [tuple(steps)]
        for level in range(n_downsample):
            steps_per_level.append(tuple(
                math.floor(scales[level] / step) * step if step < scales[level] else step
                for step in steps_per_level[level]))

        self.down = Down(n_downsample, activation, irreps_sh, ne, no, batch_norm, self.input_irreps, diameters,
                         num_radial_basis, steps_per_level, down_op, scales, dropout_prob, cutoff)
        ne, no = ne * 2 ** (n_downsample - 1), no * 2 ** (n_downsample - 1)
        self.up = Up(n_downsample, activation, irreps_sh, ne, no, batch_norm, self.down.down_irreps_out,
                     diameters[::-1][1:], num_radial_basis, steps_per_level[::-1][1:], scales[::-1], dropout_prob,
                     scalar_upsampling, cutoff)
        top_irreps = self.up.up_blocks[-1].irreps_out if n_downsample > 0 else self.down.down_irreps_out[-1]
        self.out = Linear(top_irreps, self.output_irreps)
        if is_bias:
            self.bias = torch.nn.Parameter(torch.zeros(self.n_classes_scalar))
        else:
            self.register_parameter("bias", None)

    def _padding(self, spatial_shape) -> list[int]:
        return [(-size) % factor for size, factor in zip(spatial_shape, self.down.pooling_factor)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_voxel_input(x, self.input_channels)
        input_format = torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format
        pad = self._padding(x.shape[-3:])
        x = F.pad(x, (pad[2], 0, pad[1], 0, pad[0], 0))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        features = self.down(x)
        x = self.up(features[-1], features) if self.n_downsample > 0 else features[-1]
        x = self.out(x)
        if self.bias is not None:
            n = self.n_classes_scalar
            x = torch.cat([x[:, :n] + self.bias.to(x.dtype)[:, None, None, None], x[:, n:]], dim=1)
        x = x[..., pad[0]:, pad[1]:, pad[2]:]
        return x.contiguous(memory_format=input_format)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
