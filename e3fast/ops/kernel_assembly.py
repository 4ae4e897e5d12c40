"""Steerable kernel assembly: radial + self-connection weights -> dense conv3d kernel.

.. math::
    K[w m_3, u m_1, t] = \\sum_p \\sum_r B_p[t, m_1, m_3, r]\\, W[r, o_p + u s_p + w]
    + [t = t_0] \\sum_{sc} \\alpha\\, V[o + u \\mu_{out} + w]\\, \\delta_{m_1 m_3}

(see :mod:`e3fast.steerable_basis`). The backward pass is the transpose:

.. math::
    \\partial W[r, o_p + u s_p + w] = \\sum_{t, m_1, m_3} B_p[t, m_1, m_3, r]\\, \\partial K[w m_3, u m_1, t],
    \\qquad \\partial V[o + u\\mu_{out} + w] = \\alpha \\sum_m \\partial K[w m, u m, t_0]

Low-precision inputs are accumulated in float32.
"""
from __future__ import annotations

import torch

from e3fast import backends, native_extension, triton_kernels
from e3fast.irreps_layout import check_same_device, check_same_dtype
from e3fast.steerable_basis import SteerableKernelBasis

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _path_weights(radial_weight, offset: int, mul_in: int, mul_out: int, u_stride: int) -> torch.Tensor:
    """Columns ``offset + u * u_stride + w`` of the radial weights as ``[R, mul_in, mul_out]`` (a view
    when ``u_stride == mul_out``, i.e. one spherical harmonic per order)."""
    columns = radial_weight.narrow(1, offset, (mul_in - 1) * u_stride + mul_out)
    if u_stride != mul_out:
        columns = torch.nn.functional.pad(columns, (0, u_stride - mul_out))
    return columns.reshape(-1, mul_in, u_stride)[:, :, :mul_out]


def assemble_kernel_reference(radial_weight: torch.Tensor, sc_weight: torch.Tensor,
                              basis: SteerableKernelBasis) -> torch.Tensor:
    """Pure-PyTorch kernel assembly; differentiable by autograd."""
    dtype = _opmath(radial_weight.dtype)
    radial_weight, sc_weight = radial_weight.to(dtype), sc_weight.to(dtype)
    taps, num_radial = basis.num_taps, basis.num_radial
    kernel = radial_weight.new_zeros(basis.out_dim, basis.in_dim, taps)
    flat_basis = basis.basis.to(dtype)
    for in_off, mul_in, dim_in, out_off, mul_out, dim_out, w_off, u_stride, b_off in basis.path_rows:
        block_basis = flat_basis[b_off:b_off + taps * dim_in * dim_out * num_radial]
        block_basis = block_basis.view(taps, dim_in, dim_out, num_radial)
        weights = _path_weights(radial_weight, w_off, mul_in, mul_out, u_stride)  # [R, u, w]
        block = torch.einsum("tabr,ruw->wbuat", block_basis, weights)
        kernel[out_off:out_off + mul_out * dim_out, in_off:in_off + mul_in * dim_in] += block.reshape(
            mul_out * dim_out, mul_in * dim_in, taps)
    centre = taps // 2
    for (in_off, mul_in, out_off, mul_out, dim, w_off), scale in zip(basis.sc_rows, basis.sc_scales):
        weights = sc_weight[w_off:w_off + mul_in * mul_out].view(mul_in, mul_out) * scale
        eye = torch.eye(dim, dtype=dtype, device=kernel.device)
        block = torch.einsum("uw,mn->wmun", weights, eye).reshape(mul_out * dim, mul_in * dim)
        kernel[out_off:out_off + mul_out * dim, in_off:in_off + mul_in * dim, centre] += block
    return kernel.view(basis.out_dim, basis.in_dim, *basis.kernel_size).to(radial_weight.dtype)


def _native_assemble(radial_weight, sc_weight, basis: SteerableKernelBasis, backend: str) -> torch.Tensor:
    op = torch.ops.e3fast.assemble_kernel_triton if backend == "triton" else torch.ops.e3fast.assemble_kernel
    return op(
        radial_weight, sc_weight, basis.basis.to(radial_weight.dtype), basis.paths, basis.self_connections,
        basis.sc_scales, basis.out_dim, basis.in_dim, list(basis.kernel_size))


def _check_inputs(radial_weight, sc_weight, basis: SteerableKernelBasis) -> None:
    for name, tensor in (("radial_weight", radial_weight), ("sc_weight", sc_weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {tensor.dtype}")
    expected = (basis.num_radial, basis.radial_numel)
    if basis.num_radial and tuple(radial_weight.shape) != expected:
        raise ValueError(f"radial_weight must have shape {list(expected)} for {basis.irreps_in} -> "
                         f"{basis.irreps_out}, got {list(radial_weight.shape)}")
    if tuple(sc_weight.shape) != (basis.sc_numel,):
        raise ValueError(f"sc_weight must have shape [{basis.sc_numel}] for {basis.irreps_in} -> "
                         f"{basis.irreps_out}, got {list(sc_weight.shape)}")
    check_same_dtype(radial_weight=radial_weight, sc_weight=sc_weight)
    check_same_device(radial_weight=radial_weight, sc_weight=sc_weight, basis=basis.basis)


def assemble_kernel(radial_weight: torch.Tensor, sc_weight: torch.Tensor,
                    basis: SteerableKernelBasis) -> torch.Tensor:
    """Dense kernel ``[out_dim, in_dim, kx, ky, kz]`` from the layer's weights.

    ``radial_weight``: ``[R, tp.weight_numel]`` (e3nn's ``Convolution.weight``);
    ``sc_weight``: ``[linear.weight_numel]`` (e3nn's ``Convolution.sc.weight``), folded into the
    centre tap. For a basis without lattice pass an empty ``radial_weight``.
    """
    _check_inputs(radial_weight, sc_weight, basis)
    backend = backends.select_backend(radial_weight.device, "assemble_kernel", IMPLEMENTED)
    if backend == "reference":
        return assemble_kernel_reference(radial_weight, sc_weight, basis)
    if basis.num_radial == 0:
        radial_weight = radial_weight.new_zeros(0, 0)
    return _native_assemble(radial_weight, sc_weight, basis, backend)


def _register_shape_and_autograd(forward: str, backward: str) -> None:
    """Shape functions of ``e3fast::<forward>`` and ``e3fast::<backward>``, and the autograd of the
    forward op through the backward op: shared by the C++/CUDA ops and their Triton twins."""

    @torch.library.register_fake(f"e3fast::{forward}")
    def _(radial_weight, sc_weight, basis, paths, self_connections, sc_scales, out_dim, in_dim, kernel_size):
        torch._check(radial_weight.dtype == sc_weight.dtype)
        return radial_weight.new_empty(out_dim, in_dim, *kernel_size)

    @torch.library.register_fake(f"e3fast::{backward}")
    def _(grad_kernel, basis, paths, self_connections, sc_scales, num_radial, radial_numel, sc_numel):
        return (grad_kernel.new_empty(num_radial, radial_numel), grad_kernel.new_empty(sc_numel))

    backward_op = getattr(torch.ops.e3fast, backward)

    def setup_context(ctx, inputs, output):
        radial_weight, sc_weight, basis, paths, self_connections, sc_scales, *_ = inputs
        ctx.save_for_backward(basis, paths, self_connections)
        ctx.sc_scales = sc_scales
        ctx.shapes = (radial_weight.shape[0], radial_weight.shape[1], sc_weight.shape[0])

    def backward(ctx, grad_kernel):
        basis, paths, self_connections = ctx.saved_tensors
        grad_radial, grad_sc = backward_op(grad_kernel, basis, paths, self_connections, ctx.sc_scales, *ctx.shapes)
        return grad_radial, grad_sc, None, None, None, None, None, None, None

    torch.library.register_autograd(f"e3fast::{forward}", backward, setup_context=setup_context)


def _define_triton_ops() -> None:
    """``e3fast::assemble_kernel_triton`` and its backward: the native schemas, run by the kernels of
    :mod:`e3fast.triton_kernels.kernel_assembly` (imported, with triton, on first call)."""

    @torch.library.custom_op(
        "e3fast::assemble_kernel_triton", mutates_args=(),
        schema="(Tensor radial_weight, Tensor sc_weight, Tensor basis, Tensor paths, Tensor self_connections, "
               "float[] sc_scales, int out_dim, int in_dim, int[] kernel_size) -> Tensor")
    def _(radial_weight, sc_weight, basis, paths, self_connections, sc_scales, out_dim, in_dim, kernel_size):
        return triton_kernels.load("kernel_assembly").assemble_kernel(
            radial_weight, sc_weight, basis, paths, self_connections, sc_scales, out_dim, in_dim, kernel_size)

    @torch.library.custom_op(
        "e3fast::assemble_kernel_backward_triton", mutates_args=(),
        schema="(Tensor grad_kernel, Tensor basis, Tensor paths, Tensor self_connections, float[] sc_scales, "
               "int num_radial, int radial_numel, int sc_numel) -> (Tensor, Tensor)")
    def _(grad_kernel, basis, paths, self_connections, sc_scales, num_radial, radial_numel, sc_numel):
        return triton_kernels.load("kernel_assembly").assemble_kernel_backward(
            grad_kernel, basis, paths, self_connections, sc_scales, num_radial, radial_numel, sc_numel)


if native_extension.native_cpu_available():
    _register_shape_and_autograd("assemble_kernel", "assemble_kernel_backward")
_define_triton_ops()
_register_shape_and_autograd("assemble_kernel_triton", "assemble_kernel_backward_triton")
