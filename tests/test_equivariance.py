"""Equivariance as a tested property.

* 90-degree grid rotations of the whole U-Net: exact up to float error (fp32 and fp64).
* Reflections of an O(3) U-Net (grid flips), with vector inputs and outputs.
* Arbitrary rotations: the steerable kernel satisfies K(R p) = D_out(R) K(p) D_in(R)^T exactly, and
  the pointwise ops (norm + gate, norm pooling) commute with D(R) exactly; a convolution of a smooth
  field rotated by an arbitrary angle agrees approximately (the voxel lattice is not rotation invariant).
"""
from __future__ import annotations


import pytest
import torch
from e3nn import o3

import e3fast
from conftest import FAST_BACKENDS, assert_relative
from e3fast.models import EquivariantUNet
from e3fast.steerable_basis import SteerableKernelBasis
from e3fast.radial_basis import smooth_finite_embedding

BACKENDS = ["reference"] + FAST_BACKENDS


# ---------------------------------------------------------------- helpers


def grid_transform_matrix(transform, size: int = 5) -> torch.Tensor:
    """The 3x3 matrix R with ``transform(f)(R p) = f(p)`` for a grid map such as rot90 or flip.

    Index coordinates centred on the grid are transformed like any scalar field; a least-squares
    fit recovers the linear map (a signed permutation).
    """
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # [3, n, n, n]
    moved = transform(coords[None])[0]  # at new position q: the old position p = R^-1 q
    new = coords.reshape(3, -1)
    old = moved.reshape(3, -1)
    inverse = torch.linalg.lstsq(new.T, old.T).solution.T
    return torch.linalg.inv(inverse).round()


def irreps_matrix(irreps: o3.Irreps, matrix: torch.Tensor) -> torch.Tensor:
    """D(R) of ``irreps`` in float64 to full precision, R proper or improper.

    e3nn's ``D_from_matrix`` goes through float32 tables (~1e-7); here each block is fitted from
    ``Y_l(R p) = M Y_l(p)`` at random points (spherical harmonics are float64-accurate), and parity
    is applied for reflections: ``D = M * (p (-1)^l)^[det R < 0]``.
    """
    points = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    improper = bool(torch.det(matrix) < 0)
    blocks = []
    for mul, ir in irreps:
        y = o3.spherical_harmonics(ir.l, points, normalize=False)
        y_rotated = o3.spherical_harmonics(ir.l, points @ matrix.T, normalize=False)
        block = torch.linalg.lstsq(y, y_rotated).solution.T
        if improper:
            block = block * (ir.p * (-1) ** ir.l)
        blocks.extend([block] * mul)
    return torch.block_diag(*blocks) if blocks else torch.zeros(0, 0, dtype=torch.float64)


def transform_field(x: torch.Tensor, irreps: o3.Irreps, transform) -> torch.Tensor:
    """Move the voxels with ``transform`` and rotate each voxel's irreps with D(R)."""
    d = irreps_matrix(irreps, grid_transform_matrix(transform)).to(x.dtype)
    return torch.einsum("ij,bj...->bi...", d, transform(x))


def rot90(k: int, dims: tuple[int, int]):
    return lambda x: torch.rot90(x, k, dims)


def flip(dim: int):
    return lambda x: torch.flip(x, (dim,))


def random_rotation(generator_seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(generator_seed)
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    return o3.quaternion_to_matrix(q / q.norm())


# ---------------------------------------------------------------- whole U-Net, 90 degrees

ROTATIONS = [rot90(1, (2, 3)), rot90(1, (3, 4)), rot90(-1, (2, 4)), rot90(2, (2, 3))]


def _build_unet(dtype, **kwargs):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # constants computed in the model's precision
    try:
        model = EquivariantUNet(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_unet_is_equivariant_to_90_degree_rotations(backend, dtype, rtol):
    model = _build_unet(dtype, input_irreps="1x0e", output_irreps="3x0e", diameter=5.0, num_radial_basis=4,
                        steps=(1.0, 1.0, 1.0), n=1, n_downsample=2)
    x = torch.randn(2, 1, 12, 12, 12, dtype=dtype)  # divisible by the pooling factor 4
    irreps_in, irreps_out = o3.Irreps("1x0e"), o3.Irreps("3x0e")
    with e3fast.use_backend(backend):
        out = model(x)
        for transform in ROTATIONS:
            rotated_out = model(transform_field(x, irreps_in, transform))
            assert_relative(rotated_out, transform_field(out, irreps_out, transform), rtol, "rotated output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_with_vector_fields_is_equivariant_to_90_degree_rotations(backend):
    irreps_in, irreps_out = o3.Irreps("1x0e+1x1e"), o3.Irreps("2x0e+1x1e+1x2e")
    model = _build_unet(torch.float64, input_irreps=irreps_in, output_irreps=irreps_out, diameter=5.0,
                        num_radial_basis=3, steps=(1.0, 1.0, 1.0), n=1, n_downsample=2)
    x = torch.randn(2, irreps_in.dim, 8, 8, 8, dtype=torch.float64)
    with e3fast.use_backend(backend):
        out = model(x)
        for transform in ROTATIONS[:2]:
            assert_relative(model(transform_field(x, irreps_in, transform)),
                            transform_field(out, irreps_out, transform), 1e-9, "rotated vector output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_o3_unet_is_equivariant_to_reflections(backend):
    """Average pooling: e3nn_Unet's max pooling takes a plain max of odd scalars, which a reflection
    (x -> -x on them) does not commute with; everything else in an O(3) network does."""
    irreps_in, irreps_out = o3.Irreps("1x0e+1x1o"), o3.Irreps("2x0e+1x1o")
    model = _build_unet(torch.float64, input_irreps=irreps_in, output_irreps=irreps_out, diameter=5.0,
                        num_radial_basis=3, steps=(1.0, 1.0, 1.0), n=1, n_downsample=2, equivariance="O3",
                        down_op="average")
    x = torch.randn(1, irreps_in.dim, 8, 8, 8, dtype=torch.float64)
    with e3fast.use_backend(backend):
        out = model(x)
        for transform in (flip(2), flip(4)):
            assert torch.det(grid_transform_matrix(transform)) < 0
            assert_relative(model(transform_field(x, irreps_in, transform)),
                            transform_field(out, irreps_out, transform), 1e-9, "reflected output")


# ---------------------------------------------------------------- arbitrary rotations


def test_steerable_kernel_rotates_with_its_irreps():
    """K(R p) = D_out(R) K(p) D_in(R)^T at arbitrary points p and rotation R (exact)."""
    irreps_in, irreps_out = o3.Irreps("2x0e+1x1o+1x2e+1x3o"), o3.Irreps("1x0e+2x1o+1x2e+1x2o")
    irreps_sh = o3.Irreps.spherical_harmonics(3, -1)
    points = torch.randn(3, 3, 3, 3, dtype=torch.float64) * 1.5
    rotation = random_rotation(1)

    def kernel(lattice):
        embedding = smooth_finite_embedding(lattice.norm(dim=-1), 0.0, 4.0, 4, cutoff=True)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            basis = SteerableKernelBasis(irreps_in, irreps_out, irreps_sh, lattice, embedding)
        finally:
            torch.set_default_dtype(previous)
        weight = torch.randn(basis.num_radial, basis.radial_numel, generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64)
        sc_weight = torch.randn(basis.sc_numel, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        return e3fast.ops.assemble_kernel(weight, sc_weight, basis).flatten(2)  # [out, in, taps]

    rotated = kernel(points @ rotation.T)
    d_in, d_out = irreps_matrix(irreps_in, rotation), irreps_matrix(irreps_out, rotation)
    expected = torch.einsum("ab,bct,dc->adt", d_out, kernel(points), d_in)
    assert_relative(rotated, expected, 1e-12, "rotated kernel")


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_gate_and_pooling_commute_with_arbitrary_rotations(backend):
    layer = e3fast.nn.NormGate("3x0e+1x0o", [torch.relu, torch.tanh], "4x0e", [torch.sigmoid],
                               "2x1o+1x2e+1x3o").double()
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    pool = e3fast.nn.NormMaxPool3d(layer.irreps_out, 2)
    rotation = random_rotation(2)
    d_in = irreps_matrix(layer.irreps_in, rotation)
    d_out = irreps_matrix(layer.irreps_out, rotation)
    x = torch.randn(2, layer.irreps_in.dim, 4, 6, 4, dtype=torch.float64)

    def rotate(d, field):
        return torch.einsum("ij,bj...->bi...", d, field)

    with e3fast.use_backend(backend):
        gated = layer(x)
        assert_relative(layer(rotate(d_in, x)), rotate(d_out, gated), 1e-12, "norm + gate")
        assert_relative(pool(rotate(d_out, gated)), rotate(d_out, pool(gated)), 1e-12, "norm pooling")


def test_convolution_of_a_smooth_field_is_approximately_equivariant_to_any_rotation():
    """Sample a smooth vector field and its rotated copy exactly; compare the convolutions at the centre."""
    irreps_in, irreps_out = o3.Irreps("1x0e+1x1o"), o3.Irreps("1x0e+1x1o+1x2e")
    conv = e3fast.nn.VoxelConvolution(irreps_in, irreps_out, o3.Irreps.spherical_harmonics(2, -1), 7.0, 4,
                                      (0.5, 0.5, 0.5)).double()
    rotation = random_rotation(3)
    n = 15
    axis = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * 0.5
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # [n, n, n, 3]
    centre = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)

    def field(p):  # scalar blob and a vector field with a swirl, both smooth on the voxel scale
        r2 = ((p - centre) ** 2).sum(-1, keepdim=True)
        scalar = torch.exp(-r2 / 8.0)
        vector = torch.cross(p - centre, torch.tensor([0.2, 0.9, -0.4], dtype=torch.float64).expand_as(p), dim=-1)
        vector = vector * torch.exp(-r2 / 10.0)
        return torch.cat([scalar, vector], dim=-1)  # e3nn >= 0.5: 1o components are (x, y, z)

    d_in, d_out = irreps_matrix(irreps_in, rotation), irreps_matrix(irreps_out, rotation)
    original = field(points).permute(3, 0, 1, 2)[None]
    # rotated field g(p) = D f(R^T p), sampled exactly on the grid
    rotated = torch.einsum("ij,xyzj->ixyz", d_in, field(points @ rotation))[None]
    middle = n // 2
    out = conv(original)[0, :, middle, middle, middle]
    out_rotated = conv(rotated)[0, :, middle, middle, middle]
    error = (out_rotated - d_out @ out).norm() / out.norm()
    assert error < 0.05, f"relative error {error:.3g} for an arbitrary rotation"
    # sanity: the comparison can fail -- without D_out the vector parts disagree
    assert (out_rotated - out).norm() / out.norm() > 10 * error
