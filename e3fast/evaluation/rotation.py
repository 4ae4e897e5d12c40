"""Rotating a test case about a grid axis, as in the paper's robustness experiment.

The case is first centred on a cubic canvas (zero padding), so a rotation about any axis keeps
the canvas and multiples of 90 degrees are exact grid permutations (``np.rot90``). Other angles
resample with ``scipy.ndimage.rotate`` about the canvas centre: images with cubic splines, label
maps and the head mask (non-zero voxels) with nearest neighbours; image voxels outside the rotated
head are set to 0, as they were before the rotation (the spline's ringing would otherwise put
small non-zero values everywhere, and the z-score normalization over non-zero voxels with them).

Rotation about axis ``a`` turns the next axis towards the one after it (x: y->z, y: z->x,
z: x->y), for positive angles, the same direction for both code paths.
"""
from __future__ import annotations

import numpy as np

AXES = {"x": 0, "y": 1, "z": 2}
ROTATION_PLANES = {0: (1, 2), 1: (2, 0), 2: (0, 1)}


def cube_edge(shape, window=None) -> int:
    """Edge of the cubic canvas for a volume of ``shape``: its largest size, plus 1 where needed so
    that a canvas smaller than the largest ``window`` size differs from it by an even number."""
    edge = int(max(shape))
    if window is not None and edge < max(window) and (max(window) - edge) % 2:
        edge += 1
    return edge


def pad_to_cube(volume: np.ndarray, edge: int) -> np.ndarray:
    """Centre the last three axes of ``volume`` on a cube of ``edge`` voxels (zeros around)."""
    shape = volume.shape[-3:]
    if max(shape) > edge:
        raise ValueError(f"pad_to_cube: volume {shape} does not fit in a cube of {edge}")
    pads = [(0, 0)] * (volume.ndim - 3) + [((edge - n) // 2, edge - n - (edge - n) // 2) for n in shape]
    return np.pad(volume, pads)


def rotate_volume(volume: np.ndarray, axis: int, degrees: float, order: int) -> np.ndarray:
    """Rotate the last three axes of ``volume`` about spatial ``axis`` (0, 1, 2) by ``degrees``.

    Multiples of 90 degrees use ``np.rot90`` (exact); other angles ``scipy.ndimage.rotate`` with
    spline ``order`` (0: nearest), zeros outside, the shape kept. The rotated axes must have equal
    sizes.
    """
    if axis not in ROTATION_PLANES:
        raise ValueError(f"rotate_volume: axis must be 0, 1 or 2, got {axis}")
    offset = volume.ndim - 3
    first, second = (offset + a for a in ROTATION_PLANES[axis])
    if volume.shape[first] != volume.shape[second]:
        raise ValueError(f"rotate_volume: the plane of rotation about axis {axis} is not square "
                         f"(shape {volume.shape[-3:]}); pad the volume to a cube first")
    quarter_turns, remainder = divmod(float(degrees), 90.0)
    if remainder == 0:
        return np.ascontiguousarray(np.rot90(volume, int(quarter_turns) % 4, axes=(first, second)))
    from scipy import ndimage

    if first > second:  # ndimage.rotate sorts its axes: turning from the later axis is the opposite angle
        first, second, degrees = second, first, -degrees
    return ndimage.rotate(volume, float(degrees), axes=(first, second), reshape=False, order=order,
                          mode="constant", cval=0.0, prefilter=order > 1)


def rotate_case(image: np.ndarray, labels: np.ndarray, axis: int, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate ``image [C, x, y, z]`` (cubic spline, zero outside the rotated head) and
    ``labels [x, y, z]`` (nearest neighbour) about ``axis`` by ``degrees``."""
    if image.shape[1:] != labels.shape:
        raise ValueError(f"rotate_case: image {image.shape} and labels {labels.shape} differ in size")
    rotated_labels = rotate_volume(labels, axis, degrees, order=0)
    head = rotate_volume(np.any(image != 0, axis=0).astype(np.uint8), axis, degrees, order=0).astype(bool)
    rotated = np.stack([rotate_volume(channel.astype(np.float32), axis, degrees, order=3) for channel in image])
    rotated[:, ~head] = 0
    return rotated.astype(np.float32, copy=False), rotated_labels
