"""Equivariant normalization + gated nonlinearity in one pass over memory.

Per sample ``b`` (instance mode) or over the batch (batch mode) and per field ``f`` (irrep copy
with ``d`` components ``x_{f,m}`` at ``N`` voxels), as ``e3nn.nn.BatchNorm`` then ``e3nn.nn.Gate``:

.. math::
    \\mu_f = \\langle x_f \\rangle \\;(\\text{even scalars only, else } 0), \\qquad
    \\sigma^2_f = \\frac{1}{N\\, \\delta_f} \\sum_{n, m} (x_{f,m,n} - \\mu_f)^2

    \\hat x_{f,m} = (x_{f,m} - \\mu_f)\\, \\gamma_f\\, (\\sigma^2_f + \\epsilon)^{-1/2} + \\beta_f

with ``delta_f = d`` (``"component"``) or 1 (``"norm"``), ``gamma`` one weight per field and
``beta`` one bias per even scalar. Then output channel ``c`` is

.. math::  y_c = a_c\\, \\phi_c(\\hat x_{s(c)}) \\cdot \\big(a'_c\\, \\psi_c(\\hat x_{g(c)})\\big)^{[g(c) \\ge 0]}

(``s``, ``g``, ``phi``, ``psi``, ``a``: the tables of :mod:`e3fast.gate_layout`). In batch mode
with ``training=False`` the running statistics replace ``mu`` and ``sigma^2``; in training they
are updated in place as e3nn does (momentum average of the biased batch statistics).

The backward pass recomputes ``hat x`` from the saved input and the per-field statistics instead
of storing intermediates. With ``z = hat x`` before the affine and ``g = dL/d hat x``:

.. math::
    \\partial x = \\gamma (\\sigma^2 + \\epsilon)^{-1/2} \\big(g - [\\text{scalar}]\\langle g \\rangle
    - z \\langle g z \\rangle d_f / \\delta_f \\big)

(the two means over the ``N d_f`` values of a statistics group), ``d gamma = sum g z``, ``d beta = sum g``.
"""
from __future__ import annotations

import torch
from e3nn import o3

from e3fast import backends, native_extension, triton_kernels
from e3fast.gate_layout import ACTIVATIONS, GateLayout, activation_scales, gate_layout, identity_layout
from e3fast.irreps_layout import check_same_device, check_voxel_input, field_table, irrep_fields, irreps_channels

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")

# Statistics modes shared with the native kernels.
MODE_NONE, MODE_INSTANCE, MODE_BATCH, MODE_RUNNING = 0, 1, 2, 3
NORMALIZATIONS = ("instance", "batch", "none")


class NormGateSpec:
    """Everything about a norm+gate layer that is not a tensor: irreps, tables, options."""

    def __init__(self, layout: GateLayout, irrep_normalization: str = "component"):
        self.layout = layout
        self.irreps_in: o3.Irreps = layout.irreps_in
        self.irreps_out: o3.Irreps = layout.irreps_out
        self.irrep_normalization = irrep_normalization
        self.channels_in = irreps_channels(self.irreps_in)
        self.channels_out = irreps_channels(self.irreps_out)
        self.gate_is_identity = layout.is_identity
        self.fields = irrep_fields(self.irreps_in)
        self.num_fields = len(self.fields)
        self.num_scalars = sum(f.is_scalar for f in self.fields)
        self.act_scales = activation_scales()
        self._field_table = field_table(self.irreps_in, irrep_normalization)
        self._gate_table = layout.table()
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_gate(cls, irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated,
                 irrep_normalization: str = "component") -> "NormGateSpec":
        return cls(gate_layout(irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated),
                   irrep_normalization)

    @classmethod
    def norm_only(cls, irreps, irrep_normalization: str = "component") -> "NormGateSpec":
        return cls(identity_layout(irreps), irrep_normalization)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fields, gates)`` int64 tables on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = (self._field_table.to(device), self._gate_table.to(device))
        return self._device_tables[device]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def norm_gate_reference(x, spec: NormGateSpec, weight, bias, running_mean, running_var, mode: int, eps: float):
    """Pure-PyTorch norm + gate. Returns ``(y, mean [B|1, S], var [B|1, F])``."""
    dtype = _opmath(x.dtype)
    batch, channels = x.shape[:2]
    flat = x.to(dtype).reshape(batch, channels, x.shape[2:].numel())
    normalized, means, variances = [], [], []
    start = scalar = field = 0
    for mul, d, is_scalar in spec.channels_in.entries:
        values = flat[:, start:start + mul * d].reshape(batch, mul, d, flat.shape[-1])
        if mode != MODE_NONE:
            if is_scalar:
                if mode == MODE_INSTANCE:
                    mean = values.mean(dim=(2, 3))
                elif mode == MODE_BATCH:
                    mean = values.mean(dim=(0, 2, 3))[None]
                else:
                    mean = running_mean[scalar:scalar + mul].to(dtype)[None]
                means.append(mean)
                values = values - mean[:, :, None, None]
                scalar += mul
            squares = values.pow(2).mean(2) if spec.irrep_normalization == "component" else values.pow(2).sum(2)
            if mode == MODE_INSTANCE:
                var = squares.mean(-1)
            elif mode == MODE_BATCH:
                var = squares.mean(dim=(0, 2))[None]
            else:
                var = running_var[field:field + mul].to(dtype)[None]
            variances.append(var)
            scale = (var + eps).pow(-0.5)
            if weight is not None:
                scale = scale * weight[field:field + mul].to(dtype)
            values = values * scale[:, :, None, None]
            if bias is not None and is_scalar:
                values = values + bias[scalar - mul:scalar].to(dtype)[None, :, None, None]
        normalized.append(values.reshape(batch, mul * d, flat.shape[-1]))
        start += mul * d
        field += mul
    normalized = torch.cat(normalized, dim=1) if normalized else flat
    y = _apply_gate(normalized, spec)
    y = y.reshape(batch, spec.channels_out.dim, *x.shape[2:]).to(x.dtype).contiguous(memory_format=_memory_format(x))
    stats_batch = batch if mode == MODE_INSTANCE else 1
    mean = torch.cat(means, dim=1) if means else flat.new_zeros(stats_batch, 0)
    var = torch.cat(variances, dim=1) if variances else flat.new_zeros(stats_batch, 0)
    return y, mean, var


def _apply_gate(normalized: torch.Tensor, spec: NormGateSpec) -> torch.Tensor:
    """``act(x[source]) * gate_act(x[gate])`` per output channel (see gate_layout)."""
    layout = spec.layout
    if spec.gate_is_identity:
        return normalized
    device = normalized.device
    source = torch.tensor(layout.source, device=device, dtype=torch.long)
    values = normalized.index_select(1, source)
    out = values.new_zeros(values.shape)
    for act_id, name in enumerate(ACTIVATIONS):
        channels = [c for c, a in enumerate(layout.act) if a == act_id]
        if channels:
            index = torch.tensor(channels, device=device, dtype=torch.long)
            activated = ACTIVATIONS[name](values.index_select(1, index)) * spec.act_scales[act_id]
            out = out.index_copy(1, index, activated)
    gated = [c for c, g in enumerate(layout.gate) if g >= 0]
    if not gated:
        return out
    factors = torch.ones_like(out)
    for act_id, name in enumerate(ACTIVATIONS):
        channels = [c for c in gated if layout.gate_act[c] == act_id]
        if channels:
            index = torch.tensor(channels, device=device, dtype=torch.long)
            gates = torch.tensor([layout.gate[c] for c in channels], device=device, dtype=torch.long)
            factor = ACTIVATIONS[name](normalized.index_select(1, gates)) * spec.act_scales[act_id]
            factors = factors.index_copy(1, index, factor)
    return out * factors


def _mode(normalization: str, training: bool) -> int:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "none":
        return MODE_NONE
    if normalization == "instance":
        return MODE_INSTANCE
    return MODE_BATCH if training else MODE_RUNNING


def _check_parameters(x, spec: NormGateSpec, weight, bias, running_mean, running_var, mode: int) -> None:
    expected = {"weight": (weight, spec.num_fields), "bias": (bias, spec.num_scalars),
                "running_mean": (running_mean, spec.num_scalars), "running_var": (running_var, spec.num_fields)}
    for name, (tensor, size) in expected.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor")
        if tuple(tensor.shape) != (size,):
            raise ValueError(f"{name} must have shape [{size}] for irreps {spec.irreps_in}, got {list(tensor.shape)}")
    if mode == MODE_NONE and (weight is not None or bias is not None):
        raise ValueError("normalization='none' takes no weight or bias")
    if mode == MODE_RUNNING and (running_mean is None or running_var is None):
        raise ValueError("batch normalization in eval mode needs running_mean and running_var")
    check_same_device(input=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)


def norm_gate(x: torch.Tensor, spec: NormGateSpec, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, running_mean: torch.Tensor | None = None,
              running_var: torch.Tensor | None = None, *, normalization: str = "instance",
              training: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """Fused equivariant normalization and gate of a voxel tensor ``[B, irreps_in.dim, x, y, z]``.

    Channels-first and channels-last-3d inputs are both read in place; the output has the
    input's memory format. See the module docstring for the math.
    """
    check_voxel_input(x, spec.channels_in)
    mode = _mode(normalization, training)
    _check_parameters(x, spec, weight, bias, running_mean, running_var, mode)
    backend = backends.select_backend(x.device, "norm_gate", IMPLEMENTED)
    if backend == "reference":
        y, mean, var = norm_gate_reference(x, spec, weight, bias, running_mean, running_var, mode, eps)
    else:
        op = torch.ops.e3fast.norm_gate_triton if backend == "triton" else torch.ops.e3fast.norm_gate
        fields, gates = spec.tables(x.device)
        y, mean, var = op(x, weight, bias, running_mean, running_var, fields, gates, spec.act_scales,
                          spec.num_scalars, mode, eps)
    if mode == MODE_BATCH and running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.reshape(-1).to(running_mean.dtype), momentum)
            running_var.lerp_(var.reshape(-1).to(running_var.dtype), momentum)
    return y


def _register_shape_and_autograd(forward: str, backward: str) -> None:
    """Shape functions of ``e3fast::<forward>`` and ``e3fast::<backward>``, and the autograd of the
    forward op through the backward op: shared by the C++/CUDA ops and their Triton twins."""

    @torch.library.register_fake(f"e3fast::{forward}")
    def _(x, weight, bias, running_mean, running_var, fields, gates, act_scales, num_scalars, mode, eps):
        stats_dtype = _opmath(x.dtype)
        batch = x.shape[0] if mode == MODE_INSTANCE else 1
        num_fields = fields.shape[0] if mode != MODE_NONE else 0
        num_scalars = num_scalars if mode != MODE_NONE else 0
        y = x.new_empty(x.shape[0], gates.shape[0], *x.shape[2:]).contiguous(memory_format=_memory_format(x))
        return y, x.new_empty(batch, num_scalars, dtype=stats_dtype), x.new_empty(batch, num_fields,
                                                                                  dtype=stats_dtype)

    @torch.library.register_fake(f"e3fast::{backward}")
    def _(grad_y, x, weight, bias, mean, var, fields, gates, act_scales, mode, eps):
        stats_dtype = _opmath(x.dtype)
        grad_x = torch.empty_like(x, memory_format=_memory_format(x))
        return grad_x, x.new_empty(fields.shape[0], dtype=stats_dtype), x.new_empty(mean.shape[1], dtype=stats_dtype)

    backward_op = getattr(torch.ops.e3fast, backward)

    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, fields, gates, act_scales, _, mode, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, bias, mean, var, fields, gates)
        ctx.act_scales, ctx.mode, ctx.eps = act_scales, mode, eps

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var, fields, gates = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(
            grad_y, x, weight, bias, mean, var, fields, gates, ctx.act_scales, ctx.mode, ctx.eps)
        grad_weight = grad_weight.to(weight.dtype) if weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if bias is not None else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None

    torch.library.register_autograd(f"e3fast::{forward}", backward, setup_context=setup_context)


def _define_triton_ops() -> None:
    """``e3fast::norm_gate_triton`` and its backward: the native schemas, run by the kernels of
    :mod:`e3fast.triton_kernels.norm_gate` (imported, with triton, on first call)."""

    @torch.library.custom_op(
        "e3fast::norm_gate_triton", mutates_args=(),
        schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor fields, "
               "Tensor gates, float[] act_scales, int num_scalars, int mode, float eps) -> (Tensor, Tensor, Tensor)")
    def _(x, weight, bias, running_mean, running_var, fields, gates, act_scales, num_scalars, mode, eps):
        return triton_kernels.load("norm_gate").norm_gate(x, weight, bias, running_mean, running_var, fields, gates,
                                                          act_scales, num_scalars, mode, eps)

    @torch.library.custom_op(
        "e3fast::norm_gate_backward_triton", mutates_args=(),
        schema="(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, Tensor fields, "
               "Tensor gates, float[] act_scales, int mode, float eps) -> (Tensor, Tensor, Tensor)")
    def _(grad_y, x, weight, bias, mean, var, fields, gates, act_scales, mode, eps):
        return triton_kernels.load("norm_gate").norm_gate_backward(grad_y, x, weight, bias, mean, var, fields, gates,
                                                                   act_scales, mode, eps)


if native_extension.native_cpu_available():
    _register_shape_and_autograd("norm_gate", "norm_gate_backward")
_define_triton_ops()
_register_shape_and_autograd("norm_gate_triton", "norm_gate_backward_triton")
