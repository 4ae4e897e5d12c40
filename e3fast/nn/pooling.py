"""Norm-based max pooling module."""
from __future__ import annotations

import torch

from e3fast.irreps_layout import field_table, irreps_channels, parse_irreps
from e3fast.ops import norm_max_pool3d
from e3fast.ops.norm_max_pool import _triple


class NormMaxPool3d(torch.nn.Module):
    """Per irrep copy, keep the vector of largest norm in each window (plain max for scalars).

    ``kernel_size`` and ``stride`` (default: ``kernel_size``) per axis; no padding, floor mode.
    Correct per sample for any batch size.
    """

    def __init__(self, irreps, kernel_size, stride=None):
        super().__init__()
        self.irreps = parse_irreps(irreps)
        self.channels = irreps_channels(self.irreps)
        self.register_buffer("fields", field_table(self.irreps), persistent=False)
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _triple(stride, "stride")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_max_pool3d(x, self.channels, self.kernel_size, self.stride, self.fields)

    def extra_repr(self) -> str:
        return f"{self.irreps}, kernel_size={self.kernel_size}, stride={self.stride}"
