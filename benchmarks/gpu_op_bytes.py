"""The bytes each fused op must move at least: the byte models behind the GPU benchmark's GB/s.

Achieved bandwidth = these bytes / the median time; an op at the roofline reaches the device's
peak DRAM bandwidth with them. Arguments are byte counts (no torch here, the report uses this).
"""
from __future__ import annotations

BYTE_MODEL_TEXT = """\
Bytes an ideal implementation must move between DRAM and the chip. `X`, `Y`: the input and output
volumes; `A`: the argmax saved for backward, one byte per field (e3fast) or per channel (torch) and
output voxel. Parameters and per-channel statistics are too small to count. A [2, 36, 128^3]
volume (302-604 MB) does not fit in on-chip memory, so a normalization reads its input twice.

| op | forward | backward | forward + backward |
|---|---|---|---|
| norm + gate, instance norm + LeakyReLU | `2X + Y`: statistics pass, then normalize, gate and write | `2(X + dY) + dX`: reduce the two gradient means from the input and the output gradient, then read both again and write the input gradient | `5X + 3Y` |
| norm max pooling, max_pool3d | `X + Y + A` (torch's max_pool3d without autograd: `X + Y`) | `dY + A + dX` (every input voxel's gradient is written) | `2(X + Y + A)` |
| kernel assembly | `B + W + K`: the constant basis, the weights, the kernel | `dK + B + dW` | `2(B + W + K)` |

Gradients have the sizes of what they differentiate (`dX = X`, `dY = Y`). The kernel assembly is a
small grouped GEMM whose time is mostly launch overhead at these sizes; its GB/s says how far it is
from being limited by memory at all."""


def normalization_bytes(which: str, x: int, y: int) -> int:
    """norm + gate, or instance norm + activation, instance statistics."""
    return 2 * x + y if which == "fwd" else 5 * x + 3 * y


def pooling_bytes(which: str, x: int, y: int, argmax: int) -> int:
    """Max pooling that saves an argmax for backward."""
    return x + y + argmax if which == "fwd" else 2 * (x + y + argmax)


def plain_pooling_bytes(which: str, x: int, y: int, argmax: int) -> int:
    """torch's max_pool3d: without autograd it needs no argmax."""
    return x + y if which == "fwd" else pooling_bytes(which, x, y, argmax)


def assembly_bytes(which: str, basis: int, weights: int, kernel: int) -> int:
    once = basis + weights + kernel
    return once if which == "fwd" else 2 * once
