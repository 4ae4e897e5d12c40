"""The constant part of a steerable voxel kernel, precomputed once per layer.

e3nn's voxel convolution builds its kernel as ``tp.right(sh, emb @ W / n)`` plus a self-connection
``o3.Linear``. Every tensor-product path ``p = (l_1 -> l_3 through spherical harmonic l_2)`` is
linear in the radial weights, so the kernel is a sum of small matrix products

.. math::
    K[w m_3, u m_1, t] = \\sum_p \\sum_{r} B_p[t, m_1, m_3, r]\\, W[r, \\text{off}_p + u\\,s_p + w]
    \\;+\\; [t = \\text{centre}] \\sum_{\\text{sc}} \\alpha\\, V[\\text{off} + u\\,\\mu_{out} + w]\\, \\delta_{m_1 m_3}

with the basis

.. math::
    B_p[t, m_1, m_3, r] = c\\, \\frac{\\text{emb}[t, r]}{n_{taps}}\\, \\lambda_p
    \\sum_{m_2} C^{l_1 l_2 l_3}_{m_1 m_2 m_3}\\, Y^{l_2}_{m_2}(\\hat x_t)

(``C``: e3nn's ``wigner_3j``, ``lambda_p``: the tensor product's path weight, ``c``: a global conv
scale, 1 for e3nn_Unet's ``Convolution``). The tensor-product and linear instructions, the
Clebsch-Gordan coefficients and spherical harmonics all come from e3nn itself.

Tables read by every backend (``int64``):

* ``paths [P, 9]``: in offset, in mul, in dim, out offset, out mul, out dim, weight offset,
  weight stride of ``u``, basis offset (block ``[taps, in dim, out dim, R]`` of the flat basis).
* ``self_connections [S, 6]``: in offset, in mul, out offset, out mul, dim, weight offset; their
  scales ``alpha`` in ``sc_scales``.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3

from e3fast.irreps_layout import parse_irreps
from e3fast.radial_basis import smooth_finite_embedding

PATH_COLUMNS = ("in_offset", "in_mul", "in_dim", "out_offset", "out_mul", "out_dim", "weight_offset",
                "weight_u_stride", "basis_offset")
SELF_CONNECTION_COLUMNS = ("in_offset", "in_mul", "out_offset", "out_mul", "dim", "weight_offset")


def physical_lattice(diameter: float, steps) -> torch.Tensor:
    """``[kx, ky, kz, 3]`` float64 positions of the voxels within ``diameter / 2`` per axis."""
    radius = diameter / 2
    axes = []
    for step in steps:
        s = math.floor(radius / step)
        axes.append(torch.arange(-s, s + 1.0, dtype=torch.float64) * step)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _offsets(irreps: o3.Irreps) -> list[int]:
    offsets, start = [], 0
    for mul_ir in irreps:
        offsets.append(start)
        start += mul_ir.dim
    return offsets


def kernel_tensor_product(irreps_in, irreps_sh, irreps_out) -> o3.FullyConnectedTensorProduct:
    """The tensor product whose instructions the kernels follow (e3nn's defaults, as the e3nn
    voxel convolutions build it). Only its instructions are used, so no code is generated for it."""
    return o3.FullyConnectedTensorProduct(irreps_in, irreps_sh, irreps_out, shared_weights=False,
                                          compile_left_right=False, _optimize_einsums=False)


def self_connection_linear(irreps_in, irreps_out) -> o3.Linear:
    """The ``o3.Linear`` whose instructions the self-connection follows (e3nn's defaults)."""
    return o3.Linear(irreps_in, irreps_out, _optimize_einsums=False)


def tensor_product_paths(irreps_in, irreps_sh, irreps_out, sh: torch.Tensor, radial: torch.Tensor):
    """Path rows and basis blocks for ``FullyConnectedTensorProduct(irreps_in, irreps_sh, irreps_out)``.

    ``sh``: ``[taps, irreps_sh.dim]`` spherical harmonics, ``radial``: ``[taps, R]`` radial
    factors (embedding times normalization). Returns ``(rows, blocks, weight_numel)``.
    """
    tp = kernel_tensor_product(irreps_in, irreps_sh, irreps_out)
    in_offsets, sh_offsets, out_offsets = _offsets(irreps_in), _offsets(irreps_sh), _offsets(irreps_out)
    angular_cache: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def angular(l_in: int, l_sh: int, l_out: int, sh_start: int) -> torch.Tensor:
        """``sum_m2 C[m1, m2, m3] Y[t, sh_start + m2]`` as ``[taps, m1, m3]``."""
        key = (l_in, l_sh, l_out, sh_start)
        if key not in angular_cache:
            w3j = o3.wigner_3j(l_in, l_sh, l_out, dtype=torch.float64)  # [m1, m2, m3]
            harmonics = sh[:, sh_start:sh_start + 2 * l_sh + 1]  # [taps, m2]
            flat = harmonics @ w3j.transpose(0, 1).reshape(2 * l_sh + 1, -1)
            angular_cache[key] = flat.reshape(-1, 2 * l_in + 1, 2 * l_out + 1)
        return angular_cache[key]

    rows, blocks = [], []
    weight_offset = 0
    basis_offset = 0
    for ins in tp.instructions:
        mul_in, ir_in = irreps_in[ins.i_in1]
        mul_sh, ir_sh = irreps_sh[ins.i_in2]
        mul_out, ir_out = irreps_out[ins.i_out]
        numel = mul_in * mul_sh * mul_out
        if ins.connection_mode != "uvw" or not ins.has_weight:
            raise NotImplementedError(f"tensor product instruction {ins} is not a weighted 'uvw' path")
        if numel > 0 and ins.path_weight != 0:
            for v in range(mul_sh):
                start = sh_offsets[ins.i_in2] + v * ir_sh.dim
                angular_part = angular(ir_in.l, ir_sh.l, ir_out.l, start) * ins.path_weight
                block = angular_part[..., None] * radial[:, None, None, :]  # [taps, m1, m3, R]
                rows.append((in_offsets[ins.i_in1], mul_in, ir_in.dim, out_offsets[ins.i_out], mul_out, ir_out.dim,
                             weight_offset + v * mul_out, mul_sh * mul_out, basis_offset))
                blocks.append(block.reshape(-1))
                basis_offset += block.numel()
        weight_offset += numel
    return rows, blocks, tp.weight_numel


def self_connection_rows(irreps_in, irreps_out):
    """Rows, scales and weight count of ``o3.Linear(irreps_in, irreps_out)`` (no biases)."""
    linear = self_connection_linear(irreps_in, irreps_out)
    in_offsets, out_offsets = _offsets(irreps_in), _offsets(irreps_out)
    rows, scales = [], []
    weight_offset = 0
    for ins in linear.instructions:
        mul_in, ir = irreps_in[ins.i_in]
        mul_out, _ = irreps_out[ins.i_out]
        if mul_in * mul_out > 0:
            rows.append((in_offsets[ins.i_in], mul_in, out_offsets[ins.i_out], mul_out, ir.dim, weight_offset))
            scales.append(float(ins.path_weight))
        weight_offset += mul_in * mul_out
    return rows, scales, linear.weight_numel


def _lattice_harmonics(irreps_sh: o3.Irreps, lattice: torch.Tensor | None,
                       harmonics: torch.Tensor | None) -> torch.Tensor:
    """float64 ``[kx, ky, kz, irreps_sh.dim]`` spherical harmonics of the lattice directions."""
    if harmonics is None:
        return o3.spherical_harmonics(irreps_sh, lattice.to(torch.float64), normalize=True,
                                      normalization="component")
    if harmonics.dim() != 4 or harmonics.shape[-1] != irreps_sh.dim:
        raise ValueError(f"harmonics must have shape [kx, ky, kz, {irreps_sh.dim}] for irreps_sh {irreps_sh}, "
                         f"got {list(harmonics.shape)}")
    return harmonics.to(torch.float64)


class SteerableKernelBasis(torch.nn.Module):
    """Constant basis and tables that turn weights into a dense ``[out, in, kx, ky, kz]`` kernel.

    Holds non-persistent buffers only (nothing lands in a ``state_dict``). The kernel's taps are
    given by a ``lattice`` of positions ``[kx, ky, kz, 3]`` or directly by their spherical
    ``harmonics`` ``[kx, ky, kz, irreps_sh.dim]`` (e.g. an e3nn convolution's ``sh`` buffer);
    with neither, the kernel is ``1x1x1`` and made of the self-connection alone: an equivariant
    per-voxel linear map. ``radial_embedding`` ``[kx, ky, kz, R]`` times ``conv_scale / taps``
    gives the radial factors. The basis is computed in float64 and stored in ``dtype`` (default:
    torch's default dtype).
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh=None, lattice: torch.Tensor | None = None,
                 radial_embedding: torch.Tensor | None = None, conv_scale: float = 1.0,
                 self_connection: bool = True, *, harmonics: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.irreps_in = parse_irreps(irreps_in, "irreps_in")
        self.irreps_out = parse_irreps(irreps_out, "irreps_out")
        self.in_dim, self.out_dim = self.irreps_in.dim, self.irreps_out.dim

        if lattice is None and harmonics is None:
            self.kernel_size = (1, 1, 1)
            self.num_radial, self.radial_numel = 0, 0
            rows, blocks = [], []
        else:
            irreps_sh = parse_irreps(irreps_sh, "irreps_sh")
            sh = _lattice_harmonics(irreps_sh, lattice, harmonics)
            self.kernel_size = tuple(sh.shape[:3])
            taps = math.prod(self.kernel_size)
            radial = radial_embedding.to(torch.float64).reshape(taps, -1) * (conv_scale / taps)
            self.num_radial = radial.shape[1]
            rows, blocks, self.radial_numel = tensor_product_paths(
                self.irreps_in, irreps_sh, self.irreps_out, sh.reshape(taps, -1), radial)

        if self_connection:
            sc_rows, self.sc_scales, self.sc_numel = self_connection_rows(self.irreps_in, self.irreps_out)
        else:
            sc_rows, self.sc_scales, self.sc_numel = [], [], 0

        dtype = dtype or torch.get_default_dtype()
        basis = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.float64)
        self.register_buffer("basis", basis.to(dtype), persistent=False)
        self.register_buffer("paths", torch.tensor(rows, dtype=torch.int64).reshape(-1, len(PATH_COLUMNS)),
                             persistent=False)
        self.register_buffer("self_connections",
                             torch.tensor(sc_rows, dtype=torch.int64).reshape(-1, len(SELF_CONNECTION_COLUMNS)),
                             persistent=False)
        # Python copies of the tables for the reference backend and for tracing.
        self.path_rows = [tuple(r) for r in rows]
        self.sc_rows = [tuple(r) for r in sc_rows]

    @property
    def num_taps(self) -> int:
        return math.prod(self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} -> {self.irreps_out}, kernel_size={self.kernel_size}, "
                f"paths={len(self.path_rows)}, radial={self.num_radial}")


def voxel_convolution_basis(irreps_in, irreps_out, irreps_sh, diameter: float, num_radial_basis: int,
                            steps=(1.0, 1.0, 1.0), cutoff=True) -> SteerableKernelBasis:
    """The basis of e3nn_Unet's ``Convolution`` (physical units, ``emb @ W / n_taps``)."""
    lattice = physical_lattice(diameter, steps)
    embedding = smooth_finite_embedding(lattice.norm(dim=-1), 0.0, diameter / 2, num_radial_basis, cutoff)
    return SteerableKernelBasis(irreps_in, irreps_out, irreps_sh, lattice, embedding)
