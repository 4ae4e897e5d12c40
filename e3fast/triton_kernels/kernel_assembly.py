"""Triton kernels of ``e3fast::assemble_kernel`` and ``e3fast::assemble_kernel_backward``.

Same semantics as the C++ kernels (see :mod:`e3fast.ops.kernel_assembly` and
:mod:`e3fast.steerable_basis`). With path rows ``p = (i_p, mul_in, d_1, o_p, mul_out, d_3, c_p,
s_p, b_p)`` and self-connection rows ``(i, mul_in, o, mul_out, d, c)`` of scale ``alpha``:

.. math::
    K[o_p + w d_3 + m_3,\\, i_p + u d_1 + m_1,\\, t] \\mathrel{+}= \\sum_r B_p[t, m_1, m_3, r]\\,
    W[r, c_p + u s_p + w], \\qquad
    K[o + w d + m,\\, i + u d + m,\\, t_0] \\mathrel{+}= \\alpha\\, V[c + u\\,\\mu_{out} + w]

and the backward pass is the transpose

.. math::
    \\partial W[r, c_p + u s_p + w] = \\sum_{m_3, m_1, t} B_p[t, m_1, m_3, r]\\, \\partial K[\\dots], \\qquad
    \\partial V[c + u \\mu_{out} + w] = \\alpha \\sum_m \\partial K[o + w d + m, i + u d + m, t_0].

Forward: a program owns a block of one kernel row ``o`` (columns ``(i, t)``, contiguous) and adds
the paths and self-connections that write that row, listed per row on the host once per table
(so each element is a sum in a fixed order: deterministic, no atomics); it is written once.
Backward: a program owns a block of weight columns (every column belongs to at most one path row
or self-connection, checked on the host) and reduces over each column's ``d_3 d_1 taps`` kernel
entries for all radial functions at once, as a ``[columns, entries, R]`` tile. Both are tiny next to a convolution
and launch bound, so they use fixed block sizes instead of autotuning. Arithmetic is float32
for half precision (float64 for float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from e3fast.triton_kernels import tables
from e3fast.triton_kernels.conversions import to_element_type
from e3fast.triton_kernels.layout import check_floating, opmath_dtype, tl_dtype
from e3fast.triton_kernels.tuning import INTERPRETED

PATH_COLUMNS = tl.constexpr(9)
SELF_CONNECTION_COLUMNS = tl.constexpr(6)
BLOCK_J = 1024 if INTERPRETED else 256  # kernel-row columns per forward program (few programs when interpreted)
BLOCK_COLUMNS, BLOCK_K = (64, 256) if INTERPRETED else (16, 64)  # weight columns and kernel entries per backward tile

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssemblyGeometry:
    out_dim: int
    in_dim: int
    taps: int
    num_radial: int
    radial_numel: int
    sc_numel: int
    basis_numel: int


@dataclass(frozen=True)
class AssemblyTables:
    paths: torch.Tensor  # int32 [P, 9]
    row_paths: torch.Tensor  # int32 [out_dim, max_row_paths]: the path rows writing kernel row o (-1 pads)
    self_connections: torch.Tensor  # int32 [S, 6]
    row_self_connections: torch.Tensor  # int32 [out_dim, max_row_self_connections]
    sc_scales: torch.Tensor  # opmath [S]
    radial_columns: torch.Tensor  # int32 [radial_numel, 3]: (path row, u, w) of each weight column, -1: unused
    sc_columns: torch.Tensor  # int32 [sc_numel, 3]: (self-connection row, u, w), -1: unused
    max_row_paths: int
    max_row_self_connections: int
    max_span: int  # largest d_3 d_1 taps of a path row
    max_sc_dim: int  # a power of two >= every self-connection's d


def _check_table(table: torch.Tensor, columns: int, name: str) -> None:
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != columns:
        raise RuntimeError(f"e3fast: {name} must be an int64 tensor of shape [rows, {columns}], got {table.dtype} "
                           f"{list(table.shape)}")


def _claim(owner: list, first: int, count: int, entry: tuple, what: str) -> None:
    """Marks weight columns [first, first + count) as owned by ``entry`` (refusing overlaps)."""
    for column in range(first, first + count):
        if owner[column] is not None:
            raise RuntimeError(f"e3fast: weight column {column} of {what} is used by two table entries")
        owner[column] = (*entry, column - first)


def _path_rows(rows: list[list[int]], g: AssemblyGeometry) -> list:
    owner: list = [None] * g.radial_numel
    for p, (i, mul_in, d1, o, mul_out, d3, c, stride, b) in enumerate(rows):
        if min(mul_in, mul_out, i, o, c, b) < 0 or d1 <= 0 or d3 <= 0 or stride < mul_out:
            raise RuntimeError(f"e3fast: paths row {p} has invalid entries")
        if i + mul_in * d1 > g.in_dim or o + mul_out * d3 > g.out_dim:
            raise RuntimeError(f"e3fast: paths row {p} addresses channels outside the kernel [{g.out_dim}, {g.in_dim}]")
        needed = b + g.taps * d1 * d3 * g.num_radial
        if needed > g.basis_numel:
            raise RuntimeError(f"e3fast: paths row {p} needs basis entries up to {needed} but the basis has "
                               f"{g.basis_numel}")
        if mul_in == 0 or mul_out == 0:
            continue
        if c + (mul_in - 1) * stride + mul_out > g.radial_numel:
            raise RuntimeError(f"e3fast: paths row {p} addresses radial weight columns beyond {g.radial_numel}")
        for u in range(mul_in):
            _claim(owner, c + u * stride, mul_out, (p, u), "radial_weight")
    return owner


def _self_connection_rows(rows: list[list[int]], g: AssemblyGeometry) -> list:
    owner: list = [None] * g.sc_numel
    for s, (i, mul_in, o, mul_out, d, c) in enumerate(rows):
        if min(mul_in, mul_out, i, o, c) < 0 or d <= 0:
            raise RuntimeError(f"e3fast: self_connections row {s} has invalid entries")
        if i + mul_in * d > g.in_dim or o + mul_out * d > g.out_dim:
            raise RuntimeError(f"e3fast: self_connections row {s} addresses channels outside the kernel "
                               f"[{g.out_dim}, {g.in_dim}]")
        if c + mul_in * mul_out > g.sc_numel:
            raise RuntimeError(f"e3fast: self_connections row {s} addresses weights beyond {g.sc_numel}")
        for u in range(mul_in):
            _claim(owner, c + u * mul_out, mul_out, (s, u), "sc_weight")
    return owner


def _rows_per_output(spans: list[tuple[int, int]], out_dim: int) -> tuple[torch.Tensor, int]:
    """int32 [out_dim, width]: for each kernel row, the table rows whose output span [first, end) holds it."""
    lists: list[list[int]] = [[] for _ in range(out_dim)]
    for index, (first, end) in enumerate(spans):
        for o in range(first, end):
            lists[o].append(index)
    width = max((len(entries) for entries in lists), default=0)
    padded = [entries + [-1] * (width - len(entries)) for entries in lists]
    return torch.tensor(padded, dtype=torch.int32).reshape(out_dim, width), width


def _column_table(owner: list) -> torch.Tensor:
    return torch.tensor([entry if entry is not None else (-1, 0, 0) for entry in owner],
                        dtype=torch.int32).reshape(len(owner), 3)


def _build_tables(paths: torch.Tensor, self_connections: torch.Tensor, sc_scales: tuple[float, ...],
                  g: AssemblyGeometry, dtype: torch.dtype, device: torch.device) -> AssemblyTables:
    path_rows, sc_rows = paths.tolist(), self_connections.tolist()
    if len(sc_scales) != len(sc_rows):
        raise RuntimeError(f"e3fast: sc_scales has {len(sc_scales)} entries but self_connections has "
                           f"{len(sc_rows)} rows")
    radial_owner = _path_rows(path_rows, g)
    sc_owner = _self_connection_rows(sc_rows, g)
    row_paths, max_row_paths = _rows_per_output(
        [(r[3], r[3] + r[4] * r[5]) if r[1] > 0 else (0, 0) for r in path_rows], g.out_dim)
    row_sc, max_row_sc = _rows_per_output([(r[2], r[2] + r[3] * r[4]) for r in sc_rows], g.out_dim)
    return AssemblyTables(
        paths=paths.to(device=device, dtype=torch.int32), row_paths=row_paths.to(device),
        self_connections=self_connections.to(device=device, dtype=torch.int32), row_self_connections=row_sc.to(device),
        sc_scales=torch.tensor(sc_scales, dtype=torch.float64).to(device=device, dtype=dtype),
        radial_columns=_column_table(radial_owner).to(device), sc_columns=_column_table(sc_owner).to(device),
        max_row_paths=max_row_paths, max_row_self_connections=max_row_sc,
        max_span=max((r[2] * r[5] * g.taps for r in path_rows), default=0),
        max_sc_dim=triton.next_power_of_2(max((r[4] for r in sc_rows), default=1)))


def assembly_tables(paths: torch.Tensor, self_connections: torch.Tensor, sc_scales, g: AssemblyGeometry,
                    dtype: torch.dtype) -> AssemblyTables:
    _check_table(paths, 9, "paths")
    _check_table(self_connections, 6, "self_connections")
    sc_scales = tuple(float(s) for s in sc_scales)
    return tables.digest((paths, self_connections), ("assemble_kernel", sc_scales, g, dtype),
                         lambda p, s: _build_tables(p, s, sc_scales, g, dtype, paths.device))


def _num_taps(kernel_size) -> int:
    if len(kernel_size) != 3 or any(k <= 0 or k % 2 == 0 for k in kernel_size):
        raise RuntimeError(f"e3fast: kernel_size entries must be positive and odd, got {list(kernel_size)}")
    return math.prod(kernel_size)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _assemble_kernel(kernel_ptr, radial_ptr, sc_ptr, basis_ptr, paths_ptr, row_paths_ptr, sc_rows_ptr, row_sc_ptr,
                     sc_scale_ptr, in_dim, radial_numel,
                     TAPS: tl.constexpr, R: tl.constexpr, MAX_ROW_PATHS: tl.constexpr,
                     MAX_ROW_SC: tl.constexpr, OPMATH: tl.constexpr, BLOCK_J: tl.constexpr):
    """Grid: column blocks of a kernel row, kernel rows ``o``."""
    o = tl.program_id(1)
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < in_dim * TAPS
    i = j // TAPS
    t = j - i * TAPS
    acc = tl.zeros([BLOCK_J], OPMATH)
    for e in range(MAX_ROW_PATHS):
        p = tl.load(row_paths_ptr + o * MAX_ROW_PATHS + e)
        if p >= 0:
            row = paths_ptr + p * PATH_COLUMNS
            in_offset = tl.load(row)
            in_mul = tl.load(row + 1)
            d1 = tl.load(row + 2)
            local = o - tl.load(row + 3)
            d3 = tl.load(row + 5)
            w = local // d3
            m3 = local - w * d3
            position = i - in_offset
            hit = j_ok & (position >= 0) & (position < in_mul * d1)
            position = tl.where(hit, position, 0)
            u = position // d1
            m1 = position - u * d1
            column = tl.load(row + 6) + u * tl.load(row + 7) + w
            basis_at = tl.load(row + 8) + ((t * d1 + m1) * d3 + m3) * R
            for r in tl.static_range(R):
                basis = tl.load(basis_ptr + basis_at + r, mask=hit, other=0.0).to(OPMATH)
                weight = tl.load(radial_ptr + r * radial_numel + column, mask=hit, other=0.0).to(OPMATH)
                acc += basis * weight
    for e in range(MAX_ROW_SC):
        s = tl.load(row_sc_ptr + o * MAX_ROW_SC + e)
        if s >= 0:
            row = sc_rows_ptr + s * SELF_CONNECTION_COLUMNS
            in_offset = tl.load(row)
            in_mul = tl.load(row + 1)
            local = o - tl.load(row + 2)
            out_mul = tl.load(row + 3)
            d = tl.load(row + 4)
            w = local // d
            m = local - w * d
            position = i - in_offset
            hit = j_ok & (t == TAPS // 2) & (position >= 0) & (position < in_mul * d)
            position = tl.where(hit, position, 0)
            u = position // d
            hit = hit & (position - u * d == m)
            weight = tl.load(sc_ptr + tl.load(row + 5) + u * out_mul + w, mask=hit, other=0.0).to(OPMATH)
            acc += tl.load(sc_scale_ptr + s) * weight
    tl.store(kernel_ptr + o * in_dim * TAPS + j, to_element_type(acc, kernel_ptr), mask=j_ok)


@triton.jit
def _radial_gradient_kernel(grad_radial_ptr, grad_kernel_ptr, basis_ptr, paths_ptr, columns_ptr, in_dim, radial_numel,
                            TAPS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, MAX_SPAN: tl.constexpr,
                            OPMATH: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid: blocks of radial weight columns. dW[:, column] for all radial functions, reducing
    [columns, kernel entries, R] tiles over the entries (m_3, m_1, t) of each column's path row."""
    column = tl.program_id(0) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    column_ok = column < radial_numel
    entry = columns_ptr + tl.where(column_ok, column, 0) * 3
    p = tl.load(entry)
    used = column_ok & (p >= 0)
    u = tl.load(entry + 1)
    w = tl.load(entry + 2)
    row = paths_ptr + tl.maximum(p, 0) * PATH_COLUMNS
    d1 = tl.where(used, tl.load(row + 2), 1)
    d3 = tl.where(used, tl.load(row + 5), 1)
    row_span = (d1 * TAPS)[:, None]
    span = tl.where(used, d3 * d1 * TAPS, 0)[:, None]
    grad_base = (((tl.load(row + 3) + w * d3) * in_dim + tl.load(row) + u * d1) * TAPS)[:, None]
    basis_base = tl.load(row + 8)[:, None]
    r = tl.arange(0, R_PAD)[None, None, :]
    acc = tl.zeros([BLOCK_COLUMNS, BLOCK_K, R_PAD], OPMATH)
    for k0 in range(0, MAX_SPAN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)[None, :]
        k_ok = k < span
        m3 = k // row_span
        rest = k - m3 * row_span
        m1 = rest // TAPS
        t = rest - m1 * TAPS
        grad = tl.load(grad_kernel_ptr + grad_base + m3 * in_dim * TAPS + rest, mask=k_ok, other=0.0).to(OPMATH)
        basis_at = basis_base + ((t * d1[:, None] + m1) * d3[:, None] + m3) * R
        basis = tl.load(basis_ptr + basis_at[:, :, None] + r, mask=k_ok[:, :, None] & (r < R), other=0.0)
        acc += grad[:, :, None] * basis.to(OPMATH)
    total = tl.sum(acc, axis=1)
    r = tl.arange(0, R_PAD)[None, :]
    tl.store(grad_radial_ptr + r * radial_numel + column[:, None], to_element_type(total, grad_radial_ptr),
             mask=column_ok[:, None] & (r < R))


@triton.jit
def _self_connection_gradient_kernel(grad_sc_ptr, grad_kernel_ptr, sc_rows_ptr, columns_ptr, sc_scale_ptr, in_dim,
                                     TAPS: tl.constexpr, MAX_DIM: tl.constexpr, OPMATH: tl.constexpr):
    """Grid: self-connection weight columns. dV[column] = alpha sum_m dK[o + w d + m, i + u d + m, centre]."""
    column = tl.program_id(0)
    s = tl.load(columns_ptr + column * 3)
    m = tl.arange(0, MAX_DIM)
    acc = tl.zeros([MAX_DIM], OPMATH)
    if s >= 0:
        u = tl.load(columns_ptr + column * 3 + 1)
        w = tl.load(columns_ptr + column * 3 + 2)
        row = sc_rows_ptr + s * SELF_CONNECTION_COLUMNS
        d = tl.load(row + 4)
        out_row = tl.load(row + 2) + w * d + m
        in_column = tl.load(row) + u * d + m
        grad = tl.load(grad_kernel_ptr + (out_row * in_dim + in_column) * TAPS + TAPS // 2, mask=m < d, other=0.0)
        acc = grad.to(OPMATH) * tl.load(sc_scale_ptr + s)
    tl.store(grad_sc_ptr + column, to_element_type(tl.sum(acc, axis=0), grad_sc_ptr))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _pointer(t: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or a valid stand-in for an empty tensor that the kernel does not read."""
    return fallback if t.numel() == 0 else t


def _check_same_dtype(dtype: torch.dtype, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        check_floating(t, name, "assemble_kernel")
        if t.dtype != dtype:
            raise RuntimeError(f"e3fast: {name} must have dtype {dtype}, got {t.dtype}")


def assemble_kernel(radial_weight, sc_weight, basis, paths, self_connections, sc_scales, out_dim: int, in_dim: int,
                    kernel_size):
    """Launcher of the forward op (the arguments and results of ``e3fast::assemble_kernel``)."""
    _check_same_dtype(radial_weight.dtype, radial_weight=radial_weight, sc_weight=sc_weight, basis=basis)
    if radial_weight.dim() != 2 or sc_weight.dim() != 1 or basis.dim() != 1:
        raise RuntimeError(f"e3fast: radial_weight must be 2-D, sc_weight and basis 1-D, got "
                           f"{list(radial_weight.shape)}, {list(sc_weight.shape)}, {list(basis.shape)}")
    if out_dim < 0 or in_dim < 0:
        raise RuntimeError("e3fast: out_dim and in_dim must be non-negative")
    g = AssemblyGeometry(out_dim, in_dim, _num_taps(kernel_size), radial_weight.shape[0], radial_weight.shape[1],
                         sc_weight.shape[0], basis.numel())
    opmath = opmath_dtype(radial_weight.dtype)
    t = assembly_tables(paths, self_connections, sc_scales, g, opmath)
    kernel = radial_weight.new_empty(out_dim, in_dim, *kernel_size)
    if kernel.numel() == 0:
        return kernel
    radial_weight, sc_weight, basis = radial_weight.contiguous(), sc_weight.contiguous(), basis.contiguous()
    grid = (triton.cdiv(in_dim * g.taps, BLOCK_J), out_dim)
    _assemble_kernel[grid](
        kernel, _pointer(radial_weight, kernel), _pointer(sc_weight, kernel), _pointer(basis, kernel),
        _pointer(t.paths, t.row_paths), _pointer(t.row_paths, t.paths), _pointer(t.self_connections, t.paths),
        _pointer(t.row_self_connections, t.paths), _pointer(t.sc_scales, kernel), in_dim, max(g.radial_numel, 1),
        TAPS=g.taps, R=g.num_radial, MAX_ROW_PATHS=t.max_row_paths, MAX_ROW_SC=t.max_row_self_connections,
        OPMATH=tl_dtype(opmath), BLOCK_J=BLOCK_J)
    return kernel


def assemble_kernel_backward(grad_kernel, basis, paths, self_connections, sc_scales, num_radial: int,
                             radial_numel: int, sc_numel: int):
    """Launcher of the backward op (the arguments and results of ``e3fast::assemble_kernel_backward``)."""
    _check_same_dtype(grad_kernel.dtype, grad_kernel=grad_kernel, basis=basis)
    if grad_kernel.dim() != 5 or basis.dim() != 1:
        raise RuntimeError(f"e3fast: grad_kernel must be 5-D [out_dim, in_dim, kx, ky, kz] and basis 1-D, got "
                           f"{list(grad_kernel.shape)} and {list(basis.shape)}")
    if min(num_radial, radial_numel, sc_numel) < 0:
        raise RuntimeError("e3fast: num_radial, radial_numel and sc_numel must be non-negative")
    g = AssemblyGeometry(grad_kernel.shape[0], grad_kernel.shape[1], _num_taps(grad_kernel.shape[2:]), num_radial,
                         radial_numel, sc_numel, basis.numel())
    opmath = opmath_dtype(grad_kernel.dtype)
    t = assembly_tables(paths, self_connections, sc_scales, g, opmath)
    grad_radial = grad_kernel.new_empty(num_radial, radial_numel)
    grad_sc = grad_kernel.new_empty(sc_numel)
    grad_kernel, basis = grad_kernel.contiguous(), basis.contiguous()
    if grad_radial.numel() > 0 and t.paths.numel() == 0:
        grad_radial.zero_()
    elif grad_radial.numel() > 0:
        _radial_gradient_kernel[(triton.cdiv(radial_numel, BLOCK_COLUMNS),)](
            grad_radial, grad_kernel, _pointer(basis, grad_kernel), t.paths, t.radial_columns, g.in_dim,
            radial_numel, TAPS=g.taps, R=num_radial, R_PAD=triton.next_power_of_2(num_radial), MAX_SPAN=t.max_span,
            OPMATH=tl_dtype(opmath), BLOCK_COLUMNS=BLOCK_COLUMNS, BLOCK_K=BLOCK_K)
    if sc_numel > 0:
        _self_connection_gradient_kernel[(sc_numel,)](
            grad_sc, grad_kernel, _pointer(t.self_connections, t.sc_columns), t.sc_columns,
            _pointer(t.sc_scales, grad_sc), g.in_dim, TAPS=g.taps, MAX_DIM=t.max_sc_dim, OPMATH=tl_dtype(opmath))
    return grad_radial, grad_sc
