"""Segmentation datasets on disk: the nnU-Net v2 raw layout and the Medical Segmentation Decathlon.

nnU-Net v2 raw layout (``layout == 'nnunet'``)::

    dataset.json   {"channel_names": {"0": "T1", ...}, "labels": {"background": 0, "tumour": 1, ...},
                    "file_ending": ".nii.gz", "numTraining": N}
    imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one 3D file per channel
    labelsTr/CASE.nii.gz                              integer label map
    imagesTs/CASE_0000.nii.gz, ...                    test cases (no labels)

Medical Segmentation Decathlon layout (``layout == 'msd'``)::

    dataset.json   {"modality": {"0": "FLAIR", ...}, "labels": {"0": "background", "1": "edema", ...},
                    "training": [{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}, ...],
                    "test": ["./imagesTs/Y.nii.gz", ...]}
    one file per case holding all channels: 3D for one modality, 4D ``[x, y, z, channel]`` otherwise.

:func:`load_dataset` only reads ``dataset.json`` and lists the files; :func:`e3fast.data.check_dataset`
opens them. Problems are reported as :class:`DatasetError` naming the file at fault.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DATASET_JSON = "dataset.json"
LAYOUTS = ("nnunet", "msd")


class DatasetError(ValueError):
    """A dataset on disk is malformed; the message names the file at fault."""


@dataclass(frozen=True)
class Case:
    """One case of a dataset.

    ``image_paths`` holds one 3D file per channel (nnU-Net) or the single file with every channel
    (MSD: 4D ``[x, y, z, channel]``, or 3D for one channel); ``label_path`` is None for test cases.
    """

    name: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    layout: str
    num_channels: int

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


@dataclass
class SegmentationDataset:
    """A dataset's description: its training and test cases, channel names and labels.

    ``labels`` maps each class name to its integer value in the label maps (background included),
    ordered by value; class values are expected to be ``0 .. num_classes - 1``.
    """

    root: Path
    layout: str
    channel_names: list[str]
    labels: dict[str, int]
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    file_ending: str = ".nii.gz"

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    @property
    def label_values(self) -> list[int]:
        return list(self.labels.values())

    @property
    def cases(self) -> list[Case]:
        return self.training + self.test


def load_dataset(path) -> SegmentationDataset:
    """Read ``path/dataset.json`` and list the cases of an nnU-Net v2 or MSD dataset folder."""
    root = Path(path)
    description = _read_description(root)
    if "channel_names" in description:
        dataset = _load_nnunet(root, description)
    elif "modality" in description or "training" in description:
        dataset = _load_msd(root, description)
    else:
        raise DatasetError(f"{root / DATASET_JSON}: neither an nnU-Net v2 description (no 'channel_names') "
                           "nor a Medical Segmentation Decathlon one (no 'modality'/'training')")
    if not dataset.training:
        raise DatasetError(f"{root}: no training cases found (looked in {root / 'imagesTr'})")
    return dataset


def _read_description(root: Path) -> dict:
    json_path = root / DATASET_JSON
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: missing; a dataset folder needs a dataset.json")
    try:
        description = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{json_path}: unreadable JSON ({error})") from error
    if not isinstance(description, dict):
        raise DatasetError(f"{json_path}: expected a JSON object, got {type(description).__name__}")
    return description


def _indexed_names(mapping, json_path: Path, key: str) -> list[str]:
    """``{"0": "T1", "1": "T2"}`` -> ``["T1", "T2"]``, checking the indices run 0..n-1."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f"{json_path}: '{key}' must be a non-empty object like {{\"0\": \"T1\"}}")
    try:
        indexed = {int(index): str(name) for index, name in mapping.items()}
    except ValueError as error:
        raise DatasetError(f"{json_path}: '{key}' keys must be channel indices 0, 1, ... ({error})") from error
    if sorted(indexed) != list(range(len(indexed))):
        raise DatasetError(f"{json_path}: '{key}' indices must be 0..{len(indexed) - 1}, got {sorted(indexed)}")
    return [indexed[index] for index in range(len(indexed))]


def _check_label_values(labels: dict[str, int], json_path: Path) -> dict[str, int]:
    labels = dict(sorted(labels.items(), key=lambda item: item[1]))
    if list(labels.values()) != list(range(len(labels))):
        raise DatasetError(f"{json_path}: label values must be 0..{len(labels) - 1} (0 the background), "
                           f"got {sorted(labels.values())}")
    return labels


def _load_nnunet(root: Path, description: dict) -> SegmentationDataset:
    json_path = root / DATASET_JSON
    channel_names = _indexed_names(description["channel_names"], json_path, "channel_names")
    raw_labels = description.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise DatasetError(f"{json_path}: 'labels' must be a non-empty object like {{\"background\": 0}}")
    labels = {}
    for name, value in raw_labels.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"{json_path}: label {name!r} is a region (a list of values); region-based "
                               "training is not supported")
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"{json_path}: label {name!r} must have an integer value, got {value!r}")
        labels[str(name)] = value
    file_ending = description.get("file_ending", ".nii.gz")
    dataset = SegmentationDataset(root, "nnunet", channel_names, _check_label_values(labels, json_path),
                                  file_ending=file_ending)
    dataset.training = _nnunet_cases(root / "imagesTr", root / "labelsTr", channel_names, file_ending)
    dataset.test = _nnunet_cases(root / "imagesTs", None, channel_names, file_ending)
    return dataset


def _nnunet_cases(images: Path, labels: Path | None, channel_names, file_ending: str) -> list[Case]:
    """Cases from the ``CASE_XXXX<file_ending>`` files of ``images``; a missing channel file is kept
    in ``image_paths`` (it is reported by the dataset check, naming the file)."""
    if not images.is_dir():
        return []
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + "$")
    names = sorted({match["case"] for path in images.iterdir() if (match := pattern.match(path.name))})
    cases = []
    for name in names:
        paths = tuple(images / f"{name}_{channel:04d}{file_ending}" for channel in range(len(channel_names)))
        label = labels / f"{name}{file_ending}" if labels is not None else None
        cases.append(Case(name, paths, label, "nnunet", len(channel_names)))
    return cases


def _load_msd(root: Path, description: dict) -> SegmentationDataset:
    json_path = root / DATASET_JSON
    channel_names = _indexed_names(description.get("modality"), json_path, "modality")
    raw_labels = description.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise DatasetError(f"{json_path}: 'labels' must be a non-empty object like {{\"0\": \"background\"}}")
    try:
        labels = {str(name): int(value) for value, name in raw_labels.items()}
    except ValueError as error:
        raise DatasetError(f"{json_path}: MSD 'labels' keys must be integer values ({error})") from error
    dataset = SegmentationDataset(root, "msd", channel_names, _check_label_values(labels, json_path))
    training = description.get("training", [])
    if not isinstance(training, list):
        raise DatasetError(f"{json_path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}}")
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{json_path}: training entry {index} must have 'image' and 'label', got {entry!r}")
        image = _resolve(root, entry["image"])
        dataset.training.append(Case(_case_name(image), (image,), _resolve(root, entry["label"]), "msd",
                                     len(channel_names)))
    for entry in description.get("test", []):
        image = _resolve(root, entry["image"] if isinstance(entry, dict) else entry)
        dataset.test.append(Case(_case_name(image), (image,), None, "msd", len(channel_names)))
    return dataset


def _resolve(root: Path, relative: str) -> Path:
    return (root / relative).resolve() if not Path(relative).is_absolute() else Path(relative)


def _case_name(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return path.stem
