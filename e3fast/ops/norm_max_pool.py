"""Norm-based max pooling of voxel irreps fields.

For every sample, field ``f`` (irrep copy of ``d`` components) and output voxel ``o`` with
window ``W(o)`` (kernel ``k``, stride ``s`` per axis, no padding):

.. math::
    n^* = \\operatorname{arg\\,max}_{n \\in W(o)} \\; \\text{score}_f(n), \\qquad
    y_{f,m}(o) = x_{f,m}(n^*)

with ``score = x`` for one-component fields (plain max, as e3nn_Unet does for scalars) and
``score = ||x_f(n)||_2`` otherwise; the first maximum in window order wins. Each sample is pooled
on its own (e3nn_Unet's ``max_pool3d`` reads sample 0's vectors for every sample -- a bug this
op does not reproduce). The window position of ``n*`` is saved for backward in one byte per
field and output voxel (``uint8`` for windows of at most 256 voxels, ``int32`` otherwise):

.. math::  \\partial x_{f,m}(n) = \\sum_{o:\\, n^*(o) = n} \\partial y_{f,m}(o)
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from e3nn import o3

from e3fast import backends, native_extension, triton_kernels
from e3fast.irreps_layout import IrrepsChannels, check_voxel_input, field_table, irreps_channels

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")


def _triple(value, name: str) -> tuple[int, int, int]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or 3 ints, got {value!r}")
    if min(values) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return values


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def pooled_size(size, kernel_size, stride) -> tuple[int, int, int]:
    """Output spatial size (floor mode, no padding)."""
    return tuple((n - k) // s + 1 for n, k, s in zip(size, kernel_size, stride))


def argmax_dtype(kernel_size) -> torch.dtype:
    """Dtype of the saved window positions: one byte when the window fits."""
    return torch.uint8 if math.prod(kernel_size) <= 256 else torch.int32


@functools.lru_cache(maxsize=None)
def _field_table(irreps: str, device: torch.device) -> torch.Tensor:
    return field_table(o3.Irreps(irreps)).to(device)


def norm_max_pool3d_reference(x, irreps, kernel_size, stride) -> torch.Tensor:
    """Pure-PyTorch norm max pooling, per sample; differentiable by autograd."""
    if not isinstance(irreps, IrrepsChannels):
        irreps = irreps_channels(irreps)
    batch = x.shape[0]
    outputs = []
    start = 0
    for mul, d, _ in irreps.entries:
        if mul == 0:  # F.max_pool3d refuses inputs with zero channels
            continue
        values = x[:, start:start + mul * d].reshape(batch, mul, d, *x.shape[2:])
        score = values[:, :, 0] if d == 1 else values.to(_opmath(values.dtype)).norm(dim=2)
        _, index = F.max_pool3d(score, kernel_size, stride, return_indices=True)  # [B, mul, ox, oy, oz]
        out_shape = index.shape[2:]
        index = index.flatten(2)[:, :, None, :].expand(-1, -1, d, -1)
        pooled = values.flatten(3).gather(3, index)
        outputs.append(pooled.reshape(batch, mul * d, *out_shape))
        start += mul * d
    if not outputs:
        return x.new_zeros(batch, 0, *pooled_size(x.shape[2:], kernel_size, stride))
    return torch.cat(outputs, dim=1)


def norm_max_pool3d(x: torch.Tensor, irreps, kernel_size, stride=None,
                    fields: torch.Tensor | None = None) -> torch.Tensor:
    """Norm-based max pooling of ``[B, irreps.dim, x, y, z]`` (see the module docstring).

    ``irreps``: an irreps specification, or its :class:`~e3fast.irreps_layout.IrrepsChannels`
    (what modules pass, so that ``torch.compile`` need not look at e3nn objects). ``fields``: the
    field table on ``x``'s device (:func:`~e3fast.irreps_layout.field_table`), if the caller keeps one.
    """
    if not isinstance(irreps, IrrepsChannels):
        irreps = irreps_channels(irreps)
    check_voxel_input(x, irreps)
    kernel_size = _triple(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else _triple(stride, "stride")
    if any(n < k for n, k in zip(x.shape[2:], kernel_size)):
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} is smaller than kernel_size {kernel_size}")
    backend = backends.select_backend(x.device, "norm_max_pool3d", IMPLEMENTED)
    if backend == "reference":
        return norm_max_pool3d_reference(x, irreps, kernel_size, stride)
    if fields is None:
        fields = _field_table(irreps.text, x.device)
    op = torch.ops.e3fast.norm_max_pool3d_triton if backend == "triton" else torch.ops.e3fast.norm_max_pool3d
    y, _ = op(x, fields, list(kernel_size), list(stride))
    return y


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _register_shape_and_autograd(forward: str, backward: str) -> None:
    """Shape functions of ``e3fast::<forward>`` and ``e3fast::<backward>``, and the autograd of the
    forward op through the backward op: shared by the C++/CUDA ops and their Triton twins."""

    @torch.library.register_fake(f"e3fast::{forward}")
    def _(x, fields, kernel_size, stride):
        out_size = pooled_size(x.shape[2:], kernel_size, stride)
        y = x.new_empty(x.shape[0], x.shape[1], *out_size).contiguous(memory_format=_memory_format(x))
        argmax = x.new_empty(x.shape[0], fields.shape[0], *out_size, dtype=argmax_dtype(kernel_size))
        return y, argmax

    @torch.library.register_fake(f"e3fast::{backward}")
    def _(grad_y, argmax, fields, input_size, kernel_size, stride):
        grad_x = grad_y.new_empty(grad_y.shape[0], grad_y.shape[1], *input_size)
        return grad_x.contiguous(memory_format=_memory_format(grad_y))

    backward_op = getattr(torch.ops.e3fast, backward)

    def setup_context(ctx, inputs, output):
        x, fields, kernel_size, stride = inputs
        _, argmax = output
        ctx.mark_non_differentiable(argmax)
        ctx.save_for_backward(argmax, fields)
        ctx.geometry = (list(x.shape[2:]), kernel_size, stride)

    def backward(ctx, grad_y, _grad_argmax):
        argmax, fields = ctx.saved_tensors
        grad_x = backward_op(grad_y, argmax, fields, *ctx.geometry)
        return grad_x, None, None, None

    torch.library.register_autograd(f"e3fast::{forward}", backward, setup_context=setup_context)


def _define_triton_ops() -> None:
    """``e3fast::norm_max_pool3d_triton`` and its backward: the native schemas, run by the kernels of
    :mod:`e3fast.triton_kernels.norm_max_pool` (imported, with triton, on first call)."""

    @torch.library.custom_op(
        "e3fast::norm_max_pool3d_triton", mutates_args=(),
        schema="(Tensor x, Tensor fields, int[] kernel_size, int[] stride) -> (Tensor, Tensor)")
    def _(x, fields, kernel_size, stride):
        return triton_kernels.load("norm_max_pool").norm_max_pool3d(x, fields, kernel_size, stride)

    @torch.library.custom_op(
        "e3fast::norm_max_pool3d_backward_triton", mutates_args=(),
        schema="(Tensor grad_y, Tensor argmax, Tensor fields, int[] input_size, int[] kernel_size, "
               "int[] stride) -> Tensor")
    def _(grad_y, argmax, fields, input_size, kernel_size, stride):
        return triton_kernels.load("norm_max_pool").norm_max_pool3d_backward(grad_y, argmax, fields, input_size,
                                                                             kernel_size, stride)


if native_extension.native_cpu_available():
    _register_shape_and_autograd("norm_max_pool3d", "norm_max_pool3d_backward")
_define_triton_ops()
_register_shape_and_autograd("norm_max_pool3d_triton", "norm_max_pool3d_backward_triton")
