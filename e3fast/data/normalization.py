"""Per-channel z-score normalization of an image volume.

As nnU-Net does for MRI: each channel's mean and standard deviation are taken over the voxels
where the image is non-zero in some channel (the head of a skull-stripped scan); the voxels
outside that mask are set to 0. A volume that is non-zero everywhere (CT, noisy backgrounds) is
normalized over all of its voxels.
"""
from __future__ import annotations

import numpy as np


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """``[x, y, z]`` bool: voxels where any channel of ``[channels, x, y, z]`` is non-zero."""
    return np.any(image != 0, axis=0)


def zscore_channels(image: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``[channels, x, y, z]`` -> float32, each channel standardized over the non-zero mask."""
    image = np.asarray(image, dtype=np.float32)
    mask = nonzero_mask(image)
    if not mask.any():
        return np.zeros_like(image)
    out = np.empty_like(image)
    for channel in range(image.shape[0]):
        values = image[channel][mask]
        mean = values.mean(dtype=np.float64)
        std = values.std(dtype=np.float64)
        out[channel] = (image[channel] - mean) / max(std, eps)
        out[channel][~mask] = 0
    return out
