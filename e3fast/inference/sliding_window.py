"""Sliding-window inference with Gaussian importance weighting (MONAI's inferer convention).

The volume is covered by windows of the training patch size overlapping by ``overlap`` (0.5);
each window's logits are weighted by a Gaussian centred on the window (standard deviation
``sigma_scale`` = 0.125 times its size, as MONAI's ``compute_importance_map`` with mode
``'gaussian'``: normalized to 1 at the centre, clamped below at its smallest non-zero value) and
the weighted sum is divided by the summed weights. Windows trust their centre, where the network
saw the most context.

Where e3fast departs from MONAI: the window positions are evenly spaced from 0 to
``size - window`` and mirror symmetric along every axis (the k-th from the start and the k-th
from the end are at the same distance from their ends; MONAI steps from 0 and adds a last window
at the end), they depend on an axis's length only, and a volume smaller than the window is padded
equally at both ends (an odd total padding is refused: it would shift the volume by half a
voxel). So the whole prediction commutes with the grid's 90-degree rotations and flips whenever
the network does and the window is cubic: an exactly equivariant network gives exactly rotated
predictions.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_OVERLAP = 0.5
DEFAULT_SIGMA_SCALE = 0.125


def window_starts(length: int, window: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Start offsets of windows of ``window`` voxels covering ``length`` (>= window) voxels.

    ``count = ceil(span / stride) + 1`` windows (``span = length - window``,
    ``stride = max(1, int(window * (1 - overlap)))``, as MONAI's scan interval) at
    ``round(k * span / (count - 1))`` with halves rounded away from the middle, so that
    ``starts[-1 - k] == span - starts[k]``; consecutive windows are at most ``stride + 1``
    voxels apart (``stride`` where the spacing comes out whole).
    """
    if window < 1 or length < window:
        raise ValueError(f"window_starts: need 1 <= window <= length, got window {window}, length {length} "
                         "(pad the volume first)")
    if not 0 <= overlap < 1:
        raise ValueError(f"window_starts: overlap must be in [0, 1), got {overlap}")
    span = length - window
    if span == 0:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    count = math.ceil(span / stride) + 1
    first_half = [math.floor(k * span / (count - 1)) for k in range((count + 1) // 2)]
    starts = sorted(set(first_half) | {span - start for start in first_half})
    return starts


def gaussian_importance(window: Sequence[int], sigma_scale: float = DEFAULT_SIGMA_SCALE,
                        dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``[*window]`` Gaussian weights: 1 at the centre, ``sigma = sigma_scale * size`` per axis,
    clamped below at the smallest non-zero weight (MONAI's importance map, mode 'gaussian')."""
    if sigma_scale <= 0:
        raise ValueError(f"gaussian_importance: sigma_scale must be > 0, got {sigma_scale}")
    weights = None
    for axis, size in enumerate(window):
        x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
        profile = torch.exp(-0.5 * (x / (sigma_scale * size)) ** 2)
        shape = [1] * len(window)
        shape[axis] = size
        weights = profile.view(shape) if weights is None else weights * profile.view(shape)
    weights = (weights / weights.max()).to(dtype)
    smallest = weights[weights > 0].min()
    return weights.clamp_min(smallest)


def symmetric_padding(shape: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis ``(before, after)`` padding that brings ``shape`` up to ``window`` equally at both ends.

    Raises ValueError where the missing size is odd (the volume would move by half a voxel, and
    rotated predictions would no longer be rotations of each other).
    """
    pads = []
    for axis, (n, w) in enumerate(zip(shape, window)):
        missing = max(0, w - n)
        if missing % 2:
            raise ValueError(f"axis {axis} of the volume ({n} voxels) is smaller than the window ({w}) by an odd "
                             "number of voxels; choose a window of the same parity or pad the volume")
        pads.append((missing // 2, missing // 2))
    return pads


def _window_slices(position, window) -> tuple[slice, ...]:
    return tuple(slice(start, start + size) for start, size in zip(position, window))


def sliding_window_inference(volume: torch.Tensor, window: Sequence[int],
                             predict: Callable[[torch.Tensor], torch.Tensor],
                             overlap: float = DEFAULT_OVERLAP, sigma_scale: float = DEFAULT_SIGMA_SCALE,
                             batch_size: int = 1,
                             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Logits ``[B, classes, x, y, z]`` (float32) of ``volume [B, C, x, y, z]`` from windows of size ``window``.

    ``predict`` maps ``[n, C, *window]`` to ``[n, classes, *window]``; up to ``batch_size``
    windows go through it at a time. ``progress(done, total)`` is called after each call.
    """
    if volume.dim() != 5:
        raise ValueError(f"sliding_window_inference: volume must be [batch, channels, x, y, z], "
                         f"got shape {tuple(volume.shape)}")
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"sliding_window_inference: window must be 3 positive sizes, got {window}")
    if batch_size < 1:
        raise ValueError(f"sliding_window_inference: batch_size must be >= 1, got {batch_size}")
    pads = symmetric_padding(volume.shape[-3:], window)
    padded = F.pad(volume, [p for pair in reversed(pads) for p in pair])
    shape = tuple(padded.shape[-3:])
    starts = [window_starts(n, w, overlap) for n, w in zip(shape, window)]
    positions = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    weights = gaussian_importance(window, sigma_scale, device=volume.device)
    total = torch.zeros(shape, dtype=torch.float32, device=volume.device)
    for position in positions:
        total[_window_slices(position, window)] += weights
    crops = [(sample, position) for sample in range(volume.shape[0]) for position in positions]
    logits = None
    for first in range(0, len(crops), batch_size):
        chunk = crops[first:first + batch_size]
        inputs = torch.stack([padded[sample][(slice(None),) + _window_slices(position, window)]
                              for sample, position in chunk])
        outputs = predict(inputs).float()
        if outputs.shape[0] != len(chunk) or tuple(outputs.shape[2:]) != window:
            raise ValueError(f"sliding_window_inference: predict returned shape {tuple(outputs.shape)} for input "
                             f"{tuple(inputs.shape)}; expected [{len(chunk)}, classes, {', '.join(map(str, window))}]")
        if logits is None:
            logits = torch.zeros((volume.shape[0], outputs.shape[1]) + shape, dtype=torch.float32,
                                 device=volume.device)
        for (sample, position), window_logits in zip(chunk, outputs):
            logits[sample][(slice(None),) + _window_slices(position, window)] += window_logits * weights
        if progress is not None:
            progress(min(first + batch_size, len(crops)), len(crops))
    logits = logits / total
    return logits[(Ellipsis,) + tuple(slice(lo, n - hi) for (lo, hi), n in zip(pads, shape))]
