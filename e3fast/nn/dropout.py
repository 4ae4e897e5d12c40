"""Equivariant dropout: whole irrep copies dropped, the same mask at every voxel."""
from __future__ import annotations

import torch

from e3fast.irreps_layout import check_voxel_input, irreps_channels, parse_irreps


class Dropout(torch.nn.Module):
    """``e3nn.nn.Dropout(irreps, p)`` on ``[batch, irreps.dim, x, y, z]`` tensors.

    In training each sample's irrep copies are kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``; ``p = 0`` and eval mode are the identity.
    """

    def __init__(self, irreps, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.irreps = parse_irreps(irreps)
        self.channels = irreps_channels(self.irreps)
        self.p = p
        dims = [ir.dim for mul, ir in self.irreps for _ in range(mul)]
        self.register_buffer("copy_of_channel", torch.repeat_interleave(
            torch.arange(len(dims)), torch.tensor(dims, dtype=torch.long)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        check_voxel_input(x, self.channels)
        keep = torch.full((x.shape[0], self.channels.num_irreps), 1.0 - self.p, device=x.device, dtype=x.dtype)
        mask = keep.bernoulli() / (1.0 - self.p) if self.p < 1.0 else torch.zeros_like(keep)
        return x * mask[:, self.copy_of_channel, None, None, None]

    def extra_repr(self) -> str:
        return f"{self.irreps}, p={self.p}"
