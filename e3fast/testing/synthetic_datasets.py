"""Tiny synthetic segmentation datasets written in the nnU-Net v2 and MSD layouts (for tests).

Each case is a few random blobs in a noisy volume: class ``k`` (1..classes-1) is a ball whose
channels are brighter by ``k``, so a network can learn the labels from the intensities.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def synthetic_case(shape, num_channels: int, num_classes: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(image [C, *shape] float32, labels [*shape] uint8)``: one ball per foreground class."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    labels = np.zeros(shape, dtype=np.uint8)
    for label in range(1, num_classes):
        centre = rng.uniform(0.25, 0.75, size=3) * np.array(shape)
        radius = rng.uniform(0.12, 0.22) * min(shape)
        labels[np.linalg.norm(grid - centre, axis=-1) < radius] = label
    image = np.stack([labels * (1.0 + 0.5 * channel) + rng.normal(0, 0.3, size=shape) + 2.0
                      for channel in range(num_channels)]).astype(np.float32)
    return image, labels


def affine_for(spacing) -> np.ndarray:
    """A diagonal affine with the given voxel spacing."""
    return np.diag([*map(float, spacing), 1.0])


def _save(array: np.ndarray, path: Path, spacing) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine_for(spacing)), str(path))


def write_nnunet_dataset(root, num_cases: int = 3, shape=(12, 12, 12), num_channels: int = 2,
                         num_classes: int = 3, spacing=(1.0, 1.0, 1.0), num_test: int = 1, seed: int = 0) -> Path:
    """An nnU-Net v2 raw dataset folder at ``root`` (cases ``case_000`` ...); returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = {"0": "background", **{str(k): f"class{k}" for k in range(1, num_classes)}}
    description = {"channel_names": {str(c): f"modality{c}" for c in range(num_channels)},
                   "labels": {name: int(value) for value, name in names.items()},
                   "numTraining": num_cases, "file_ending": ".nii.gz"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(description, indent=2))
    for index in range(num_cases + num_test):
        image, labels = synthetic_case(shape, num_channels, num_classes, rng)
        folder = "imagesTr" if index < num_cases else "imagesTs"
        for channel in range(num_channels):
            _save(image[channel], root / folder / f"case_{index:03d}_{channel:04d}.nii.gz", spacing)
        if index < num_cases:
            _save(labels, root / "labelsTr" / f"case_{index:03d}.nii.gz", spacing)
    return root


def write_msd_dataset(root, num_cases: int = 3, shape=(12, 12, 12), num_channels: int = 2, num_classes: int = 3,
                      spacing=(1.0, 1.0, 1.0), num_test: int = 1, seed: int = 0) -> Path:
    """A Medical Segmentation Decathlon dataset folder at ``root`` (4D images); returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    training, test = [], []
    for index in range(num_cases + num_test):
        image, labels = synthetic_case(shape, num_channels, num_classes, rng)
        volume = np.moveaxis(image, 0, -1) if num_channels > 1 else image[0]
        if index < num_cases:
            _save(volume, root / "imagesTr" / f"case_{index:03d}.nii.gz", spacing)
            _save(labels, root / "labelsTr" / f"case_{index:03d}.nii.gz", spacing)
            training.append({"image": f"./imagesTr/case_{index:03d}.nii.gz",
                             "label": f"./labelsTr/case_{index:03d}.nii.gz"})
        else:
            _save(volume, root / "imagesTs" / f"case_{index:03d}.nii.gz", spacing)
            test.append(f"./imagesTs/case_{index:03d}.nii.gz")
    description = {"name": "synthetic", "tensorImageSize": "4D" if num_channels > 1 else "3D",
                   "modality": {str(c): f"modality{c}" for c in range(num_channels)},
                   "labels": {"0": "background", **{str(k): f"class{k}" for k in range(1, num_classes)}},
                   "numTraining": num_cases, "numTest": num_test, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(description, indent=2))
    return root
