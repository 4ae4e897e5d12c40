"""Reading multi-channel NIfTI cases and writing label maps that keep the input's geometry.

A case is one or more NIfTI files of the same grid (nnU-Net naming: ``CASE_0000.nii.gz``,
``CASE_0001.nii.gz``, ... one file per channel). A written label map keeps the first channel's
affine and header (qform, sform, voxel sizes, units, description); only the data type changes
(uint8 where every label value fits, else int16) and any intensity scaling is dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_PATTERN = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class NiftiCase:
    """A case to segment: its name and its channel files in channel order."""

    name: str
    channel_paths: list[Path]


@dataclass
class LoadedImage:
    """Image ``[channels, x, y, z]`` float32 with the first channel file's affine and header."""

    image: np.ndarray
    affine: np.ndarray
    header: object


def nifti_stem(path: Path) -> str:
    """The file name without ``.nii.gz`` / ``.nii``; ValueError for other files."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    raise ValueError(f"{path} is not a NIfTI file (expected one of {', '.join(NIFTI_SUFFIXES)})")


def group_cases(paths: list[Path], channels: int) -> list[NiftiCase]:
    """Group NIfTI files into cases of ``channels`` files each (``CASE_XXXX`` naming).

    A single-channel model also accepts files without the ``_XXXX`` suffix (one case per file).
    Raises ValueError when a case lacks a channel or has extra ones.
    """
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(Path(p) for p in paths):
        stem = nifti_stem(path)
        match = CHANNEL_PATTERN.match(stem)
        if match is None:
            if channels != 1:
                raise ValueError(f"{path}: the model takes {channels} channels, so files must be named "
                                 "CASE_0000.nii.gz, CASE_0001.nii.gz, ...")
            case, channel = stem, 0
        else:
            case, channel = match["case"], int(match["channel"])
        if channel in cases.setdefault(case, {}):
            raise ValueError(f"case {case!r} has two files for channel {channel}: {cases[case][channel]} and {path}")
        cases[case][channel] = path
    grouped = []
    for case, files in sorted(cases.items()):
        if sorted(files) != list(range(channels)):
            raise ValueError(f"case {case!r} has channels {sorted(files)}; the model expects 0..{channels - 1} "
                             f"({', '.join(str(p) for p in files.values())})")
        grouped.append(NiftiCase(case, [files[c] for c in range(channels)]))
    return grouped


def find_cases(inputs: list[Path], channels: int) -> list[NiftiCase]:
    """The cases in ``inputs``: NIfTI files, or folders whose NIfTI files are read (e.g. ``imagesTs``)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not found:
                raise ValueError(f"{item} holds no NIfTI files (*.nii.gz, *.nii)")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise ValueError(f"{item} does not exist")
    return group_cases(files, channels)


def read_image(paths: list[Path]) -> LoadedImage:
    """Read the channel files of a case into ``[channels, x, y, z]`` float32 (3D files, same grid)."""
    import nibabel

    channels, affine, header = [], None, None
    for path in paths:
        image = nibabel.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
        if affine is None:
            affine, header = image.affine, image.header
        elif data.shape != channels[0].shape or not np.allclose(image.affine, affine, atol=1e-4):
            raise ValueError(f"{path}: shape {data.shape} / affine differ from the case's first channel "
                             f"{paths[0]} (shape {channels[0].shape})")
        channels.append(data)
    return LoadedImage(np.stack(channels), affine, header)


def label_dtype(label_values) -> np.dtype:
    """uint8 where all ``label_values`` fit in 0..255, else int16 (ValueError beyond int16)."""
    values = np.asarray(list(label_values))
    if values.size == 0 or (values.min() >= 0 and values.max() <= 255):
        return np.dtype(np.uint8)
    if values.min() >= -32768 and values.max() <= 32767:
        return np.dtype(np.int16)
    raise ValueError(f"label values {values.min()}..{values.max()} do not fit in int16")


def write_label_map(labels: np.ndarray, affine: np.ndarray, header, path: Path, label_values=None) -> Path:
    """Save ``labels [x, y, z]`` as NIfTI at ``path`` with ``affine`` and a copy of ``header``."""
    import nibabel

    if labels.ndim != 3:
        raise ValueError(f"write_label_map: labels must be [x, y, z], got shape {labels.shape}")
    dtype = label_dtype(np.unique(labels) if label_values is None else label_values)
    header = header.copy() if header is not None else None
    image = nibabel.Nifti1Image(labels.astype(dtype), affine, header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1, 0)
    if header is not None:  # keep the input's qform/sform codes, which Nifti1Image may reset
        image.set_qform(affine, int(header["qform_code"]))
        image.set_sform(affine, int(header["sform_code"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, str(path))
    return path
