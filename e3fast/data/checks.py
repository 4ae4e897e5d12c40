"""The dataset check: every problem that would stop training, found before training starts.

For every case: each channel file exists and can be read (and no image file lies outside the
declared channels), channels and label agree in shape and
affine, the number of channels matches ``dataset.json``, and the label maps only hold values declared
in ``dataset.json``. All problems are collected and raised together as one :class:`DatasetError`
whose message names each file at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from e3fast.data.dataset import Case, DatasetError, SegmentationDataset, load_dataset
from e3fast.data.volumes import open_image, read_label, spacing_of

AFFINE_TOLERANCE = 1e-4  # relative to the largest affine entry, as nnU-Net's check is lenient too
MAX_REPORTED_PROBLEMS = 20


@dataclass
class DatasetReport:
    """What the check found: the dataset, per-case shapes and spacings, and the label voxel counts."""

    dataset: SegmentationDataset
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    spacings: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    label_counts: dict[int, int] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for people: layout, cases, channels, labels, shapes and spacings."""
        dataset = self.dataset
        shapes = np.array(list(self.shapes.values()))
        spacings = np.array(list(self.spacings.values()))
        lines = [f"{dataset.root}: {dataset.layout} layout, {len(dataset.training)} training and "
                 f"{len(dataset.test)} test cases",
                 f"  channels: {', '.join(dataset.channel_names)}",
                 "  labels: " + ", ".join(f"{value}={name} ({self.label_counts.get(value, 0)} voxels)"
                                          for name, value in dataset.labels.items())]
        if len(shapes):
            lines.append(f"  shapes: min {_plain(shapes.min(0))}, max {_plain(shapes.max(0))}")
            lines.append(f"  spacing: median {_plain(np.round(np.median(spacings, 0), 4))}, "
                         f"min {_plain(spacings.min(0))}, max {_plain(spacings.max(0))}")
        return "\n".join(lines)


def _plain(values: np.ndarray) -> tuple:
    return tuple(values.tolist())


def check_dataset(path) -> DatasetReport:
    """Check a dataset folder (see the module docstring); raises DatasetError listing each bad file."""
    dataset = load_dataset(path)
    report = DatasetReport(dataset)
    problems = _undeclared_channel_files(dataset)
    for case in dataset.cases:
        try:
            _check_case(case, dataset, report)
        except DatasetError as error:
            problems.append(str(error))
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise DatasetError(f"{dataset.root}: {len(problems)} problem(s) found:\n  " + "\n  ".join(shown)
                           + (f"\n  ... and {more} more" if more else ""))
    return report


def _undeclared_channel_files(dataset: SegmentationDataset) -> list[str]:
    """nnU-Net channel files whose index dataset.json does not declare (``CASE_0002`` of 2 channels)."""
    if dataset.layout != "nnunet":
        return []
    expected = {path for case in dataset.cases for path in case.image_paths}
    problems = []
    for folder in ("imagesTr", "imagesTs"):
        directory = dataset.root / folder
        if directory.is_dir():
            problems += [f"{path}: channel file not declared in {dataset.root / 'dataset.json'} "
                         f"('channel_names' has {dataset.num_channels})"
                         for path in sorted(directory.iterdir())
                         if path.name.endswith(dataset.file_ending) and path not in expected]
    return problems


def _check_case(case: Case, dataset: SegmentationDataset, report: DatasetReport) -> None:
    missing = [path for path in case.image_paths if not path.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]}: file not found (channel file of case {case.name!r})")
    images = [open_image(path) for path in case.image_paths]
    reference = images[0]
    shape = _spatial_shape(reference, case)
    for image, path in zip(images[1:], case.image_paths[1:]):
        if tuple(image.shape) != shape:
            raise DatasetError(f"{path}: shape {tuple(image.shape)} differs from {shape} of {case.image_paths[0]}")
        _check_affine(image.affine, reference.affine, path, case.image_paths[0])
    report.shapes[case.name] = shape
    report.spacings[case.name] = spacing_of(reference)
    if case.label_path is None:
        return
    label_image = open_image(case.label_path)
    if tuple(label_image.shape[:3]) != shape:
        raise DatasetError(f"{case.label_path}: label shape {tuple(label_image.shape)} differs from the image "
                           f"shape {shape} of {case.image_paths[0]}")
    _check_affine(label_image.affine, reference.affine, case.label_path, case.image_paths[0])
    values, counts = np.unique(read_label(case.label_path), return_counts=True)
    undeclared = sorted(set(values.tolist()) - set(dataset.label_values))
    if undeclared:
        raise DatasetError(f"{case.label_path}: label values {undeclared} are not declared in "
                           f"{dataset.root / 'dataset.json'} (declared: {dataset.label_values})")
    for value, count in zip(values.tolist(), counts.tolist()):
        report.label_counts[value] = report.label_counts.get(value, 0) + count


def _spatial_shape(image, case: Case) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in image.shape)
    path = case.image_paths[0]
    if case.layout == "msd":
        channels = shape[3] if len(shape) == 4 else 1
        if len(shape) not in (3, 4) or channels != case.num_channels:
            raise DatasetError(f"{path}: shape {shape} does not hold the {case.num_channels} channel(s) declared "
                               "in dataset.json ('modality')")
        return shape[:3]
    if len(shape) != 3:
        raise DatasetError(f"{path}: expected a 3D image per channel, got shape {shape}")
    return shape


def _check_affine(affine, reference, path, reference_path) -> None:
    affine, reference = np.asarray(affine), np.asarray(reference)
    scale = max(np.abs(reference).max(), 1.0)
    if not np.allclose(affine, reference, rtol=0, atol=AFFINE_TOLERANCE * scale):
        raise DatasetError(f"{path}: affine differs from that of {reference_path}:\n{affine}\nvs\n{reference}")
