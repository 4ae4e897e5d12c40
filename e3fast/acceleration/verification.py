"""Checking a replacement against the module it replaces, on a random input, before swapping.

Modules recognised by their structure rather than their class (e3nn_Unet's, which cannot be
imported) might compute something else than their attributes suggest; such a module is replaced
only when the replacement gives its outputs. The input is drawn from a private generator, so the
check leaves the global random state alone.
"""
from __future__ import annotations

import torch

from e3fast.acceleration.recognition import Unsupported, _triple

RTOL = 1e-4


def convolution_example(conv: torch.nn.Module) -> torch.Tensor:
    """One sample of the kernel's size: every tap meets every output voxel's neighbourhood."""
    return _random(conv.weight, conv.sc.irreps_in.dim, tuple(conv.sh.shape[:3]))


def pooling_example(pool: torch.nn.Module, irreps_dim: int) -> torch.Tensor:
    """One sample covering two windows per axis."""
    return _random(None, irreps_dim, tuple(2 * k for k in _triple(pool.kernel_size)))


def _random(like: torch.Tensor | None, channels: int, spatial: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, *spatial, generator=generator, dtype=torch.float64)
    if like is None:
        return x.to(torch.get_default_dtype())
    return x.to(device=like.device, dtype=like.dtype)


def check_same_outputs(original: torch.nn.Module, replacement: torch.nn.Module, example: torch.Tensor) -> None:
    """Raise :class:`Unsupported` unless both modules give the same output on ``example``."""
    with torch.no_grad():
        try:
            expected = original(example)
        except Exception as error:  # the original's own failure: nothing to compare with
            raise Unsupported(f"its forward failed on a test input ({type(error).__name__}: {error})") from None
        actual = replacement(example)
    if actual.shape != expected.shape:
        raise Unsupported(f"its output has shape {tuple(expected.shape)}, e3fast's {tuple(actual.shape)}")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    if error > RTOL * max(scale, 1e-30):
        raise Unsupported(f"it computes something else than its structure says (relative difference "
                          f"{error / max(scale, 1e-30):.2g} on a test input)")
