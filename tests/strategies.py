"""Hypothesis strategies for random irreps and random voxel shapes."""
from __future__ import annotations

from hypothesis import strategies as st
from e3nn import o3

ALL_IRREPS = ("0e", "0o", "1e", "1o", "2e", "2o", "3o")


def irreps(choices=ALL_IRREPS, max_mul: int = 5, min_dim: int = 1, max_entries: int = 4):
    """Random irreps (entries from ``choices``, multiplicities 0..max_mul), at least ``min_dim`` wide."""
    entry = st.tuples(st.integers(0, max_mul), st.sampled_from(choices))
    return (st.lists(entry, min_size=1, max_size=max_entries)
            .map(lambda entries: o3.Irreps([(mul, ir) for mul, ir in entries]))
            .filter(lambda ir: ir.dim >= min_dim))


def spatial_size(low: int = 1, high: int = 7):
    return st.tuples(st.integers(low, high), st.integers(low, high), st.integers(low, high))
