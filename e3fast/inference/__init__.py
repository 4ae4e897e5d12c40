"""Whole-volume inference: Gaussian-weighted sliding windows, NIfTI in and out, ``e3fast predict``."""
from e3fast.inference.segmenter import Segmenter, freeze_if_available, segmenter_from_checkpoint
from e3fast.inference.sliding_window import gaussian_importance, sliding_window_inference, window_starts

__all__ = ["Segmenter", "freeze_if_available", "gaussian_importance", "segmenter_from_checkpoint",
           "sliding_window_inference", "window_starts"]
