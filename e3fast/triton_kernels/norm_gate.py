"""Triton kernels of ``e3fast::norm_gate`` and ``e3fast::norm_gate_backward``.

Same semantics as the C++ kernels (see :mod:`e3fast.ops.norm_gate`). ``x`` is read as
``[B, C_in, N]`` (NCDHW or channels_last_3d in place). A statistics group ``g`` is one sample
(instance mode, ``N_g = N``) or the batch (batch mode, ``N_g = B N``); field ``f`` owns channels
``c = start_f + m``, ``m < d_f``, with divisor ``delta_f``.

Statistics, with one shift per channel (``s_c``: x at the group's first voxel) so that a large
common offset does not cancel:

.. math::
    S_1 = \\sum (x_c - s_c), \\quad S_2 = \\sum (x_c - s_c)^2, \\qquad
    \\mu_f = s_c + S_1 / N_g, \\quad
    \\sigma^2_f = (S_2 - S_1^2 / N_g) / (N_g \\delta_f) \\;\\; \\text{(even scalars)}, \\quad
    \\sigma^2_f = \\sum_m (S_2 + s_c (2 S_1 + N_g s_c)) / (N_g \\delta_f) \\;\\; \\text{(others, } \\mu_f = 0)

Apply, with ``x_hat = (x - mu) (sigma^2 + eps)^{-1/2}``, ``z = gamma x_hat + beta``:

.. math::  y_o = a_o \\phi_o(z_{s(o)}) \\cdot \\big(a'_o \\psi_o(z_{g(o)})\\big)^{[g(o) \\ge 0]}

Backward, through the inverse gate tables (the outputs that read channel ``c`` as source / gate):

.. math::
    g_c = \\sum_{o: s(o) = c} \\partial y_o a_o \\phi'_o(z_c) G_o + \\sum_{o: g(o) = c} \\partial y_o a_o
    \\phi_o(z_{s(o)}) a'_o \\psi'_o(z_c), \\qquad
    \\partial x = k_1 g + k_2 \\hat x + k_3

with ``k1 = gamma (sigma^2 + eps)^{-1/2}``, ``k2 = -k1 sum(g x_hat) / (N_g delta)``,
``k3 = -k1 sum(g) / N_g`` (even scalars) for batch statistics, ``k2 = k3 = 0`` for running
statistics, ``dx = g`` without normalization; ``d gamma_f = sum g x_hat``, ``d beta = sum g``.

Passes over memory: forward reads x twice (statistics, then apply: each output channel gathers
its source and gate channels, re-read from cache); backward reads x and dy twice with batch
statistics (sums, then dx), once otherwise, recomputing ``z`` instead of storing it. Sums are
two-stage: each program reduces a chunk of voxels in the arithmetic dtype (fp32 for fp32 and
half precision) into per-(chunk, channel) partials, and one small kernel per field adds the
partials in float64 in a fixed order (deterministic). Tiles are ``[channels, voxels]`` for NCDHW
and ``[voxels, channels]`` for channels-last, so that the contiguous axis is the fastest. Only
the activations that occur in the gate table are evaluated (compile-time bit masks), and tiles
skip the gate work and the fan-out steps that none of their channels has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from e3fast.triton_kernels import tables
from e3fast.triton_kernels.conversions import to_element_type
from e3fast.triton_kernels.layout import (check_floating, dense_voxels, is_channels_last, memory_format_of, opmath_dtype,
                                          per_channel, per_voxel, tl_dtype, voxel_strides)
from e3fast.triton_kernels.tuning import INTERPRETED, autotune, largest

MODE_NONE, MODE_INSTANCE, MODE_BATCH, MODE_RUNNING = 0, 1, 2, 3
NUM_ACTIVATIONS = 6
RELU = tl.constexpr(1)
TANH = tl.constexpr(2)
SIGMOID = tl.constexpr(3)
SILU = tl.constexpr(4)
ABS = tl.constexpr(5)
RELU_BIT = tl.constexpr(1 << 1)
TANH_BIT = tl.constexpr(1 << 2)
SIGMOID_BIT = tl.constexpr(1 << 3)
SILU_BIT = tl.constexpr(1 << 4)
ABS_BIT = tl.constexpr(1 << 5)
COEFFICIENTS = tl.constexpr(5)  # per (group, channel): mean (high, low parts), 1/std, gamma, beta
GRADIENT_COEFFICIENTS = tl.constexpr(3)  # per (group, channel): k1, k2, k3
MAX_CHUNK = 1024  # voxels per program of the reducing passes

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldTables:
    table: torch.Tensor  # int32 [F, 4]: start, dim, scalar index (-1: none), divisor
    num_fields: int
    num_scalars: int
    max_dim: int  # a power of two >= every field's dim


@dataclass(frozen=True)
class GateTables:
    rows: torch.Tensor  # int32 [C_out, 4]: source, act, gate (-1: none), gate act
    scales: torch.Tensor  # opmath [C_out, 2]: a(act), a(gate act)
    source_of: torch.Tensor  # int32 [C_in, max_source_fanout]: outputs reading the channel as source (-1 pads)
    gate_of: torch.Tensor  # int32 [C_in, max_gate_fanout]: outputs gated by the channel (-1 pads)
    out_channels: int
    max_source_fanout: int
    max_gate_fanout: int
    source_acts: int  # bit mask of the activation ids applied to sources
    gate_acts: int  # bit mask of the activation ids applied to gates (0: no gate)


def _check_table_shape(table: torch.Tensor, name: str) -> None:
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 4:
        raise RuntimeError(f"e3fast::norm_gate: {name} must be an int64 tensor [rows, 4], got {table.dtype} "
                           f"{list(table.shape)}")


def _build_field_tables(host: torch.Tensor, channels: int, device: torch.device) -> FieldTables:
    rows = host.tolist()
    next_channel = scalars = 0
    for f, (start, dim, scalar, divisor) in enumerate(rows):
        if start != next_channel or dim < 1 or divisor < 1:
            raise RuntimeError(f"e3fast::norm_gate: fields row {f} = ({start}, {dim}, {scalar}, {divisor}) must "
                               f"continue the channel tiling at channel {next_channel} with dim >= 1 and divisor >= 1")
        if scalar != -1 and (scalar != scalars or dim != 1):
            raise RuntimeError(f"e3fast::norm_gate: fields row {f} has scalar index {scalar}; expected -1 or "
                               f"{scalars} for a dim-1 field")
        scalars += scalar >= 0
        next_channel += dim
    if next_channel != channels:
        raise RuntimeError(f"e3fast::norm_gate: fields cover {next_channel} channels but the input has {channels}")
    max_dim = triton.next_power_of_2(max([row[1] for row in rows], default=1))
    return FieldTables(host.to(device=device, dtype=torch.int32), len(rows), scalars, max_dim)


def field_tables(fields: torch.Tensor, channels: int) -> FieldTables:
    _check_table_shape(fields, "fields")
    return tables.digest((fields,), ("norm_gate fields", channels),
                         lambda host: _build_field_tables(host, channels, fields.device))


def _inverse_table(lists: list[list[int]]) -> tuple[torch.Tensor, int]:
    width = max((len(entries) for entries in lists), default=0)
    padded = [entries + [-1] * (width - len(entries)) for entries in lists]
    return torch.tensor(padded, dtype=torch.int32).reshape(len(lists), width), width


def _build_gate_tables(host: torch.Tensor, act_scales: tuple[float, ...], channels: int, dtype: torch.dtype,
                       device: torch.device) -> GateTables:
    rows = host.tolist()
    source_of: list[list[int]] = [[] for _ in range(channels)]
    gate_of: list[list[int]] = [[] for _ in range(channels)]
    for o, (source, act, gate, gate_act) in enumerate(rows):
        if not (0 <= source < channels and -1 <= gate < channels and 0 <= act < NUM_ACTIVATIONS
                and 0 <= gate_act < NUM_ACTIVATIONS):
            raise RuntimeError(f"e3fast::norm_gate: gates row {o} = ({source}, {act}, {gate}, {gate_act}) is out of "
                               f"range for {channels} input channels and {NUM_ACTIVATIONS} activations")
        if gate == source:
            raise RuntimeError(f"e3fast::norm_gate: gates row {o} gates channel {source} by itself")
        source_of[source].append(o)
        if gate >= 0:
            gate_of[gate].append(o)
    scales = [[act_scales[act], act_scales[gate_act]] for _, act, _, gate_act in rows]
    source_table, max_source = _inverse_table(source_of)
    gate_table, max_gate = _inverse_table(gate_of)
    return GateTables(
        rows=host.to(device=device, dtype=torch.int32),
        scales=torch.tensor(scales, dtype=torch.float64).reshape(len(rows), 2).to(device=device, dtype=dtype),
        source_of=source_table.to(device), gate_of=gate_table.to(device), out_channels=len(rows),
        max_source_fanout=max_source, max_gate_fanout=max_gate,
        source_acts=sum({1 << act for _, act, _, _ in rows}),
        gate_acts=sum({1 << gate_act for _, _, gate, gate_act in rows if gate >= 0}))


def gate_tables(gates: torch.Tensor, act_scales, channels: int, dtype: torch.dtype) -> GateTables:
    _check_table_shape(gates, "gates")
    act_scales = tuple(float(a) for a in act_scales)
    if len(act_scales) != NUM_ACTIVATIONS:
        raise RuntimeError(f"e3fast::norm_gate: act_scales must have {NUM_ACTIVATIONS} entries (one per activation "
                           f"id), got {len(act_scales)}")
    return tables.digest((gates,), ("norm_gate gates", act_scales, channels, dtype),
                         lambda host: _build_gate_tables(host, act_scales, channels, dtype, gates.device))


# ---------------------------------------------------------------------------------------------
# Tile helpers: a tile is [channels, voxels] (NCDHW) or [voxels, channels] (channels-last)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_zeros(BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        out = tl.zeros((BLOCK_N, BLOCK_C), DTYPE)
    else:
        out = tl.zeros((BLOCK_C, BLOCK_N), DTYPE)
    return out


@triton.jit
def _sum_over_voxels(tile, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        out = tl.sum(tile, axis=0)
    else:
        out = tl.sum(tile, axis=1)
    return out


@triton.jit
def _tile_offsets(channel, voxel, stride_c, stride_n, CHANNELS_LAST: tl.constexpr):
    """Element offsets of (channel, voxel) pairs, in int64."""
    return (per_channel(channel.to(tl.int64), CHANNELS_LAST) * stride_c
            + per_voxel(voxel.to(tl.int64), CHANNELS_LAST) * stride_n)


# ---------------------------------------------------------------------------------------------
# Activations (ids of e3fast.gate_layout)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _activation(v, act, ACTS: tl.constexpr):
    """act(v) elementwise, ``act`` the activation id (broadcast against ``v``); ``ACTS``: the bit mask
    of the ids that occur, so that only those are evaluated (exp only for tanh, sigmoid, silu).
    The constant comes first in ``BIT & ACTS``: the interpreter has no int & constexpr."""
    out = v
    if RELU_BIT & ACTS:
        out = tl.where(act == RELU, tl.where(v > 0, v, 0.0), out)
    if ABS_BIT & ACTS:
        out = tl.where(act == ABS, tl.abs(v), out)
    if (SIGMOID_BIT | SILU_BIT) & ACTS:
        sigmoid = _sigmoid(v)
        out = tl.where(act == SIGMOID, sigmoid, out)
        out = tl.where(act == SILU, v * sigmoid, out)
    if TANH_BIT & ACTS:
        out = tl.where(act == TANH, 2.0 * _sigmoid(2.0 * v) - 1.0, out)
    return out


@triton.jit
def _activation_derivative(v, act, ACTS: tl.constexpr):
    """act'(v) elementwise (relu'(0) = abs'(0) = 0, as torch); ``ACTS`` as for :func:`_activation`."""
    out = tl.full(v.shape, 1.0, v.dtype)
    if RELU_BIT & ACTS:
        out = tl.where(act == RELU, (v > 0).to(v.dtype), out)
    if ABS_BIT & ACTS:
        out = tl.where(act == ABS, (v > 0).to(v.dtype) - (v < 0).to(v.dtype), out)
    if (SIGMOID_BIT | SILU_BIT) & ACTS:
        sigmoid = _sigmoid(v)
        out = tl.where(act == SIGMOID, sigmoid * (1.0 - sigmoid), out)
        out = tl.where(act == SILU, sigmoid * (1.0 + v * (1.0 - sigmoid)), out)
    if TANH_BIT & ACTS:
        tanh = 2.0 * _sigmoid(2.0 * v) - 1.0
        out = tl.where(act == TANH, 1.0 - tanh * tanh, out)
    return out


@triton.jit
def _standardized(x_base, coef_group, channel, voxel, mask, x_sc, x_sn, OPMATH: tl.constexpr,
                  NORMALIZE: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """``(x_hat, z)`` of the tile at ``channel`` (valid indices) and ``voxel``; ``x`` itself without
    normalization."""
    x = tl.load(x_base + _tile_offsets(channel, voxel, x_sc, x_sn, CHANNELS_LAST), mask=mask, other=0.0).to(OPMATH)
    if NORMALIZE:
        coef = coef_group + channel * COEFFICIENTS
        mean_high = per_channel(tl.load(coef), CHANNELS_LAST)
        mean_low = per_channel(tl.load(coef + 1), CHANNELS_LAST)
        inv_std = per_channel(tl.load(coef + 2), CHANNELS_LAST)
        gamma = per_channel(tl.load(coef + 3), CHANNELS_LAST)
        beta = per_channel(tl.load(coef + 4), CHANNELS_LAST)
        x_hat = ((x - mean_high) - mean_low) * inv_std
        z = x_hat * gamma + beta
    else:
        x_hat = x
        z = x
    return x_hat, z


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _moments_kernel(x_ptr, partial_ptr, N, C, x_sb, x_sc, x_sn,
                    SHIFT_PER_SAMPLE: tl.constexpr, OPMATH: tl.constexpr, CHUNK: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """partial[b * chunks + chunk, c] = (sum (x - s_c), sum (x - s_c)^2) over the chunk's voxels
    (grid: chunks, channel blocks, batch)."""
    b = tl.program_id(2)
    row = b * tl.num_programs(0) + tl.program_id(0)
    first_voxel = tl.program_id(0) * CHUNK
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    channel = tl.where(channel_ok, channel, 0)
    shift_ptr = x_ptr  # the group's first voxel: sample b's (instance) or sample 0's (batch)
    if SHIFT_PER_SAMPLE:
        shift_ptr = x_ptr + b.to(tl.int64) * x_sb
    shift = tl.load(shift_ptr + channel.to(tl.int64) * x_sc).to(OPMATH)
    shift = per_channel(shift, CHANNELS_LAST)
    x_base = x_ptr + b.to(tl.int64) * x_sb
    sums = _tile_zeros(BLOCK_C, BLOCK_N, OPMATH, CHANNELS_LAST)
    squares = _tile_zeros(BLOCK_C, BLOCK_N, OPMATH, CHANNELS_LAST)
    for step in range(CHUNK // BLOCK_N):
        voxel = first_voxel + step * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = per_channel(channel_ok, CHANNELS_LAST) & per_voxel(voxel < N, CHANNELS_LAST)
        x = tl.load(x_base + _tile_offsets(channel, voxel, x_sc, x_sn, CHANNELS_LAST), mask=mask, other=0.0)
        d = tl.where(mask, x.to(OPMATH) - shift, 0.0)
        sums += d
        squares += d * d
    out = partial_ptr + (row * C + channel) * 2
    tl.store(out, _sum_over_voxels(sums, CHANNELS_LAST), mask=channel_ok)
    tl.store(out + 1, _sum_over_voxels(squares, CHANNELS_LAST), mask=channel_ok)


@triton.jit
def _field_sums(partial_ptr, first_row, rows, C, channel, channel_ok, BLOCK_R: tl.constexpr):
    """float64 sums over ``rows`` partial rows from ``first_row`` of both partial columns, per channel."""
    first = tl.zeros(channel.shape, tl.float64)
    second = tl.zeros(channel.shape, tl.float64)
    for r0 in range(0, rows, BLOCK_R):
        row = first_row + r0 + tl.arange(0, BLOCK_R)
        mask = (r0 + tl.arange(0, BLOCK_R) < rows)[:, None] & channel_ok[None, :]
        offsets = (row.to(tl.int64)[:, None] * C + channel[None, :]) * 2
        first += tl.sum(tl.load(partial_ptr + offsets, mask=mask, other=0.0).to(tl.float64), axis=0)
        second += tl.sum(tl.load(partial_ptr + offsets + 1, mask=mask, other=0.0).to(tl.float64), axis=0)
    return first, second


@triton.jit
def _coefficients_kernel(coef_ptr, fields_ptr, partial_ptr, x_ptr, mean_in_ptr, var_in_ptr, weight_ptr, bias_ptr,
                         mean_out_ptr, var_out_ptr, C, S, F, rows_per_group, count, x_sb, x_sc,
                         mean_in_group_stride, var_in_group_stride, eps_high, eps_low,
                         FROM_PARTIALS: tl.constexpr, WRITE_STATISTICS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SHIFT_PER_SAMPLE: tl.constexpr, OPMATH: tl.constexpr,
                         MAX_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per (field, group): mean and variance (from the partial sums, or given), then the
    coefficients (mean high/low, 1/std, gamma, beta) of the field's channels, in float64."""
    f = tl.program_id(0)
    g = tl.program_id(1)
    start = tl.load(fields_ptr + f * 4)
    dim = tl.load(fields_ptr + f * 4 + 1)
    scalar = tl.load(fields_ptr + f * 4 + 2)
    divisor = tl.load(fields_ptr + f * 4 + 3)
    is_scalar = scalar >= 0
    scalar = tl.maximum(scalar, 0)
    m = tl.arange(0, MAX_DIM)
    m_ok = m < dim
    channel = start + tl.where(m_ok, m, 0)
    zero = tl.zeros([MAX_DIM], tl.float64)
    if FROM_PARTIALS:
        first, second = _field_sums(partial_ptr, g * rows_per_group, rows_per_group, C, channel, m_ok, BLOCK_R)
        shift_ptr = x_ptr
        if SHIFT_PER_SAMPLE:
            shift_ptr = x_ptr + g.to(tl.int64) * x_sb
        shift = tl.load(shift_ptr + channel.to(tl.int64) * x_sc).to(tl.float64)
        n = zero + count
        centered = second - first * first / n
        squares = second + shift * (2.0 * first + n * shift)
        total = tl.sum(tl.where(m_ok, tl.where(is_scalar, centered, squares), 0.0), axis=0)
        var = tl.maximum(total, 0.0) / (tl.sum(tl.where(m == 0, n, 0.0), axis=0) * divisor)
        mean = tl.where(is_scalar, tl.sum(tl.where(m == 0, shift + first / n, 0.0), axis=0), 0.0)
    else:
        mean = tl.load(mean_in_ptr + g * mean_in_group_stride + scalar, mask=is_scalar, other=0.0).to(tl.float64)
        var = tl.load(var_in_ptr + g * var_in_group_stride + f).to(tl.float64)
    if WRITE_STATISTICS:
        tl.store(mean_out_ptr + g * S + scalar, mean.to(OPMATH), mask=is_scalar)
        tl.store(var_out_ptr + g * F + f, var.to(OPMATH))
    inv_std = 1.0 / tl.sqrt((var + eps_high) + eps_low)
    gamma = 1.0
    if HAS_WEIGHT:
        gamma = tl.load(weight_ptr + f).to(tl.float64)
    beta = 0.0
    if HAS_BIAS:
        beta = tl.load(bias_ptr + scalar, mask=is_scalar, other=0.0).to(tl.float64)
    mean_high = mean.to(OPMATH)
    mean_low = (mean - mean_high.to(tl.float64)).to(OPMATH)
    out = coef_ptr + (g * C + channel) * COEFFICIENTS
    tl.store(out, (zero + mean_high).to(OPMATH), mask=m_ok)
    tl.store(out + 1, (zero + mean_low).to(OPMATH), mask=m_ok)
    tl.store(out + 2, (zero + inv_std).to(OPMATH), mask=m_ok)
    tl.store(out + 3, (zero + gamma).to(OPMATH), mask=m_ok)
    tl.store(out + 4, (zero + beta).to(OPMATH), mask=m_ok)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, coef_ptr, rows_ptr, scales_ptr, N, C_in, C_out,
                  x_sb, x_sc, x_sn, y_sb, y_sc, y_sn,
                  INSTANCE: tl.constexpr, NORMALIZE: tl.constexpr, SOURCE_ACTS: tl.constexpr,
                  GATE_ACTS: tl.constexpr, OPMATH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[o] = a act(z[source]) * (a' gate_act(z[gate]) or 1) for a tile of output channels and voxels
    (grid: voxel blocks, output channel blocks, batch)."""
    b = tl.program_id(2)
    voxel = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    out = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    out_ok = out < C_out
    out = tl.where(out_ok, out, 0)
    row = rows_ptr + out * 4
    mask = per_channel(out_ok, CHANNELS_LAST) & per_voxel(voxel < N, CHANNELS_LAST)
    x_base = x_ptr + b.to(tl.int64) * x_sb
    coef_group = coef_ptr  # statistics group 0, or sample b's in instance mode
    if INSTANCE:
        coef_group = coef_ptr + b * C_in * COEFFICIENTS
    _, z = _standardized(x_base, coef_group, tl.load(row), voxel, mask, x_sc, x_sn, OPMATH, NORMALIZE,
                         CHANNELS_LAST)
    act = per_channel(tl.load(row + 1), CHANNELS_LAST)
    y = per_channel(tl.load(scales_ptr + out * 2), CHANNELS_LAST) * _activation(z, act, SOURCE_ACTS)
    if GATE_ACTS != 0:
        gate = tl.where(out_ok, tl.load(row + 2), -1)
        if tl.max(gate, axis=0) >= 0:  # some output channel of the tile is gated
            gated = per_channel(gate >= 0, CHANNELS_LAST)
            factor = _gate_factor(x_base, coef_group, rows_ptr, scales_ptr, out, gate, voxel, mask & gated, x_sc,
                                  x_sn, OPMATH, NORMALIZE, GATE_ACTS, CHANNELS_LAST)
            y = tl.where(gated, y * factor, y)
    y_offsets = b.to(tl.int64) * y_sb + _tile_offsets(out, voxel, y_sc, y_sn, CHANNELS_LAST)
    tl.store(y_ptr + y_offsets, to_element_type(y, y_ptr), mask=mask)


@triton.jit
def _gate_factor(x_base, coef_group, rows_ptr, scales_ptr, out, gate, voxel, mask, x_sc, x_sn, OPMATH: tl.constexpr,
                 NORMALIZE: tl.constexpr, GATE_ACTS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """a' gate_act(z[gate]) of the output channels ``out`` gated by input channels ``gate`` (read where ``mask``)."""
    _, z_gate = _standardized(x_base, coef_group, tl.maximum(gate, 0), voxel, mask, x_sc, x_sn, OPMATH, NORMALIZE,
                              CHANNELS_LAST)
    gate_act = per_channel(tl.load(rows_ptr + out * 4 + 3), CHANNELS_LAST)
    gate_scale = per_channel(tl.load(scales_ptr + out * 2 + 1), CHANNELS_LAST)
    return gate_scale * _activation(z_gate, gate_act, GATE_ACTS)


@triton.jit
def _gate_gradient(x_base, dy_base, coef_group, rows_ptr, scales_ptr, source_of_ptr, gate_of_ptr, channel, channel_ok,
                   voxel, voxel_ok, z, x_sc, x_sn, dy_sc, dy_sn,
                   NORMALIZE: tl.constexpr, SOURCE_ACTS: tl.constexpr, GATE_ACTS: tl.constexpr,
                   MAX_SOURCE_FANOUT: tl.constexpr, MAX_GATE_FANOUT: tl.constexpr, OPMATH: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr):
    """dL/dz of the tile's input channels: the outputs that read each channel as source, then as
    gate (a fan-out step that no channel of the tile has is skipped)."""
    grad = tl.zeros(z.shape, OPMATH)
    for j in tl.static_range(MAX_SOURCE_FANOUT):
        out = tl.load(source_of_ptr + channel * MAX_SOURCE_FANOUT + j)
        present = channel_ok & (out >= 0)
        if tl.max(present.to(tl.int32), axis=0) > 0:
            out = tl.maximum(out, 0)
            row = rows_ptr + out * 4
            mask = per_channel(present, CHANNELS_LAST) & voxel_ok
            dy = tl.load(dy_base + _tile_offsets(out, voxel, dy_sc, dy_sn, CHANNELS_LAST), mask=mask, other=0.0)
            act = per_channel(tl.load(row + 1), CHANNELS_LAST)
            scale = per_channel(tl.load(scales_ptr + out * 2), CHANNELS_LAST)
            term = dy.to(OPMATH) * scale * _activation_derivative(z, act, SOURCE_ACTS)
            if GATE_ACTS != 0:
                gate = tl.load(row + 2)
                gated = present & (gate >= 0)
                if tl.max(gated.to(tl.int32), axis=0) > 0:
                    factor = _gate_factor(x_base, coef_group, rows_ptr, scales_ptr, out, gate, voxel,
                                          per_channel(gated, CHANNELS_LAST) & voxel_ok, x_sc, x_sn, OPMATH,
                                          NORMALIZE, GATE_ACTS, CHANNELS_LAST)
                    term = tl.where(per_channel(gated, CHANNELS_LAST), term * factor, term)
            grad += term
    if GATE_ACTS != 0:
        for j in tl.static_range(MAX_GATE_FANOUT):
            out = tl.load(gate_of_ptr + channel * MAX_GATE_FANOUT + j)
            present = channel_ok & (out >= 0)
            if tl.max(present.to(tl.int32), axis=0) > 0:
                out = tl.maximum(out, 0)
                row = rows_ptr + out * 4
                mask = per_channel(present, CHANNELS_LAST) & voxel_ok
                dy = tl.load(dy_base + _tile_offsets(out, voxel, dy_sc, dy_sn, CHANNELS_LAST), mask=mask, other=0.0)
                _, z_source = _standardized(x_base, coef_group, tl.load(row), voxel, mask, x_sc, x_sn, OPMATH,
                                            NORMALIZE, CHANNELS_LAST)
                act = per_channel(tl.load(row + 1), CHANNELS_LAST)
                gate_act = per_channel(tl.load(row + 3), CHANNELS_LAST)
                scale = per_channel(tl.load(scales_ptr + out * 2), CHANNELS_LAST)
                gate_scale = per_channel(tl.load(scales_ptr + out * 2 + 1), CHANNELS_LAST)
                grad += (dy.to(OPMATH) * scale * _activation(z_source, act, SOURCE_ACTS) * gate_scale
                         * _activation_derivative(z, gate_act, GATE_ACTS))
    return grad


@triton.jit
def _backward_kernel(x_ptr, dy_ptr, dx_ptr, coef_ptr, gcoef_ptr, rows_ptr, scales_ptr, source_of_ptr, gate_of_ptr,
                     partial_ptr, N, C_in, x_sb, x_sc, x_sn, dy_sb, dy_sc, dy_sn, dx_sb, dx_sc, dx_sn,
                     INSTANCE: tl.constexpr, NORMALIZE: tl.constexpr, BATCH_STATISTICS: tl.constexpr,
                     ACCUMULATE: tl.constexpr, WRITE: tl.constexpr, SOURCE_ACTS: tl.constexpr,
                     GATE_ACTS: tl.constexpr, MAX_SOURCE_FANOUT: tl.constexpr, MAX_GATE_FANOUT: tl.constexpr,
                     OPMATH: tl.constexpr, CHUNK: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """One backward pass over a chunk of voxels and a block of input channels: recompute z and
    g = dL/dz; sum g and g * x_hat per channel (ACCUMULATE) and/or write dx = k1 g + k2 x_hat + k3 (WRITE).
    Grid: chunks, channel blocks, batch."""
    b = tl.program_id(2)
    row = b * tl.num_programs(0) + tl.program_id(0)
    first_voxel = tl.program_id(0) * CHUNK
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C_in
    channel = tl.where(channel_ok, channel, 0)
    coef_group = coef_ptr  # statistics group 0, or sample b's in instance mode
    gcoef_group = gcoef_ptr
    if INSTANCE:
        coef_group = coef_ptr + b * C_in * COEFFICIENTS
        gcoef_group = gcoef_ptr + b * C_in * GRADIENT_COEFFICIENTS
    k1 = tl.full([BLOCK_C], 1.0, OPMATH)
    k2 = tl.zeros([BLOCK_C], OPMATH)
    k3 = tl.zeros([BLOCK_C], OPMATH)
    if BATCH_STATISTICS:
        gcoef = gcoef_group + channel * GRADIENT_COEFFICIENTS
        k1 = tl.load(gcoef)
        k2 = tl.load(gcoef + 1)
        k3 = tl.load(gcoef + 2)
    elif NORMALIZE:
        k1 = tl.load(coef_group + channel * COEFFICIENTS + 2) * tl.load(coef_group + channel * COEFFICIENTS + 3)
    k1 = per_channel(k1, CHANNELS_LAST)
    k2 = per_channel(k2, CHANNELS_LAST)
    k3 = per_channel(k3, CHANNELS_LAST)
    x_base = x_ptr + b.to(tl.int64) * x_sb
    dy_base = dy_ptr + b.to(tl.int64) * dy_sb
    sums = _tile_zeros(BLOCK_C, BLOCK_N, OPMATH, CHANNELS_LAST)
    products = _tile_zeros(BLOCK_C, BLOCK_N, OPMATH, CHANNELS_LAST)
    for step in range(CHUNK // BLOCK_N):
        voxel = first_voxel + step * BLOCK_N + tl.arange(0, BLOCK_N)
        voxel_ok = per_voxel(voxel < N, CHANNELS_LAST)
        mask = per_channel(channel_ok, CHANNELS_LAST) & voxel_ok
        x_hat, z = _standardized(x_base, coef_group, channel, voxel, mask, x_sc, x_sn, OPMATH, NORMALIZE,
                                 CHANNELS_LAST)
        grad = _gate_gradient(x_base, dy_base, coef_group, rows_ptr, scales_ptr, source_of_ptr, gate_of_ptr, channel,
                              channel_ok, voxel, voxel_ok, z, x_sc, x_sn, dy_sc, dy_sn, NORMALIZE, SOURCE_ACTS,
                              GATE_ACTS, MAX_SOURCE_FANOUT, MAX_GATE_FANOUT, OPMATH, CHANNELS_LAST)
        if ACCUMULATE:
            grad = tl.where(mask, grad, 0.0)
            sums += grad
            products += grad * tl.where(mask, x_hat, 0.0)
        if WRITE:
            dx = k1 * grad + k2 * x_hat + k3
            dx_offsets = b.to(tl.int64) * dx_sb + _tile_offsets(channel, voxel, dx_sc, dx_sn, CHANNELS_LAST)
            tl.store(dx_ptr + dx_offsets, to_element_type(dx, dx_ptr), mask=mask)
    if ACCUMULATE:
        out = partial_ptr + (row * C_in + channel) * 2
        tl.store(out, _sum_over_voxels(sums, CHANNELS_LAST), mask=channel_ok)
        tl.store(out + 1, _sum_over_voxels(products, CHANNELS_LAST), mask=channel_ok)


@triton.jit
def _gradient_coefficients_kernel(gcoef_ptr, grad_weight_ptr, grad_bias_ptr, coef_ptr, fields_ptr, partial_ptr,
                                  C, groups, rows_per_group, count,
                                  COEFFICIENTS_OUT: tl.constexpr, MAX_DIM: tl.constexpr, OPMATH: tl.constexpr,
                                  BLOCK_R: tl.constexpr):
    """Per field: sums of g and g x_hat per group (float64, fixed order) -> k1, k2, k3 of the
    field's channels (COEFFICIENTS_OUT) and d gamma, d beta (sums over groups)."""
    f = tl.program_id(0)
    start = tl.load(fields_ptr + f * 4)
    dim = tl.load(fields_ptr + f * 4 + 1)
    scalar = tl.load(fields_ptr + f * 4 + 2)
    divisor = tl.load(fields_ptr + f * 4 + 3)
    is_scalar = scalar >= 0
    m = tl.arange(0, MAX_DIM)
    m_ok = m < dim
    channel = start + tl.where(m_ok, m, 0)
    zero = tl.zeros([MAX_DIM], tl.float64)
    n = zero + count
    total_grad = zero
    total_product = zero
    for g in range(groups):
        grad, product = _field_sums(partial_ptr, g * rows_per_group, rows_per_group, C, channel, m_ok, BLOCK_R)
        grad = tl.sum(tl.where(m_ok, grad, 0.0), axis=0)
        product = tl.sum(tl.where(m_ok, product, 0.0), axis=0)
        total_grad += grad
        total_product += product
        if COEFFICIENTS_OUT:
            coef = coef_ptr + (g * C + channel) * COEFFICIENTS
            k1 = tl.load(coef + 2).to(tl.float64) * tl.load(coef + 3).to(tl.float64)
            k2 = -k1 * product / (n * divisor)
            k3 = tl.where(is_scalar, -k1 * grad / n, 0.0)
            out = gcoef_ptr + (g * C + channel) * GRADIENT_COEFFICIENTS
            tl.store(out, k1.to(OPMATH), mask=m_ok)
            tl.store(out + 1, k2.to(OPMATH), mask=m_ok)
            tl.store(out + 2, k3.to(OPMATH), mask=m_ok)
    first = m == 0
    tl.store(grad_weight_ptr + f + m * 0, total_product.to(OPMATH), mask=first)
    scalar = scalar + m * 0  # as a vector: the interpreter mishandles vector & scalar masks
    tl.store(grad_bias_ptr + tl.maximum(scalar, 0), total_grad.to(OPMATH), mask=first & (scalar >= 0))


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------

# [channels, voxels] tiles for NCDHW (long runs along the voxels), [voxels, channels] for channels-last.
_CHANNELS_FIRST_CONFIGS = [
    triton.Config({"BLOCK_C": 4, "BLOCK_N": 256}, num_warps=4),
    triton.Config({"BLOCK_C": 8, "BLOCK_N": 128}, num_warps=4),
    triton.Config({"BLOCK_C": 2, "BLOCK_N": 512}, num_warps=4),
    triton.Config({"BLOCK_C": 16, "BLOCK_N": 256}, num_warps=8),
]
_CHANNELS_LAST_CONFIGS = [
    triton.Config({"BLOCK_C": 32, "BLOCK_N": 32}, num_warps=4),
    triton.Config({"BLOCK_C": 64, "BLOCK_N": 16}, num_warps=4),
    triton.Config({"BLOCK_C": 16, "BLOCK_N": 64}, num_warps=4),
    triton.Config({"BLOCK_C": 64, "BLOCK_N": 64}, num_warps=8),
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_C": 32, "BLOCK_N": 64}, num_warps=4)


def _tuned(kernel, key: list[str]) -> dict[bool, object]:
    """The kernel autotuned separately for channels-first (False) and channels-last (True) tiles."""
    return {False: autotune(_CHANNELS_FIRST_CONFIGS, _INTERPRETER_CONFIG, key)(kernel),
            True: autotune(_CHANNELS_LAST_CONFIGS, _INTERPRETER_CONFIG, key)(kernel)}


_MOMENTS = _tuned(_moments_kernel, ["C"])
_APPLY = _tuned(_apply_kernel, ["C_in", "C_out"])
_BACKWARD = _tuned(_backward_kernel, ["C_in"])
_LARGEST_BLOCK_N = (_INTERPRETER_CONFIG.kwargs["BLOCK_N"] if INTERPRETED else
                    max(largest(_CHANNELS_FIRST_CONFIGS, "BLOCK_N"), largest(_CHANNELS_LAST_CONFIGS, "BLOCK_N")))
_BLOCK_R = 64 if INTERPRETED else 128


def _chunk(voxels: int) -> int:
    """Voxels per program of the reducing passes: a power of two that every tile size divides."""
    return max(_LARGEST_BLOCK_N, min(MAX_CHUNK, triton.next_power_of_2(voxels)))


def _pointer(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or a valid stand-in for an absent or empty tensor that the kernel does not read."""
    return fallback if t is None or t.numel() == 0 else t


def _split_eps(eps: float) -> tuple[float, float]:
    """``eps`` as a float32 pair whose sum is exact in float64 (kernel float arguments are float32)."""
    high = float(np.float32(eps))
    return high, eps - high


@dataclass(frozen=True)
class _Problem:
    """A norm_gate call's geometry and tables."""

    x: torch.Tensor  # dense voxels
    fields: FieldTables
    gates: GateTables
    mode: int
    opmath: torch.dtype

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def voxels(self) -> int:
        return self.x.shape[2] * self.x.shape[3] * self.x.shape[4]

    @property
    def instance(self) -> bool:
        return self.mode == MODE_INSTANCE

    @property
    def groups(self) -> int:
        return self.batch if self.instance else 1

    @property
    def group_count(self) -> int:
        """Values per statistics group and channel."""
        return self.voxels if self.instance else self.batch * self.voxels

    @property
    def channels_last(self) -> bool:
        return is_channels_last(self.x)

    def empty(self) -> bool:
        return self.x.numel() == 0


def _check_vector(t: torch.Tensor | None, name: str, size: int, device: torch.device) -> None:
    if t is None:
        return
    if not t.is_floating_point() or t.dim() != 1 or t.shape[0] != size:
        raise RuntimeError(f"e3fast::norm_gate: {name} must be a floating point tensor of shape [{size}], got "
                           f"{t.dtype} {list(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"e3fast::norm_gate: {name} is on {t.device} but x is on {device}")


def _check_voxels(t: torch.Tensor, name: str) -> None:
    check_floating(t, name, "norm_gate")
    if t.dim() != 5:
        raise RuntimeError(f"e3fast::norm_gate: {name} must be [batch, channels, x, y, z], got shape {list(t.shape)}")


def _problem(x, fields, gates, act_scales, mode) -> _Problem:
    _check_voxels(x, "x")
    if mode not in (MODE_NONE, MODE_INSTANCE, MODE_BATCH, MODE_RUNNING):
        raise RuntimeError(f"e3fast::norm_gate: mode must be 0 (none), 1 (instance), 2 (batch) or 3 (running "
                           f"statistics), got {mode}")
    x = dense_voxels(x)
    opmath = opmath_dtype(x.dtype)
    return _Problem(x, field_tables(fields, x.shape[1]), gate_tables(gates, act_scales, x.shape[1], opmath), mode,
                    opmath)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _moments(p: _Problem) -> tuple[torch.Tensor, int]:
    """Partial sums [B * chunks, C, 2] of x - shift and its square, and the chunks per sample."""
    chunk = _chunk(p.voxels)
    chunks = triton.cdiv(p.voxels, chunk)
    partial = torch.empty(p.batch * chunks, p.channels, 2, dtype=p.opmath, device=p.x.device)
    x_sb, x_sc, x_sn = voxel_strides(p.x)
    grid = lambda meta: (chunks, triton.cdiv(p.channels, meta["BLOCK_C"]), p.batch)  # noqa: E731
    _MOMENTS[p.channels_last][grid](p.x, partial, p.voxels, p.channels, x_sb, x_sc, x_sn,
                                    SHIFT_PER_SAMPLE=p.instance, OPMATH=tl_dtype(p.opmath), CHUNK=chunk,
                                    CHANNELS_LAST=p.channels_last)
    return partial, chunks


def _coefficients(p: _Problem, weight, bias, eps: float, *, statistics=None, outputs=None) -> torch.Tensor:
    """Per (group, channel) coefficients [G, C, 5]: from the batch statistics of x (writing them to
    ``outputs`` = (mean, var)), or from given ``statistics`` = (mean, var) (copied to ``outputs`` if given)."""
    coef = torch.empty(p.groups, p.channels, 5, dtype=p.opmath, device=p.x.device)
    from_partials = statistics is None
    if from_partials:
        partial, chunks = _moments(p)
        rows_per_group = chunks if p.instance else p.batch * chunks
        mean_in = var_in = coef
        mean_stride = var_stride = 0
    else:
        partial, rows_per_group = coef, 0
        mean_in, var_in = statistics
        mean_stride = mean_in.shape[1] if mean_in.dim() == 2 else 0
        var_stride = var_in.shape[1] if var_in.dim() == 2 else 0
    mean_out, var_out = outputs if outputs is not None else (coef, coef)
    eps_high, eps_low = _split_eps(eps)
    _coefficients_kernel[(p.fields.num_fields, p.groups)](
        coef, p.fields.table, partial, p.x, _pointer(mean_in, coef), _pointer(var_in, coef), _pointer(weight, coef),
        _pointer(bias, coef), _pointer(mean_out, coef), _pointer(var_out, coef), p.channels, p.fields.num_scalars,
        p.fields.num_fields, rows_per_group, p.group_count, p.x.stride(0), p.x.stride(1), mean_stride, var_stride,
        eps_high, eps_low, FROM_PARTIALS=from_partials, WRITE_STATISTICS=outputs is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None and bias.numel() > 0, SHIFT_PER_SAMPLE=p.instance,
        OPMATH=tl_dtype(p.opmath), MAX_DIM=p.fields.max_dim, BLOCK_R=_BLOCK_R)
    return coef


def _apply(p: _Problem, coef: torch.Tensor | None, y: torch.Tensor) -> None:
    x_sb, x_sc, x_sn = voxel_strides(p.x)
    y_sb, y_sc, y_sn = voxel_strides(y)
    g = p.gates
    out_channels = g.out_channels

    def grid(meta):
        return triton.cdiv(p.voxels, meta["BLOCK_N"]), triton.cdiv(out_channels, meta["BLOCK_C"]), p.batch

    _APPLY[p.channels_last][grid](
        p.x, y, _pointer(coef, p.x), g.rows, g.scales, p.voxels, p.channels, out_channels, x_sb, x_sc, x_sn, y_sb,
        y_sc, y_sn, INSTANCE=p.instance, NORMALIZE=p.mode != MODE_NONE, SOURCE_ACTS=g.source_acts, GATE_ACTS=g.gate_acts, OPMATH=tl_dtype(p.opmath),
        CHANNELS_LAST=p.channels_last)


def norm_gate(x, weight, bias, running_mean, running_var, fields, gates, act_scales, num_scalars: int, mode: int,
              eps: float):
    """Launcher of the forward op (the arguments and results of ``e3fast::norm_gate``)."""
    p = _problem(x, fields, gates, act_scales, mode)
    if num_scalars != p.fields.num_scalars:
        raise RuntimeError(f"e3fast::norm_gate: num_scalars is {num_scalars} but the fields table has "
                           f"{p.fields.num_scalars} scalar fields")
    for name, t, size in (("weight", weight, p.fields.num_fields), ("bias", bias, p.fields.num_scalars),
                          ("running_mean", running_mean, p.fields.num_scalars),
                          ("running_var", running_var, p.fields.num_fields)):
        _check_vector(t, name, size, p.x.device)
    if mode == MODE_NONE and (weight is not None or bias is not None):
        raise RuntimeError("e3fast::norm_gate: mode 0 (none) takes no weight or bias")
    if mode == MODE_RUNNING and (running_mean is None or running_var is None):
        raise RuntimeError("e3fast::norm_gate: mode 3 (running statistics) needs running_mean and running_var")

    y = torch.empty(p.batch, p.gates.out_channels, *p.x.shape[2:], dtype=p.x.dtype, device=p.x.device,
                    memory_format=memory_format_of(p.x))
    if mode == MODE_NONE:
        mean = p.x.new_empty(1, 0, dtype=p.opmath)
        var = p.x.new_empty(1, 0, dtype=p.opmath)
        coef = None
    else:
        mean = p.x.new_empty(p.groups, p.fields.num_scalars, dtype=p.opmath)
        var = p.x.new_empty(p.groups, p.fields.num_fields, dtype=p.opmath)
        statistics = (running_mean, running_var) if mode == MODE_RUNNING else None
        if p.empty() and statistics is None:
            return y, mean.fill_(float("nan")), var.zero_()
        coef = _coefficients(p, weight, bias, eps, statistics=statistics, outputs=(mean, var))
    if not p.empty():
        _apply(p, coef, y)
    return y, mean, var


def _backward_pass(p: _Problem, grad_y: torch.Tensor, grad_x: torch.Tensor, coef, gcoef, *, accumulate: bool,
                   write: bool) -> tuple[torch.Tensor | None, int]:
    """One pass of :func:`_backward_kernel`; returns the partial sums (if accumulated) and the chunks per sample."""
    chunk = _chunk(p.voxels)
    chunks = triton.cdiv(p.voxels, chunk)
    partial = (torch.empty(p.batch * chunks, p.channels, 2, dtype=p.opmath, device=p.x.device)
               if accumulate else None)
    g = p.gates
    grid = lambda meta: (chunks, triton.cdiv(p.channels, meta["BLOCK_C"]), p.batch)  # noqa: E731
    _BACKWARD[p.channels_last][grid](
        p.x, grad_y, grad_x, _pointer(coef, p.x), _pointer(gcoef, p.x), g.rows, g.scales, _pointer(g.source_of, g.rows),
        _pointer(g.gate_of, g.rows), _pointer(partial, p.x), p.voxels, p.channels, *voxel_strides(p.x),
        *voxel_strides(grad_y), *voxel_strides(grad_x), INSTANCE=p.instance, NORMALIZE=p.mode != MODE_NONE,
        BATCH_STATISTICS=gcoef is not None, ACCUMULATE=accumulate, WRITE=write, SOURCE_ACTS=g.source_acts,
        GATE_ACTS=g.gate_acts, MAX_SOURCE_FANOUT=g.max_source_fanout, MAX_GATE_FANOUT=g.max_gate_fanout,
        OPMATH=tl_dtype(p.opmath), CHUNK=chunk, CHANNELS_LAST=p.channels_last)
    return partial, chunks


def _gradient_coefficients(p: _Problem, partial: torch.Tensor, chunks: int, coef: torch.Tensor, grad_weight,
                           grad_bias, *, coefficients: bool) -> torch.Tensor | None:
    gcoef = (torch.empty(p.groups, p.channels, 3, dtype=p.opmath, device=p.x.device) if coefficients else None)
    rows_per_group = chunks if p.instance else p.batch * chunks
    _gradient_coefficients_kernel[(p.fields.num_fields,)](
        _pointer(gcoef, coef), grad_weight, _pointer(grad_bias, grad_weight), coef, p.fields.table, partial,
        p.channels, p.groups, rows_per_group, p.group_count, COEFFICIENTS_OUT=coefficients,
        MAX_DIM=p.fields.max_dim, OPMATH=tl_dtype(p.opmath), BLOCK_R=_BLOCK_R)
    return gcoef


def _check_statistics(p: _Problem, mean: torch.Tensor, var: torch.Tensor) -> None:
    scalars = 0 if p.mode == MODE_NONE else p.fields.num_scalars
    num_fields = 0 if p.mode == MODE_NONE else p.fields.num_fields
    if tuple(mean.shape) != (p.groups, scalars) or tuple(var.shape) != (p.groups, num_fields):
        raise RuntimeError(f"e3fast::norm_gate_backward: mode {p.mode} expects mean [{p.groups}, {scalars}] and var "
                           f"[{p.groups}, {num_fields}], got {list(mean.shape)} and {list(var.shape)}")


def norm_gate_backward(grad_y, x, weight, bias, mean, var, fields, gates, act_scales, mode: int, eps: float):
    """Launcher of the backward op (the arguments and results of ``e3fast::norm_gate_backward``)."""
    p = _problem(x, fields, gates, act_scales, mode)
    _check_voxels(grad_y, "grad_y")
    expected = (p.batch, p.gates.out_channels, *p.x.shape[2:])
    if tuple(grad_y.shape) != expected or grad_y.dtype != p.x.dtype:
        raise RuntimeError(f"e3fast::norm_gate_backward: grad_y must be {p.x.dtype} of shape {list(expected)}, got "
                           f"{grad_y.dtype} {list(grad_y.shape)}")
    _check_statistics(p, mean, var)
    _check_vector(weight, "weight", p.fields.num_fields, p.x.device)
    _check_vector(bias, "bias", p.fields.num_scalars, p.x.device)
    grad_y = dense_voxels(grad_y)
    grad_x = torch.empty(p.x.shape, dtype=p.x.dtype, device=p.x.device, memory_format=memory_format_of(p.x))
    grad_weight = p.x.new_zeros(p.fields.num_fields, dtype=p.opmath)
    grad_bias = p.x.new_zeros(mean.shape[1], dtype=p.opmath)
    if p.empty():
        return grad_x, grad_weight, grad_bias
    if mode == MODE_NONE:
        _backward_pass(p, grad_y, grad_x, None, None, accumulate=False, write=True)
        return grad_x, grad_weight, grad_bias
    coef = _coefficients(p, weight, bias, eps, statistics=(mean, var))
    if mode == MODE_RUNNING:
        partial, chunks = _backward_pass(p, grad_y, grad_x, coef, None, accumulate=True, write=True)
        _gradient_coefficients(p, partial, chunks, coef, grad_weight, grad_bias, coefficients=False)
    else:
        partial, chunks = _backward_pass(p, grad_y, grad_x, coef, None, accumulate=True, write=False)
        gcoef = _gradient_coefficients(p, partial, chunks, coef, grad_weight, grad_bias, coefficients=True)
        _backward_pass(p, grad_y, grad_x, coef, gcoef, accumulate=False, write=True)
    return grad_x, grad_weight, grad_bias
