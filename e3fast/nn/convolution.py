"""Steerable voxel convolution with the self-connection folded into the kernel's centre tap."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from e3fast.e3nn_checkpoint import absorb_convolution_buffers
from e3fast.irreps_layout import check_same_device, check_voxel_input, irreps_channels, parse_irreps
from e3fast.nn.assembled_kernel import AssembledKernelModule
from e3fast.nn.linear import Linear
from e3fast.ops import assemble_kernel
from e3fast.steerable_basis import SteerableKernelBasis, voxel_convolution_basis


def _cpu_low_precision_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16/fp16 when a conv3d of ``x`` on the CPU would compute in it (input dtype or autocast)."""
    if x.device.type != "cpu":
        return None
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def _conv3d_in_float32(x: torch.Tensor, kernel: torch.Tensor, padding) -> torch.Tensor:
    """conv3d in float32 with autocast off.

    oneDNN (torch 2.13, CPU) returns non-finite bf16 weight gradients, at random, when the volume is
    smaller than the kernel (e.g. 4^3 under a 5^3 kernel; tests/test_compile_autocast.py reproduces
    it with plain torch). Such levels are tiny, so computing them in float32 costs nothing.
    """
    with torch.autocast("cpu", enabled=False):
        return F.conv3d(x.float(), kernel.float(), padding=padding)


class VoxelConvolution(AssembledKernelModule):
    """SO(3)/O(3)-steerable convolution on voxels in physical units.

    Same semantics and parameters as e3nn_Unet's ``voxel_convolution.Convolution``:
    ``y = o3.Linear(irreps_in, irreps_out)(x) + conv3d(x, K)`` with
    ``K = tp.right(Y(lattice), emb(|lattice|) @ weight / n_taps)``, the lattice holding every voxel
    within ``diameter / 2`` (physical units, ``steps`` per axis). e3fast assembles one kernel with
    the linear term in its centre tap, so a single ``conv3d`` does both.

    Parameters: ``weight`` ``[num_radial_basis, tp.weight_numel]`` and ``sc.weight``, as in e3nn.
    ``cutoff``: True / False / ``'left'`` / ``'right'`` (see :mod:`e3fast.radial_basis`).
    ``padding`` (default ``kernel_size // 2`` per axis, 'same') is the only conv3d option.
    The kernel can be frozen for inference (:class:`~e3fast.nn.assembled_kernel.AssembledKernelModule`).
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh, diameter: float, num_radial_basis: int,
                 steps=(1.0, 1.0, 1.0), cutoff=True, **kwargs):
        super().__init__()
        unsupported = set(kwargs) - {"padding"}
        if unsupported:
            raise TypeError(f"VoxelConvolution got unsupported conv3d options {sorted(unsupported)}")
        if len(tuple(steps)) != 3 or min(steps) <= 0:
            raise ValueError(f"steps must be 3 positive voxel sizes, got {steps!r}")
        self.diameter, self.steps, self.cutoff = diameter, tuple(steps), cutoff
        irreps_in, irreps_out = parse_irreps(irreps_in, "irreps_in"), parse_irreps(irreps_out, "irreps_out")
        irreps_sh = parse_irreps(irreps_sh, "irreps_sh")
        basis = voxel_convolution_basis(irreps_in, irreps_out, irreps_sh, diameter, num_radial_basis, self.steps,
                                        cutoff)
        self._setup(basis, irreps_sh, kwargs.get("padding"))
        self.weight = torch.nn.Parameter(torch.randn(num_radial_basis, self.basis.radial_numel))

    def _setup(self, basis: SteerableKernelBasis, irreps_sh, padding) -> None:
        """Irreps, self-connection, basis and padding (default: ``kernel_size // 2``); no radial weight."""
        self.irreps_in, self.irreps_out = basis.irreps_in, basis.irreps_out
        self.irreps_sh = parse_irreps(irreps_sh, "irreps_sh")
        self.channels_in = irreps_channels(self.irreps_in)
        self.num_radial_basis = basis.num_radial
        self.sc = Linear(self.irreps_in, self.irreps_out)
        self.basis = basis
        self.padding = tuple(k // 2 for k in basis.kernel_size) if padding is None else padding

    @property
    def kernel_size(self) -> tuple[int, int, int]:
        return self.basis.kernel_size

    def assembled_kernel(self) -> torch.Tensor:
        """The dense ``[irreps_out.dim, irreps_in.dim, kx, ky, kz]`` kernel, self-connection included."""
        return assemble_kernel(self.weight, self.sc.weight, self.basis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_voxel_input(x, self.channels_in)
        check_same_device(input=x, weight=self.weight)
        kernel = self.kernel()
        low_precision = _cpu_low_precision_dtype(x)
        if low_precision is not None and any(n < k for n, k in zip(x.shape[2:], self.kernel_size)):
            return _conv3d_in_float32(x, kernel, self.padding).to(low_precision)
        return F.conv3d(x, kernel.to(x.dtype), padding=self.padding)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        absorb_convolution_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} -> {self.irreps_out}, sh={self.irreps_sh}, diameter={self.diameter}, "
                f"steps={self.steps}, kernel_size={self.kernel_size}, num_radial_basis={self.num_radial_basis}")
