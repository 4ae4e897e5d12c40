"""Settings shared by the benchmark modules: the volume size and the backend e3fast runs on."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from e3fast.backends import select_backend

DEFAULT_SIZE = 64


def bench_size() -> int:
    """Edge length of the benchmark volumes (``E3FAST_BENCH_SIZE``, default 64)."""
    value = os.environ.get("E3FAST_BENCH_SIZE", str(DEFAULT_SIZE))
    try:
        size = int(value)
    except ValueError:
        raise pytest.UsageError(f"E3FAST_BENCH_SIZE must be an integer, got {value!r}") from None
    if size < 16 or size % 8:
        raise pytest.UsageError("E3FAST_BENCH_SIZE must be a multiple of 8 (3 poolings) and at least 16 "
                                f"(instance norm needs more than one voxel at the bottom), got {size}")
    return size


def automatic_backend(device: str = "cpu") -> str:
    """The backend e3fast picks by itself for the fused ops on ``device`` (norm_gate's choice)."""
    norm_gate_module = importlib.import_module("e3fast.ops.norm_gate")  # the package exports the function
    return select_backend(torch.device(device), "norm_gate", norm_gate_module.IMPLEMENTED)
