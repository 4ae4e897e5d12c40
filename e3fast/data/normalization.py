"""Per-channel z-score normalization of an image volume (what training and inference both apply).

As nnU-Net does for MRI, with ``use_nonzero_mask=True`` (the default): each channel's mean and
standard deviation are taken over the voxels where the image is non-zero in some channel (the head
of a skull-stripped scan), and the voxels outside that mask are set to 0. A volume that is non-zero
everywhere (CT, noisy backgrounds) is thereby normalized over all of its voxels, as it is with
``use_nonzero_mask=False``.
"""
from __future__ import annotations

import numpy as np

STD_EPSILON = 1e-8


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """``[x, y, z]`` bool: voxels where any channel of ``[channels, x, y, z]`` is non-zero."""
    return np.any(image != 0, axis=0)


def normalize_channels(image: np.ndarray, use_nonzero_mask: bool = True) -> np.ndarray:
    """``[channels, x, y, z]`` -> float32, each channel standardized (see the module docstring)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"normalize_channels expects [channels, x, y, z], got shape {image.shape}")
    mask = nonzero_mask(image) if use_nonzero_mask else np.ones(image.shape[1:], dtype=bool)
    if not mask.any():
        return np.zeros_like(image)
    out = np.empty_like(image)
    for channel in range(image.shape[0]):
        values = image[channel][mask]
        mean = values.mean(dtype=np.float64)
        std = values.std(dtype=np.float64)
        out[channel] = (image[channel] - mean) / max(std, STD_EPSILON)
        out[channel][~mask] = 0
    return out
