"""The numerical reference: the paper's U-Net composed from e3nn modules, the slow way.

This is the network of SCAN-NRAD/e3nn_Unet (``equivariant_unet_physical_units.UNet``) written
against e3nn's public modules: steerable convolution as ``o3.Linear`` + ``conv3d`` of a
``tp.right`` kernel, ``e3nn.nn.BatchNorm`` / ``Gate`` / ``Dropout`` on channels-last views,
norm max pooling, trilinear upsampling. Module and parameter names are e3nn_Unet's, so its
``state_dict`` has the same keys as an e3nn_Unet checkpoint of the same configuration.

It exists to test e3fast against (and to benchmark it against); it is deliberately unfused.
One deliberate difference: pooling gathers each sample's own vectors (``per_sample_pooling=True``);
``False`` reproduces e3nn_Unet's gather from sample 0 for batch > 1.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import BatchNorm, Dropout, Gate

from e3fast.radial_basis import smooth_finite_embedding


def radial_embedding(distance, radius, number, cutoff):
    """e3nn's ``soft_one_hot_linspace`` (smooth_finite); e3fast's for the 'left'/'right' cutoffs."""
    if cutoff is True or cutoff is False:
        return soft_one_hot_linspace(distance, 0.0, radius, number, basis="smooth_finite", cutoff=cutoff)
    return smooth_finite_embedding(distance, 0.0, radius, number, cutoff)


class Convolution(torch.nn.Module):
    """e3nn voxel convolution in physical units: ``sc(x) + conv3d(x, tp.right(sh, emb @ W / n))``."""

    def __init__(self, irreps_in, irreps_out, irreps_sh, diameter, num_radial_basis, steps=(1.0, 1.0, 1.0),
                 cutoff=True):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.num_radial_basis = num_radial_basis
        self.sc = o3.Linear(self.irreps_in, self.irreps_out)
        radius = diameter / 2
        axes = [torch.arange(-math.floor(radius / s), math.floor(radius / s) + 1.0) * s for s in steps]
        lattice = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        self.register_buffer("lattice", lattice)
        self.kwargs = {"padding": tuple(s // 2 for s in lattice.shape[:3])}  # conv3d options, as e3nn_Unet
        self.register_buffer("emb", radial_embedding(lattice.norm(dim=-1), radius, num_radial_basis, cutoff))
        self.register_buffer("sh", o3.spherical_harmonics(self.irreps_sh, lattice, normalize=True,
                                                          normalization="component"))
        self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, self.irreps_sh, self.irreps_out,
                                                 shared_weights=False, compile_right=True)
        self.weight = torch.nn.Parameter(torch.randn(num_radial_basis, self.tp.weight_numel))

    def kernel(self) -> torch.Tensor:
        weight = self.emb @ self.weight / (self.sh.shape[0] * self.sh.shape[1] * self.sh.shape[2])
        kernel = self.tp.right(self.sh, weight)  # [x, y, z, in, out]
        return torch.einsum("xyzio->oixyz", kernel)

    def forward(self, x):
        sc = self.sc(x.transpose(1, 4)).transpose(1, 4)
        return sc + F.conv3d(x, self.kernel(), **self.kwargs)


class ConvolutionVoxel(torch.nn.Module):
    """e3nn voxel convolution in voxel units (e3nn_Unet's ``ConvolutionVoxel``, e3nn's v2103):
    a ``size``-point lattice on [-1, 1] per axis scaled by ``steps / min(steps)`` (points beyond 1
    dropped), ``size`` radial functions on [0, 1], ``sc(x) + 0.1 * conv3d(x, tp.right(sh, emb @ W / size**1.5))``.
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh, size, steps=(1, 1, 1), cutoff=True):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.size = self.num_rbfs = size
        self.kwargs = {"padding": size // 2}
        self.sc = o3.Linear(self.irreps_in, self.irreps_out)
        axes = [torch.linspace(-1, 1, size) * step / min(steps) for step in steps]
        lattice = torch.stack(torch.meshgrid(*[a[a.abs() <= 1] for a in axes], indexing="ij"), dim=-1)
        self.register_buffer("emb", radial_embedding(lattice.norm(dim=-1), 1.0, size, cutoff))
        self.register_buffer("sh", o3.spherical_harmonics(self.irreps_sh, lattice, True, "component"))
        self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, self.irreps_sh, self.irreps_out,
                                                 shared_weights=False, compile_right=True)
        self.weight = torch.nn.Parameter(torch.randn(size, self.tp.weight_numel))

    def forward(self, x):
        sc = self.sc(x.transpose(1, 4)).transpose(1, 4)
        kernel = self.tp.right(self.sh, self.emb @ self.weight / self.size ** 1.5)
        return sc + 0.1 * F.conv3d(x, torch.einsum("xyzio->oixyz", kernel), **self.kwargs)


def channels_last_apply(module, x):
    """Apply an e3nn module that wants ``[..., irreps.dim]`` to a ``[B, C, x, y, z]`` tensor."""
    return module(x.transpose(1, 4)).transpose(1, 4)


def norm_max_pool3d(x, irreps, kernel_size, per_sample=True):
    """Per irrep copy keep the vector of largest norm (plain max for scalars), as e3nn_Unet."""
    outputs = []
    start = 0
    for l in irreps.ls:
        end = start + 2 * l + 1
        field = x[:, start:end]
        score = field[:, 0] if l == 0 else field.norm(dim=1)
        pooled, index = F.max_pool3d(score, kernel_size, stride=kernel_size, return_indices=True)
        if l == 0:
            outputs.append(pooled)
        elif per_sample:
            flat = field.flatten(2)  # [B, 2l+1, N]
            gathered = flat.gather(2, index.flatten(1)[:, None, :].expand(-1, 2 * l + 1, -1))
            outputs.extend(gathered.reshape(x.shape[0], 2 * l + 1, *pooled.shape[1:]).unbind(1))
        else:
            outputs.extend(field[:, m].flatten()[index] for m in range(2 * l + 1))
        start = end
    return torch.stack(outputs, dim=1)


class Pool(torch.nn.Module):
    """e3nn_Unet's ``DynamicPool3d`` (same attributes); ``per_sample=False`` keeps its batch > 1 bug."""

    def __init__(self, scale, steps, mode, irreps, per_sample=True):
        super().__init__()
        self.scale, self.steps = scale, steps
        self.kernel_size = tuple(math.floor(scale / s) if s < scale else 1 for s in steps)
        self.mode, self.irreps, self.per_sample = mode, o3.Irreps(irreps), per_sample

    def forward(self, x):
        if self.mode == "maxpool3d":
            return norm_max_pool3d(x, self.irreps, self.kernel_size, self.per_sample)
        return F.avg_pool3d(x, self.kernel_size, stride=self.kernel_size)


class Identity(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class ConvolutionBlock(torch.nn.Module):
    def __init__(self, irreps_in, irreps_hidden, activation, irreps_sh, normalization, diameter, num_radial_basis,
                 steps, dropout_prob, cutoff):
        super().__init__()
        norm = {"None": Identity, "batch": BatchNorm, "instance": partial(BatchNorm, instance=True)}[normalization]
        irreps_scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l == 0])
        irreps_gated = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l > 0])
        irreps_gates = o3.Irreps(f"{irreps_gated.num_irreps}x0e")
        if irreps_gates.dim == 0:
            irreps_gates, act_gates = irreps_gates.simplify(), []
        else:
            act_gates = [torch.sigmoid]
        conv = dict(irreps_sh=irreps_sh, diameter=diameter, num_radial_basis=num_radial_basis, steps=steps,
                    cutoff=cutoff)
        self.gate1 = Gate(irreps_scalars, activation, irreps_gates, act_gates, irreps_gated)
        self.conv1 = Convolution(irreps_in, self.gate1.irreps_in, **conv)
        self.batchnorm1 = norm(self.gate1.irreps_in)
        self.dropout1 = Dropout(self.gate1.irreps_out, dropout_prob)
        self.gate2 = Gate(irreps_scalars, activation, irreps_gates, act_gates, irreps_gated)
        self.conv2 = Convolution(self.gate1.irreps_out, self.gate2.irreps_in, **conv)
        self.batchnorm2 = norm(self.gate2.irreps_in)
        self.dropout2 = Dropout(self.gate2.irreps_out, dropout_prob)
        self.irreps_out = self.gate2.irreps_out

    def forward(self, x):
        for conv, norm, gate, dropout in ((self.conv1, self.batchnorm1, self.gate1, self.dropout1),
                                          (self.conv2, self.batchnorm2, self.gate2, self.dropout2)):
            x = conv(x)
            x = channels_last_apply(norm, x)
            x = channels_last_apply(gate, x)
            x = channels_last_apply(dropout, x)
        return x


class Down(torch.nn.Module):
    def __init__(self, n_downsample, activation, irreps_sh, ne, no, normalization, irreps_in, diameters,
                 num_radial_basis, steps, down_op, scales, dropout_prob, cutoff, per_sample_pooling):
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
        self.down_pool = torch.nn.ModuleList(
            Pool(scales[level], steps[level], down_op, self.down_irreps_out[level], per_sample_pooling)
            for level in range(n_downsample))

    def forward(self, x):
        features = []
        for level, block in enumerate(self.down_blocks):
            x = block(x)
            features.append(x)
            if level < len(self.down_blocks) - 1:
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
            block = ConvolutionBlock(irreps_in + down_irreps[::-1][level + 1], irreps_hidden, activation, irreps_sh,
                                     normalization, diameters[level], num_radial_basis, steps[level], dropout_prob,
                                     cutoff)
            blocks.append(block)
            irreps_in = block.irreps_out
            ne, no = ne // 2, no // 2
            factor = tuple(math.floor(scales[level] / s) if s < scales[level] else 1 for s in steps[level])
            upsample_ops.append(torch.nn.Upsample(scale_factor=factor, mode="trilinear", align_corners=True))
        self.up_blocks = torch.nn.ModuleList(blocks)
        self.upsample_ops = torch.nn.ModuleList(upsample_ops)

    def forward(self, x, down_features):
        for level in range(self.n_blocks_up):
            x = self.upsample_ops[level](x)
            x = torch.cat([x, down_features[::-1][level + 1]], dim=1)
            x = self.up_blocks[level](x)
        return x


class UNet(torch.nn.Module):
    """e3nn_Unet's ``UNet`` (same arguments) composed from e3nn modules."""

    def __init__(self, input_irreps, output_irreps, diameter, num_radial_basis, steps, batch_norm="instance", n=2,
                 n_downsample=2, equivariance="SO3", lmax=2, down_op="maxpool3d", stride=2, scale=2, is_bias=True,
                 scalar_upsampling=False, dropout_prob=0, cutoff=False, per_sample_pooling=True):
        super().__init__()
        self.n_classes_scalar = o3.Irreps(output_irreps).count("0e")
        if equivariance == "SO3":
            activation, irreps_sh, ne, no = [torch.relu], o3.Irreps.spherical_harmonics(lmax, 1), n, 0
        else:
            activation, irreps_sh, ne, no = [torch.relu, torch.tanh], o3.Irreps.spherical_harmonics(lmax, -1), n, n
        scales = [scale * 2 ** i for i in range(n_downsample)]
        diameters = [diameter * 2 ** i for i in range(n_downsample + 1)]
        steps_array = [tuple(steps)]
        for level in range(n_downsample):
            steps_array.append(tuple(math.floor(scales[level] / s) * s if s < scales[level] else s
                                     for s in steps_array[level]))
        self.down = Down(n_downsample, activation, irreps_sh, ne, no, batch_norm, input_irreps, diameters,
                         num_radial_basis, steps_array, down_op, scales, dropout_prob, cutoff, per_sample_pooling)
        ne, no = ne * 2 ** (n_downsample - 1), no * 2 ** (n_downsample - 1)
        self.up = Up(n_downsample, activation, irreps_sh, ne, no, batch_norm, self.down.down_irreps_out,
                     diameters[::-1][1:], num_radial_basis, steps_array[::-1][1:], scales[::-1], dropout_prob,
                     scalar_upsampling, cutoff)
        self.out = o3.Linear(self.up.up_blocks[-1].irreps_out, output_irreps)
        if is_bias:
            self.bias = torch.nn.Parameter(torch.zeros(self.n_classes_scalar))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        factor = [1, 1, 1]
        for pool in self.down.down_pool:
            factor = [f * k for f, k in zip(factor, pool.kernel_size)]
        pad = [(-s) % f for s, f in zip(x.shape[-3:], factor)]
        x = F.pad(x, (pad[2], 0, pad[1], 0, pad[0], 0))
        features = self.down(x)
        x = self.up(features[-1], features)
        x = channels_last_apply(self.out, x)
        if self.bias is not None:
            bias = self.bias.reshape(-1, 1, 1, 1)
            x = torch.cat([x[:, :self.n_classes_scalar] + bias, x[:, self.n_classes_scalar:]], dim=1)
        return x[..., pad[0]:, pad[1]:, pad[2]:]
