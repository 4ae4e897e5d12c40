"""Segmentation data on disk (nnU-Net v2 raw and Medical Segmentation Decathlon layouts), its
check, reading, normalization and reproducible patch sampling for training."""
from e3fast.data.checks import DatasetReport, check_dataset
from e3fast.data.dataset import Case, DatasetError, SegmentationDataset, load_dataset
from e3fast.data.normalization import normalize_channels
from e3fast.data.volumes import CaseVolume, read_case

__all__ = ["Case", "CaseVolume", "DatasetError", "DatasetReport", "SegmentationDataset", "check_dataset",
           "load_dataset", "normalize_channels", "read_case"]
