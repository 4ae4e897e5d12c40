"""Reading a case's NIfTI files into arrays (nibabel), as stored: no reorientation, no resampling.

The image is ``[channels, x, y, z]`` float32 in the files' own voxel axis order; the voxel spacing
is the header's zooms in that same order, which is what the network takes as ``steps``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from e3fast.data.dataset import Case, DatasetError


@dataclass
class CaseVolume:
    """A case in memory: ``image [C, x, y, z]`` float32, ``label [x, y, z]`` int64 (or None), the
    first channel's affine and header, and the voxel ``spacing`` (x, y, z)."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]


def open_image(path: Path):
    """The nibabel image of ``path`` (header only; data read lazily), or a DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DatasetError(f"{path}: unreadable image ({type(error).__name__}: {error})") from error


def read_array(image, path: Path, dtype) -> np.ndarray:
    """The voxel data of an opened image as ``dtype``, or a DatasetError naming ``path``."""
    try:
        return np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:
        raise DatasetError(f"{path}: unreadable voxel data ({type(error).__name__}: {error})") from error


def spacing_of(image) -> tuple[float, float, float]:
    """Voxel size along the three spatial axes of a nibabel image, in the array's axis order."""
    return tuple(float(zoom) for zoom in image.header.get_zooms()[:3])


def read_image_channels(case: Case) -> tuple[np.ndarray, object]:
    """``[C, x, y, z]`` float32 of a case and the nibabel image of its first file."""
    first = open_image(case.image_paths[0])
    if case.layout == "msd":
        data = read_array(first, case.image_paths[0], np.float32)
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise DatasetError(f"{case.image_paths[0]}: expected a 3D or 4D image, got shape {data.shape}")
        return np.ascontiguousarray(np.moveaxis(data, -1, 0)), first
    channels = []
    for path in case.image_paths:
        data = read_array(open_image(path), path, np.float32)
        if data.ndim != 3:
            raise DatasetError(f"{path}: expected a 3D image per channel, got shape {data.shape}")
        channels.append(data)
    shapes = {channel.shape for channel in channels}
    if len(shapes) > 1:
        raise DatasetError(f"{case.image_paths[0]}: channels of case {case.name!r} differ in shape: {sorted(shapes)}")
    return np.stack(channels), first


def read_label(path: Path) -> np.ndarray:
    """An integer label map ``[x, y, z]`` int64; non-integer values are a DatasetError naming ``path``."""
    data = read_array(open_image(path), path, np.float64)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D label map, got shape {data.shape}")
    labels = np.rint(data)
    if not np.array_equal(labels, data):
        raise DatasetError(f"{path}: label map has non-integer values")
    return labels.astype(np.int64)


def read_case(case: Case) -> CaseVolume:
    """Read a case's channels and label map (None for test cases) as stored on disk."""
    image, first = read_image_channels(case)
    label = read_label(case.label_path) if case.label_path is not None else None
    if label is not None and label.shape != image.shape[1:]:
        raise DatasetError(f"{case.label_path}: label shape {label.shape} differs from the image shape "
                           f"{image.shape[1:]} of {case.image_paths[0]}")
    return CaseVolume(case.name, image, label, np.asarray(first.affine), first.header, spacing_of(first))
