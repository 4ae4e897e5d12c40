"""Triton kernels of ``e3fast::norm_max_pool3d`` and ``e3fast::norm_max_pool3d_backward``.

Same semantics as the C++ kernels (see :mod:`e3fast.ops.norm_max_pool`). For sample ``b``, field
``f = (start, d)`` and output voxel ``o`` with window positions ``p = (i k_y + j) k_z + k``:

.. math::
    \\text{score}(n) = x_{start}(n) \\;(d = 1), \\qquad
    \\text{score}(n) = \\Big(\\sum_{m<d} x_{start+m}(n)^2\\Big)^{1/2} \\;(d > 1), \\qquad
    p^*(o) = \\text{first } p \\text{ of largest score (NaN wins)},

    y_{start+m}(o) = x_{start+m}(o s + p^*), \\qquad
    \\partial x_{start+m}(n) = \\sum_{o:\\; o s + p^*(o) = n} \\partial y_{start+m}(o)

Forward: a program owns a block of output voxels and a block of fields of one sample, as a tile
``[fields, components, voxels]`` (NCDHW) or ``[voxels, fields, components]`` (channels-last, the
contiguous channels fastest). The window positions are a loop with compile-time bounds; the best
score, its position and the winning components stay in registers, so x is read once per window
position and y and the argmax (uint8 up to 256 positions, else int32; ``[B, F, ox, oy, oz]``) are
written once. Backward gathers instead of scattering: each input voxel visits the
``ceil(k/s)`` windows per axis that can contain it and adds ``dy`` where the saved argmax points at
it, so every ``dx`` element is written once, without atomics (deterministic), overlapping windows
included. Channels outside every field are zero in y and dx.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from e3fast.triton_kernels import tables
from e3fast.triton_kernels.conversions import to_element_type
from e3fast.triton_kernels.layout import (check_floating, dense_voxels, is_channels_last, memory_format_of, opmath_dtype,
                                          per_channel, per_voxel, tl_dtype)
from e3fast.triton_kernels.tuning import autotune

# ---------------------------------------------------------------------------------------------
# Tables and geometry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolFields:
    table: torch.Tensor  # int32 [F, 2]: start, dim
    num_fields: int
    max_dim: int  # a power of two >= every field's dim
    covers_all_channels: bool


def _build_pool_fields(host: torch.Tensor, channels: int, device: torch.device) -> PoolFields:
    rows = [row[:2] for row in host.tolist()]
    claimed = [False] * channels
    for f, (start, dim) in enumerate(rows):
        if start < 0 or dim <= 0 or start + dim > channels:
            raise RuntimeError(f"e3fast: fields row {f} (start {start}, dim {dim}) does not fit in {channels} channels")
        for c in range(start, start + dim):
            if claimed[c]:
                raise RuntimeError(f"e3fast: channel {c} belongs to two rows of fields")
            claimed[c] = True
    table = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), 2).to(device)
    max_dim = triton.next_power_of_2(max((dim for _, dim in rows), default=1))
    return PoolFields(table, len(rows), max_dim, all(claimed))


def pool_fields(fields: torch.Tensor, channels: int) -> PoolFields:
    if fields.dtype != torch.int64 or fields.dim() != 2 or fields.shape[1] < 2:
        raise RuntimeError(f"e3fast: fields must be an int64 tensor [num_fields, 4], got {fields.dtype} "
                           f"{list(fields.shape)}")
    return tables.digest((fields,), ("norm_max_pool3d fields", channels),
                         lambda host: _build_pool_fields(host, channels, fields.device))


@dataclass(frozen=True)
class PoolGeometry:
    size: tuple[int, int, int]
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]

    @property
    def out(self) -> tuple[int, int, int]:
        return tuple((n - k) // s + 1 for n, k, s in zip(self.size, self.kernel, self.stride))

    @property
    def window(self) -> int:
        return math.prod(self.kernel)

    @property
    def argmax_dtype(self) -> torch.dtype:
        return torch.uint8 if self.window <= 256 else torch.int32

    def constants(self) -> dict[str, int]:
        names = ("KX", "KY", "KZ", "SX", "SY", "SZ")
        return dict(zip(names, self.kernel + self.stride))


def pool_geometry(size, kernel_size, stride) -> PoolGeometry:
    triples = []
    for name, values in (("input_size", size), ("kernel_size", kernel_size), ("stride", stride)):
        if len(values) != 3:
            raise RuntimeError(f"e3fast: {name} must have 3 entries, got {len(values)}")
        triples.append(tuple(int(v) for v in values))
    size, kernel, stride = triples
    if min(kernel) <= 0 or min(stride) <= 0:
        raise RuntimeError(f"e3fast: kernel_size and stride must be positive, got {list(kernel)} and {list(stride)}")
    if any(n < k for n, k in zip(size, kernel)):
        raise RuntimeError(f"e3fast: input spatial size {list(size)} is smaller than kernel_size {list(kernel)}")
    return PoolGeometry(size, kernel, stride)


def _check_voxels(t: torch.Tensor, name: str) -> None:
    check_floating(t, name, "norm_max_pool3d")
    if t.dim() != 5:
        raise RuntimeError(f"e3fast: {name} must be 5-D [batch, channels, x, y, z], got {list(t.shape)}")


# ---------------------------------------------------------------------------------------------
# Tile helpers: [fields, components, voxels] (NCDHW) or [voxels, fields, components] (channels-last)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _per_field(v, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        out = v[None, :, None]
    else:
        out = v[:, None, None]
    return out


@triton.jit
def _per_component(v, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        out = v[None, None, :]
    else:
        out = v[None, :, None]
    return out


@triton.jit
def _per_voxel(v, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        out = v[:, None, None]
    else:
        out = v[None, None, :]
    return out


@triton.jit
def _over_components(tile, CHANNELS_LAST: tl.constexpr):
    """Sum over the component axis: a [fields, voxels] or [voxels, fields] tile."""
    if CHANNELS_LAST:
        out = tl.sum(tile, axis=2)
    else:
        out = tl.sum(tile, axis=1)
    return out


@triton.jit
def _spread_over_components(tile, CHANNELS_LAST: tl.constexpr):
    """A [fields, voxels] / [voxels, fields] tile broadcast back against the component axis."""
    if CHANNELS_LAST:
        out = tile[:, :, None]
    else:
        out = tile[:, None, :]
    return out


@triton.jit
def _spatial_offset(ix, iy, iz, sx, sy, sz):
    return ix.to(tl.int64) * sx + iy.to(tl.int64) * sy + iz.to(tl.int64) * sz


@triton.jit
def _window_scores(x_corner, offset, mask, dim, OPMATH: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Components at window offset ``offset`` and their score (value for d = 1, else the norm)."""
    values = tl.load(x_corner + offset, mask=mask, other=0.0)
    v = values.to(OPMATH)
    squares = _over_components(v * v, CHANNELS_LAST)
    if OPMATH == tl.float64:
        norm = tl.sqrt(squares)
    else:
        norm = tl.sqrt_rn(squares)  # correctly rounded, as the reference's norms (tl.sqrt is approximate)
    score = tl.where(dim == 1, _over_components(v, CHANNELS_LAST), norm)
    return values, score


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _voxel_block(NX, NY, NZ, BLOCK: tl.constexpr):
    """This program's BLOCK voxels of an NX x NY x NZ grid (axis 0 of the grid): flat index (0 where
    out of range), whether in range, and the three coordinates."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < NX * NY * NZ
    n = tl.where(n_ok, n, 0)
    return n, n_ok, n // (NY * NZ), (n // NZ) % NY, n % NZ


@triton.jit
def _field_block(fields_ptr, F, voxel_ok, MAX_DIM: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                 BLOCK_F: tl.constexpr):
    """This program's BLOCK_F fields (axis 1 of the grid): field index (0 where out of range), whether
    in range, each field's dimension, and the channel and mask of every (field, component, voxel)."""
    field = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    field_ok = field < F
    field = tl.where(field_ok, field, 0)
    start = tl.load(fields_ptr + field * 2)
    dim = tl.load(fields_ptr + field * 2 + 1)
    m = tl.arange(0, MAX_DIM)
    channel = _per_field(start, CHANNELS_LAST) + _per_component(m, CHANNELS_LAST)
    mask = _per_field(field_ok, CHANNELS_LAST) & (_per_component(m, CHANNELS_LAST) < _per_field(dim, CHANNELS_LAST))
    mask = mask & _per_voxel(voxel_ok, CHANNELS_LAST)
    return field, field_ok, dim, channel, mask


@triton.jit
def _pool_kernel(x_ptr, y_ptr, argmax_ptr, fields_ptr, F, OX, OY, OZ,
                 x_sb, x_sc, x_sx, x_sy, x_sz, y_sb, y_sc, y_sx, y_sy, y_sz,
                 KX: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr, SX: tl.constexpr, SY: tl.constexpr,
                 SZ: tl.constexpr, MAX_DIM: tl.constexpr, OPMATH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                 BLOCK_F: tl.constexpr, BLOCK_O: tl.constexpr):
    """Grid: output voxel blocks, field blocks, batch."""
    b = tl.program_id(2)
    out_voxels = OX * OY * OZ
    o, o_ok, ox, oy, oz = _voxel_block(OX, OY, OZ, BLOCK_O)
    field, field_ok, dim, channel, mask = _field_block(fields_ptr, F, o_ok, MAX_DIM, CHANNELS_LAST, BLOCK_F)
    field_dim = per_channel(dim, CHANNELS_LAST)
    corner = _spatial_offset(ox * SX, oy * SY, oz * SZ, x_sx, x_sy, x_sz)
    x_corner = x_ptr + b.to(tl.int64) * x_sb + channel.to(tl.int64) * x_sc + _per_voxel(corner, CHANNELS_LAST)
    # Window position 0 starts the search (it wins every tie, and a value of -inf).
    values, best = _window_scores(x_corner, 0, mask, field_dim, OPMATH, CHANNELS_LAST)
    position = tl.zeros(best.shape, tl.int32)
    for i in range(KX):
        for j in range(KY):
            for k in range(KZ):
                offset = i * x_sx + j * x_sy + k * x_sz
                candidate, score = _window_scores(x_corner, offset, mask, field_dim, OPMATH, CHANNELS_LAST)
                wins = (score > best) | (score != score)
                best = tl.where(wins, score, best)
                position = tl.where(wins, (i * KY + j) * KZ + k, position)
                values = tl.where(_spread_over_components(wins, CHANNELS_LAST), candidate, values)
    y_offsets = (b.to(tl.int64) * y_sb + channel.to(tl.int64) * y_sc
                 + _per_voxel(_spatial_offset(ox, oy, oz, y_sx, y_sy, y_sz), CHANNELS_LAST))
    tl.store(y_ptr + y_offsets, values, mask=mask)
    argmax_offsets = (b * F + per_channel(field, CHANNELS_LAST)).to(tl.int64) * out_voxels + per_voxel(
        o, CHANNELS_LAST)
    argmax_mask = per_channel(field_ok, CHANNELS_LAST) & per_voxel(o_ok, CHANNELS_LAST)
    tl.store(argmax_ptr + argmax_offsets, position.to(argmax_ptr.dtype.element_ty), mask=argmax_mask)


@triton.jit
def _window_start(n, S: tl.constexpr, K: tl.constexpr, OUT, c):
    """The c-th window (from the last) along one axis that may contain input index n: its index,
    the position of n in it, and whether it exists and contains n."""
    o = n // S - c
    r = n - o * S
    ok = (o >= 0) & (o < OUT) & (r < K)
    return tl.maximum(o, 0), r, ok


@triton.jit
def _unpool_kernel(dy_ptr, argmax_ptr, dx_ptr, fields_ptr, F, NX, NY, NZ, OX, OY, OZ,
                   dy_sb, dy_sc, dy_sx, dy_sy, dy_sz, dx_sb, dx_sc, dx_sx, dx_sy, dx_sz,
                   KX: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr, SX: tl.constexpr, SY: tl.constexpr,
                   SZ: tl.constexpr, MAX_DIM: tl.constexpr, OPMATH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                   BLOCK_F: tl.constexpr, BLOCK_O: tl.constexpr):
    """Grid: input voxel blocks (BLOCK_O voxels each, sharing the forward's configurations), field blocks, batch."""
    b = tl.program_id(2)
    n, n_ok, nx, ny, nz = _voxel_block(NX, NY, NZ, BLOCK_O)
    field, field_ok, _, channel, mask = _field_block(fields_ptr, F, n_ok, MAX_DIM, CHANNELS_LAST, BLOCK_F)
    field_ok2 = per_channel(field_ok, CHANNELS_LAST)
    dy_fields = dy_ptr + b.to(tl.int64) * dy_sb + channel.to(tl.int64) * dy_sc
    argmax_fields = argmax_ptr + (b * F + per_channel(field, CHANNELS_LAST)).to(tl.int64) * (OX * OY * OZ)
    grad = tl.zeros(mask.shape, OPMATH)
    for cx in range((KX + SX - 1) // SX):
        ox, rx, ok_x = _window_start(nx, SX, KX, OX, cx)
        for cy in range((KY + SY - 1) // SY):
            oy, ry, ok_y = _window_start(ny, SY, KY, OY, cy)
            for cz in range((KZ + SZ - 1) // SZ):
                oz, rz, ok_z = _window_start(nz, SZ, KZ, OZ, cz)
                inside = field_ok2 & per_voxel(n_ok & ok_x & ok_y & ok_z, CHANNELS_LAST)
                window = per_voxel((ox * OY + oy) * OZ + oz, CHANNELS_LAST)
                chosen = tl.load(argmax_fields + window, mask=inside, other=0).to(tl.int32)
                hit = inside & (chosen == per_voxel((rx * KY + ry) * KZ + rz, CHANNELS_LAST))
                offset = _per_voxel(_spatial_offset(ox, oy, oz, dy_sx, dy_sy, dy_sz), CHANNELS_LAST)
                dy = tl.load(dy_fields + offset, mask=mask & _spread_over_components(hit, CHANNELS_LAST), other=0.0)
                grad += dy.to(OPMATH)
    dx_offsets = (b.to(tl.int64) * dx_sb + channel.to(tl.int64) * dx_sc
                  + _per_voxel(_spatial_offset(nx, ny, nz, dx_sx, dx_sy, dx_sz), CHANNELS_LAST))
    tl.store(dx_ptr + dx_offsets, to_element_type(grad, dx_ptr), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_CHANNELS_FIRST_CONFIGS = [
    triton.Config({"BLOCK_F": 2, "BLOCK_O": 256}, num_warps=4),
    triton.Config({"BLOCK_F": 4, "BLOCK_O": 128}, num_warps=4),
    triton.Config({"BLOCK_F": 1, "BLOCK_O": 512}, num_warps=4),
]
_CHANNELS_LAST_CONFIGS = [
    triton.Config({"BLOCK_F": 8, "BLOCK_O": 32}, num_warps=4),
    triton.Config({"BLOCK_F": 16, "BLOCK_O": 16}, num_warps=4),
    triton.Config({"BLOCK_F": 4, "BLOCK_O": 64}, num_warps=4),
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_F": 8, "BLOCK_O": 64}, num_warps=4)


def _tuned(kernel) -> dict[bool, object]:
    """The kernel autotuned separately for channels-first (False) and channels-last (True) tiles."""
    key = ["F", "OX", "OY", "OZ", "MAX_DIM"]
    return {False: autotune(_CHANNELS_FIRST_CONFIGS, _INTERPRETER_CONFIG, key)(kernel),
            True: autotune(_CHANNELS_LAST_CONFIGS, _INTERPRETER_CONFIG, key)(kernel)}


_POOL = _tuned(_pool_kernel)
_UNPOOL = _tuned(_unpool_kernel)


def _grid(voxels: int, num_fields: int, batch: int):
    return lambda meta: (triton.cdiv(voxels, meta["BLOCK_O"]), triton.cdiv(num_fields, meta["BLOCK_F"]), batch)


def _output(shape, like: torch.Tensor, zero: bool) -> torch.Tensor:
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format_of(like))
    return out.zero_() if zero else out


def norm_max_pool3d(x, fields, kernel_size, stride):
    """Launcher of the forward op (the arguments and results of ``e3fast::norm_max_pool3d``)."""
    _check_voxels(x, "x")
    x = dense_voxels(x)
    table = pool_fields(fields, x.shape[1])
    g = pool_geometry(x.shape[2:], kernel_size, stride)
    batch = x.shape[0]
    y = _output((batch, x.shape[1], *g.out), x, zero=not table.covers_all_channels)
    argmax = torch.empty(batch, table.num_fields, *g.out, dtype=g.argmax_dtype, device=x.device)
    if y.numel() == 0 or table.num_fields == 0:
        return y, argmax
    channels_last = is_channels_last(x)
    _POOL[channels_last][_grid(math.prod(g.out), table.num_fields, batch)](
        x, y, argmax, table.table, table.num_fields, *g.out, x.stride(0), x.stride(1), *x.stride()[2:],
        y.stride(0), y.stride(1), *y.stride()[2:], **g.constants(), MAX_DIM=table.max_dim,
        OPMATH=tl_dtype(opmath_dtype(x.dtype)), CHANNELS_LAST=channels_last)
    return y, argmax


def norm_max_pool3d_backward(grad_y, argmax, fields, input_size, kernel_size, stride):
    """Launcher of the backward op (the arguments and results of ``e3fast::norm_max_pool3d_backward``)."""
    _check_voxels(grad_y, "grad_y")
    grad_y = dense_voxels(grad_y)
    table = pool_fields(fields, grad_y.shape[1])
    g = pool_geometry(input_size, kernel_size, stride)
    batch = grad_y.shape[0]
    if tuple(grad_y.shape[2:]) != g.out:
        raise RuntimeError(f"e3fast: grad_y has spatial size {list(grad_y.shape[2:])} but pooling {list(g.size)} "
                           f"with kernel {list(g.kernel)} and stride {list(g.stride)} gives {list(g.out)}")
    if argmax.dtype != g.argmax_dtype or tuple(argmax.shape) != (batch, table.num_fields, *g.out):
        raise RuntimeError(f"e3fast: argmax must be {g.argmax_dtype} of shape {[batch, table.num_fields, *g.out]}, "
                           f"got {argmax.dtype} {list(argmax.shape)}")
    argmax = argmax.contiguous()
    grad_x = _output((batch, grad_y.shape[1], *g.size), grad_y, zero=not table.covers_all_channels)
    if grad_x.numel() == 0 or table.num_fields == 0:
        return grad_x
    channels_last = is_channels_last(grad_y)
    _UNPOOL[channels_last][_grid(math.prod(g.size), table.num_fields, batch)](
        grad_y, argmax, grad_x, table.table, table.num_fields, *g.size, *g.out, grad_y.stride(0), grad_y.stride(1),
        *grad_y.stride()[2:], grad_x.stride(0), grad_x.stride(1), *grad_x.stride()[2:], **g.constants(),
        MAX_DIM=table.max_dim, OPMATH=tl_dtype(opmath_dtype(grad_y.dtype)), CHANNELS_LAST=channels_last)
    return grad_x
