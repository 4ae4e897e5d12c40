"""Sliding-window inference with Gaussian weighting (the convention of nnU-Net and MONAI's inferer).

The volume is covered by windows of the training patch size overlapping by ``overlap``; each
window's logits are weighted by a Gaussian centred on the window (standard deviation
``sigma_scale`` times its size, nnU-Net's 1/8) and the weighted sum is divided by the summed
weights. Windows trust their centre, where the network saw the most context.

The window positions are mirror symmetric along every axis (the k-th from the start and the
k-th from the end are at the same distance from their ends) and identical for axes of equal
length, and a volume smaller than the window is padded equally at both ends. So the whole
prediction commutes with the grid's 90-degree rotations and flips whenever the network does:
an exactly equivariant network gives exactly rotated predictions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``window`` voxels covering ``length`` (>= window) voxels.

    Consecutive windows are at most ``window * (1 - overlap)`` apart; the offsets are symmetric:
    ``starts[-1 - k] == length - window - starts[k]``.
    """
    if length < window:
        raise ValueError(f"the volume ({length}) is smaller than the window ({window}); pad it first")
    span = length - window
    if span == 0:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    count = math.ceil(span / stride) + 1
    starts = set()
    for k in range(count):
        if 2 * k < count - 1:
            start = math.floor(k * span / (count - 1))
            starts.update((start, span - start))
        elif 2 * k == count - 1:  # the middle window; two mirror images when the span is odd
            starts.update((span // 2, span - span // 2))
    return sorted(starts)


def gaussian_importance(window, sigma_scale: float = 0.125, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[*window]`` Gaussian weights, 1 at the centre, clamped away from 0."""
    axes = []
    for n in window:
        x = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return weights.clamp_min(1e-3).to(dtype)


def _symmetric_padding(shape, window) -> list[tuple[int, int]]:
    """Per axis (before, after) padding that brings ``shape`` up to ``window`` equally at both ends."""
    pads = []
    for n, w in zip(shape, window):
        missing = max(0, w - n)
        pads.append((missing // 2, missing - missing // 2))
    return pads


def sliding_window_inference(volume: torch.Tensor, window, predict: Callable[[torch.Tensor], torch.Tensor],
                             overlap: float = 0.5, sigma_scale: float = 0.125, batch_size: int = 1,
                             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Logits ``[B, classes, x, y, z]`` of ``volume [B, C, x, y, z]`` from windows of size ``window``.

    ``predict`` maps ``[n, C, *window]`` to ``[n, classes, *window]``; ``batch_size`` windows go
    through it at a time. The output is float32 on ``volume``'s device.
    """
    window = tuple(int(w) for w in window)
    pads = _symmetric_padding(volume.shape[-3:], window)
    padded = torch.nn.functional.pad(volume, [p for pair in reversed(pads) for p in pair])
    shape = padded.shape[-3:]
    starts = [window_starts(n, w, overlap) for n, w in zip(shape, window)]
    positions = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    weights = gaussian_importance(window, sigma_scale, device=volume.device)
    logits = None
    total = torch.zeros(shape, dtype=torch.float32, device=volume.device)
    for first in range(0, len(positions), batch_size):
        chunk = positions[first:first + batch_size]
        for sample in range(volume.shape[0]):
            crops = torch.stack([padded[sample, :, a:a + window[0], b:b + window[1], c:c + window[2]]
                                 for a, b, c in chunk])
            out = predict(crops).float()
            if logits is None:
                logits = torch.zeros((volume.shape[0], out.shape[1]) + tuple(shape), dtype=torch.float32,
                                     device=volume.device)
            for (a, b, c), window_logits in zip(chunk, out):
                logits[sample, :, a:a + window[0], b:b + window[1], c:c + window[2]] += window_logits * weights
        for a, b, c in chunk:
            total[a:a + window[0], b:b + window[1], c:c + window[2]] += weights
        if progress is not None:
            progress(min(first + batch_size, len(positions)), len(positions))
    logits = logits / total
    (x0, x1), (y0, y1), (z0, z1) = pads
    return logits[..., x0:shape[0] - x1, y0:shape[1] - y1, z0:shape[2] - z1]
