"""Voxel tensors as the kernels read them: ``[batch, channels, voxels]`` with one voxel stride.

NCDHW-contiguous and channels_last_3d tensors are read in place (voxel stride 1 or ``channels``);
any other strides are copied to NCDHW first. Outputs take the memory format of the input.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def dense_voxels(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when NCDHW or channels_last_3d contiguous, else an NCDHW copy."""
    return t if is_channels_last(t) else t.contiguous()


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if is_channels_last(t) else torch.contiguous_format


def voxel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Element strides of batch, channel and flattened voxel of a :func:`dense_voxels` tensor."""
    return t.stride(0), t.stride(1), t.stride(4)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: float32 for half precision, else the dtype itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a floating torch dtype."""
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def check_floating(t: torch.Tensor, name: str, op: str) -> None:
    if t.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"e3fast::{op}: {name} must be float64, float32, bfloat16 or float16, got {t.dtype}")


# Tiles are [channels, voxels] for NCDHW and [voxels, channels] for channels-last (the contiguous
# axis last); "channels" may also be fields. These place a vector along one axis of such a tile.


@triton.jit
def per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A vector over the tile's channels (or fields), broadcastable against the tile."""
    if CHANNELS_LAST:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def per_voxel(v, CHANNELS_LAST: tl.constexpr):
    """A vector over the tile's voxels, broadcastable against the tile."""
    if CHANNELS_LAST:
        out = v[:, None]
    else:
        out = v[None, :]
    return out
