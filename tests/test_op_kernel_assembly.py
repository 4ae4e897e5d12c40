"""Native CPU kernel assembly (``e3fast::assemble_kernel*``) against the pure-PyTorch reference."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import e3fast
from e3fast.backends import backend_usable
from e3fast.ops import assemble_kernel
from e3fast.steerable_basis import SteerableKernelBasis, voxel_convolution_basis

import strategies
from conftest import RTOL, assert_relative

pytestmark = pytest.mark.skipif(not backend_usable("cpu", "cpu"),
                                reason="the compiled extension e3fast._C (CPU kernels) is not loaded")

IRREP_CHOICES = ("0e", "0o", "1e", "1o", "2e", "2o", "3o")
IRREPS_IN = "3x0e+2x1o+1x2e+1x3o"
IRREPS_OUT = "2x0e+1x0o+2x1o+1x2e+1x2o"
IRREPS_SH = "0e+1o+2e+3o"
ANISOTROPIC_STEPS = (1.0, 0.7, 1.3)  # lattice 3 x 5 x 3 for diameter 3
BF16_RTOL = 2e-2


def random_irreps(max_entries: int = 3):
    return strategies.irreps(IRREP_CHOICES, max_entries=max_entries)


def make_basis(irreps_in=IRREPS_IN, irreps_out=IRREPS_OUT, steps=(1.0, 1.0, 1.0), irreps_sh=IRREPS_SH,
               diameter=3.0, num_radial=3):
    return voxel_convolution_basis(irreps_in, irreps_out, irreps_sh, diameter, num_radial, steps, cutoff=True)


def random_weights(basis, dtype=torch.float32):
    radial = torch.randn(basis.num_radial, basis.radial_numel, dtype=dtype)
    sc = torch.randn(basis.sc_numel, dtype=dtype)
    return radial, sc


def assemble_on(backend, radial, sc, basis):
    with e3fast.use_backend(backend):
        return assemble_kernel(radial, sc, basis)


def kernel_and_grads(backend, radial, sc, basis, grad_kernel):
    """Kernel and the gradients of <kernel, grad_kernel> w.r.t. both weights on ``backend``."""
    radial, sc = radial.detach().requires_grad_(), sc.detach().requires_grad_()
    kernel = assemble_on(backend, radial, sc, basis)
    if not kernel.requires_grad:  # the reference kernel of irreps without any path is a constant zero
        return kernel, torch.zeros_like(radial), torch.zeros_like(sc)
    grad_radial, grad_sc = torch.autograd.grad(kernel, (radial, sc), grad_kernel.to(kernel.dtype),
                                               allow_unused=True, materialize_grads=True)
    return kernel, grad_radial, grad_sc


def check_against_reference(basis, dtype, rtol, reference_dtype=None):
    reference_dtype = reference_dtype or dtype
    radial, sc = random_weights(basis, dtype)
    grad_kernel = torch.randn(basis.out_dim, basis.in_dim, *basis.kernel_size, dtype=reference_dtype)
    native = kernel_and_grads("cpu", radial, sc, basis, grad_kernel)
    expected = kernel_and_grads("reference", radial.to(reference_dtype), sc.to(reference_dtype), basis, grad_kernel)
    assert native[0].dtype == dtype and native[0].is_contiguous()
    for name, actual, wanted in zip(("kernel", "grad radial_weight", "grad sc_weight"), native, expected):
        assert wanted.abs().max() > 0, f"{name}: the reference is zero, the comparison would prove nothing"
        assert_relative(actual, wanted, rtol, f"{name} ({dtype})")


def explicit_kernel(radial, sc, basis):
    """The assembly formula written out element by element (independent of the reference's einsum)."""
    taps, num_radial = basis.num_taps, basis.num_radial
    kernel = torch.zeros(basis.out_dim, basis.in_dim, taps, dtype=torch.float64)
    flat = basis.basis.double()
    for in_off, mul_in, d1, out_off, mul_out, d3, w_off, stride, b_off in basis.path_rows:
        block = flat[b_off:b_off + taps * d1 * d3 * num_radial].view(taps, d1, d3, num_radial)
        for u, w, m1, m3 in itertools.product(range(mul_in), range(mul_out), range(d1), range(d3)):
            weights = radial[:, w_off + u * stride + w].double()
            kernel[out_off + w * d3 + m3, in_off + u * d1 + m1] += block[:, m1, m3] @ weights
    for (in_off, mul_in, out_off, mul_out, dim, w_off), scale in zip(basis.sc_rows, basis.sc_scales):
        for u, w, m in itertools.product(range(mul_in), range(mul_out), range(dim)):
            kernel[out_off + w * dim + m, in_off + u * dim + m, taps // 2] += scale * sc[w_off + u * mul_out + w]
    return kernel.view(basis.out_dim, basis.in_dim, *basis.kernel_size)


def native_op_args(basis, radial, sc):
    return (radial, sc, basis.basis.to(radial.dtype), basis.paths, basis.self_connections, basis.sc_scales,
            basis.out_dim, basis.in_dim, list(basis.kernel_size))


@pytest.mark.parametrize("steps", [(1.0, 1.0, 1.0), ANISOTROPIC_STEPS], ids=["cubic", "anisotropic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(dtype, steps):
    basis = make_basis(steps=steps)
    assert len(set(basis.kernel_size)) > 1 or steps == (1.0, 1.0, 1.0)
    check_against_reference(basis, dtype, RTOL[dtype])


def test_bfloat16_close_to_float32_reference():
    check_against_reference(make_basis(steps=ANISOTROPIC_STEPS), torch.bfloat16, BF16_RTOL, torch.float32)


def test_float16_close_to_float32_reference():
    check_against_reference(make_basis(), torch.float16, 5e-3, torch.float32)


def test_matches_explicit_formula():
    basis = make_basis("2x0e+1x1o+1x2e", "1x0e+2x1o+1x2e", steps=ANISOTROPIC_STEPS, irreps_sh="0e+1o+2e")
    radial, sc = random_weights(basis, torch.float64)
    kernel = assemble_on("cpu", radial, sc, basis)
    assert_relative(kernel, explicit_kernel(radial, sc, basis), 1e-6, "kernel vs explicit formula")


@settings(max_examples=15, deadline=None)
@given(irreps_in=random_irreps(), irreps_out=random_irreps(),
       steps=st.sampled_from([(1.0, 1.0, 1.0), ANISOTROPIC_STEPS, (0.8, 1.5, 1.0)]),
       num_radial=st.integers(1, 4))
def test_random_irreps_match_reference(irreps_in, irreps_out, steps, num_radial):
    torch.manual_seed(0)
    basis = make_basis(irreps_in, irreps_out, steps, irreps_sh="0e+1o+2e", num_radial=num_radial)
    radial, sc = random_weights(basis)
    grad_kernel = torch.randn(basis.out_dim, basis.in_dim, *basis.kernel_size)
    native = kernel_and_grads("cpu", radial, sc, basis, grad_kernel)
    expected = kernel_and_grads("reference", radial, sc, basis, grad_kernel)
    for name, actual, wanted in zip(("kernel", "grad radial_weight", "grad sc_weight"), native, expected):
        assert_relative(actual, wanted, RTOL[torch.float32], f"{name} for {irreps_in} -> {irreps_out}")
    assert_relative(native[0], explicit_kernel(radial, sc, basis), RTOL[torch.float32], "kernel vs explicit formula")


def test_without_lattice_is_a_per_voxel_linear_map():
    basis = SteerableKernelBasis("4x0e+2x1o+1x2e", "3x0e+3x1o+2x2e")
    assert basis.paths.shape == (0, 9) and basis.kernel_size == (1, 1, 1)
    radial = torch.zeros(0, 0)
    sc = torch.randn(basis.sc_numel, requires_grad=True)
    kernel = assemble_on("cpu", radial, sc, basis)
    expected = assemble_on("reference", radial, sc, basis)
    assert_relative(kernel, expected, RTOL[torch.float32], "1x1x1 kernel")
    grad_kernel = torch.randn_like(kernel)
    (grad_native,) = torch.autograd.grad(kernel, sc, grad_kernel)
    (grad_expected,) = torch.autograd.grad(expected, sc, grad_kernel)
    assert_relative(grad_native, grad_expected, RTOL[torch.float32], "grad sc_weight")


def test_backward_op_accepts_non_contiguous_grad_kernel():
    basis = make_basis(steps=ANISOTROPIC_STEPS)
    grad = torch.randn(basis.in_dim, basis.out_dim, *basis.kernel_size).transpose(0, 1)
    assert not grad.is_contiguous()
    args = (basis.basis, basis.paths, basis.self_connections, basis.sc_scales, basis.num_radial,
            basis.radial_numel, basis.sc_numel)
    strided = torch.ops.e3fast.assemble_kernel_backward(grad, *args)
    dense = torch.ops.e3fast.assemble_kernel_backward(grad.contiguous(), *args)
    for actual, wanted in zip(strided, dense):
        assert torch.equal(actual, wanted)


def test_uncovered_weight_columns_get_zero_gradient():
    basis = make_basis()
    # Keep only every other path row: the weights of the dropped rows no longer reach the kernel.
    paths = basis.paths[::2].contiguous()
    grad = torch.randn(basis.out_dim, basis.in_dim, *basis.kernel_size)
    grad_radial, _ = torch.ops.e3fast.assemble_kernel_backward(
        grad, basis.basis, paths, basis.self_connections, basis.sc_scales, basis.num_radial, basis.radial_numel,
        basis.sc_numel)
    covered = torch.zeros(basis.radial_numel, dtype=torch.bool)
    for in_off, mul_in, d1, out_off, mul_out, d3, w_off, stride, b_off in paths.tolist():
        for u in range(mul_in):
            covered[w_off + u * stride:w_off + u * stride + mul_out] = True
    assert covered.any() and not covered.all()
    assert torch.all(grad_radial[:, ~covered] == 0)
    assert torch.all(grad_radial[:, covered].abs().sum(0) > 0)


def test_gradcheck_float64():
    basis = make_basis("2x0e+1x1o", "1x0e+1x1o+1x2e", steps=ANISOTROPIC_STEPS, irreps_sh="0e+1o+2e", num_radial=2)
    radial, sc = random_weights(basis, torch.float64)

    def native(radial, sc):
        return torch.ops.e3fast.assemble_kernel(*native_op_args(basis, radial, sc))

    assert torch.autograd.gradcheck(native, (radial.requires_grad_(), sc.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype):
    basis = make_basis("2x0e+1x1o", "1x0e+1x1o+1x2e", steps=ANISOTROPIC_STEPS, irreps_sh="0e+1o+2e", num_radial=2)
    radial, sc = random_weights(basis, dtype)
    args = native_op_args(basis, radial.requires_grad_(), sc.requires_grad_())
    torch.library.opcheck(torch.ops.e3fast.assemble_kernel.default, args)
    grad = torch.randn(basis.out_dim, basis.in_dim, *basis.kernel_size, dtype=dtype)
    torch.library.opcheck(torch.ops.e3fast.assemble_kernel_backward.default,
                          (grad, basis.basis.to(dtype), basis.paths, basis.self_connections, basis.sc_scales,
                           basis.num_radial, basis.radial_numel, basis.sc_numel))


def test_rejects_bad_inputs():
    basis = make_basis("1x0e+1x1o", "1x0e+1x1o", irreps_sh="0e+1o")
    radial, sc = random_weights(basis)
    good = list(native_op_args(basis, radial, sc))
    cases = {
        "dtype": (2, basis.basis.double()),
        "int64": (3, basis.paths.int()),
        "shape \\[rows, 9\\]": (3, basis.paths[:, :8]),
        "basis has": (2, basis.basis[:-1]),
        "sc_scales has": (5, basis.sc_scales[:-1]),
        "kernel_size": (8, [3, 3]),
    }
    for message, (position, value) in cases.items():
        args = list(good)
        args[position] = value
        with pytest.raises(RuntimeError, match=message):
            torch.ops.e3fast.assemble_kernel(*args)
