"""Settings shared by the benchmark modules: the volume size and the backend e3fast runs on, and
the CPU whole-network workload (the paper's U-Net, its inputs and training step)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------- whole-network workload (CPU)

NUM_CLASSES = 4
PAPER_UNET = dict(input_irreps="1x0e", output_irreps=f"{NUM_CLASSES}x0e", diameter=5, num_radial_basis=5,
                  steps=(1, 1, 1), n=2, n_downsample=3)
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def backend_label(impl: str) -> str:
    """The ``backend`` recorded for a row: e3fast's automatic choice, ``-`` for other implementations."""
    return f"auto: {automatic_backend()}" if impl == "e3fast" else "-"


def segmentation_inputs(memory_format: str):
    """A fixed random ``1x1xS^3`` input in ``memory_format`` and a ``1xS^3`` label map."""
    size = bench_size()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, size, size, size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (1, size, size, size), generator=generator)
    return x.contiguous(memory_format=MEMORY_FORMATS[memory_format]), labels


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor):
    """One step: forward, cross-entropy, backward, optimizer step; gradients released after it."""
    def step():
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
