"""Equivariant per-voxel linear map (e3nn's ``o3.Linear`` applied at every voxel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from e3fast.e3nn_checkpoint import absorb_linear_buffers
from e3fast.irreps_layout import check_same_device, check_voxel_input, irreps_channels, parse_irreps
from e3fast.nn.assembled_kernel import AssembledKernelModule
from e3fast.ops import assemble_kernel
from e3fast.steerable_basis import SteerableKernelBasis


class Linear(AssembledKernelModule):
    """``y[b, :, x, y, z] = o3.Linear(irreps_in, irreps_out)(x[b, :, x, y, z])``.

    Same parameter as e3nn (``weight``: ``[weight_numel]``, standard normal at init, path
    normalization ``1/sqrt(fan_in)``), so e3nn state_dicts load unchanged. The block matrix is
    assembled by the kernel-assembly op and applied as a ``1x1x1`` convolution (or frozen for
    inference, see :class:`~e3fast.nn.assembled_kernel.AssembledKernelModule`).
    """

    def __init__(self, irreps_in, irreps_out):
        super().__init__()
        self.irreps_in = parse_irreps(irreps_in, "irreps_in")
        self.irreps_out = parse_irreps(irreps_out, "irreps_out")
        self.channels_in = irreps_channels(self.irreps_in)
        self.basis = SteerableKernelBasis(self.irreps_in, self.irreps_out)
        self.weight = torch.nn.Parameter(torch.randn(self.basis.sc_numel))

    def matrix(self) -> torch.Tensor:
        """The dense ``[irreps_out.dim, irreps_in.dim]`` matrix."""
        return self.kernel().flatten(1)

    def assembled_kernel(self) -> torch.Tensor:
        empty = self.weight.new_zeros(0, 0)
        return assemble_kernel(empty, self.weight, self.basis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_voxel_input(x, self.channels_in)
        check_same_device(input=x, weight=self.weight)
        return F.conv3d(x, self.kernel().to(x.dtype))

    def output_mask(self) -> torch.Tensor:
        """1 for output channels that some input reaches, as ``o3.Linear.output_mask``."""
        mask = torch.zeros(self.irreps_out.dim)
        for _, _, out_offset, mul_out, dim, _ in self.basis.sc_rows:
            mask[out_offset:out_offset + mul_out * dim] = 1.0
        return mask

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        absorb_linear_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}"
