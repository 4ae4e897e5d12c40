"""Cases read, normalized and indexed for patch sampling (held in memory for the whole run)."""
from __future__ import annotations

import numpy as np

from e3fast.data.dataset import Case
from e3fast.data.normalization import normalize_channels
from e3fast.data.patch_sampler import TrainingCase, class_locations
from e3fast.data.volumes import read_case


def compact_label_dtype(num_classes: int):
    """The smallest integer dtype holding label values ``0 .. num_classes - 1``."""
    return np.uint8 if num_classes <= 256 else np.int32


def load_training_cases(cases: list[Case], num_classes: int, use_nonzero_mask: bool = True,
                        seed: int = 0) -> list[TrainingCase]:
    """Read each case, z-score its channels and list where its foreground classes lie."""
    prepared = []
    for case in cases:
        volume = read_case(case)
        if volume.label is None:
            raise ValueError(f"case {case.name!r} has no label map; training needs labels")
        labels = volume.label.astype(compact_label_dtype(num_classes))
        image = normalize_channels(volume.image, use_nonzero_mask)
        locations = class_locations(labels, range(1, num_classes), seed=seed)
        prepared.append(TrainingCase(case.name, image, labels, locations, volume.spacing))
    return prepared


def median_spacing(spacings) -> tuple[float, float, float]:
    """Per-axis median of the cases' voxel spacings: the network's ``steps``."""
    return tuple(float(value) for value in np.median(np.asarray(list(spacings), dtype=np.float64), axis=0))


def cases_off_spacing(cases: list[TrainingCase], spacing, tolerance: float = 0.1) -> list[str]:
    """Names of the cases whose spacing differs from ``spacing`` by more than ``tolerance`` (relative)
    along some axis: the network sees them at the wrong scale (no resampling is done)."""
    return [case.name for case in cases
            if any(abs(own - common) > tolerance * common for own, common in zip(case.spacing, spacing))]
