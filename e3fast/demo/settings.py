"""The demo's sizes: cohort, networks, training budget and evaluation, per preset.

* ``quick`` (``e3fast demo --quick``, ~5 minutes on a 2-core CPU): 4 mm voxels, a coarse label
  set (CSF, GM, WM, deep grey nuclei, cerebellum), 8 training + 2 test subjects, 24^3 training
  patches (96 mm), 90 seconds of training per network, rotations of 0, 45 and 90 degrees
  evaluated with 32^3 windows (8 per volume).
* ``full`` (``e3fast demo``, ~30 minutes): 3 mm voxels, all nine structures, 12 + 2 subjects,
  32^3 patches, 10 minutes per network, rotations 0-180 degrees in 45-degree steps.
* ``smoke`` (``--smoke``, hidden; tests): a tiny cohort and a few training steps.

Both networks train with the same wall-clock budget (unless ``steps`` fixes the step count),
the same loss (Dice + cross-entropy), patches and seed, and no rotation augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo run depends on (see the module docstring for the presets)."""

    voxel_mm: int
    grouping: str
    train_subjects: int
    test_subjects: int
    minutes_per_model: float | None
    steps: int | None
    patch_size: int
    batch_size: int
    angles: tuple[float, ...]
    axes: tuple[str, ...] = ("x", "y", "z")
    eval_window: int | None = None  # sliding window (default: patch_size)
    eval_overlap: float = 0.25
    eval_batch_size: int = 4
    n_downsample: int = 2
    equivariant_width: int = 2
    scalar_upsampling: bool = True
    plain_features: int = 16
    plain_kernel: int = 3
    loss: str = "dice_ce"
    lr: float = 5e-3
    foreground_fraction: float = 0.5
    seed: int = 0
    cohort_seed: int = 2024


PRESETS = {
    "quick": DemoSettings(voxel_mm=4, grouping="coarse", train_subjects=8, test_subjects=2, minutes_per_model=1.5,
                          steps=None, patch_size=24, eval_window=32, batch_size=1, angles=(0, 45, 90)),
    "full": DemoSettings(voxel_mm=3, grouping="full", train_subjects=12, test_subjects=2, minutes_per_model=10.0,
                         steps=None, patch_size=32, batch_size=1, angles=(0, 45, 90, 135, 180)),
    "smoke": DemoSettings(voxel_mm=8, grouping="coarse", train_subjects=2, test_subjects=1, minutes_per_model=None,
                          steps=2, patch_size=8, batch_size=1, angles=(0, 90), axes=("z",), n_downsample=1,
                          equivariant_width=1, plain_features=4),
}


def demo_settings(preset: str, **overrides) -> DemoSettings:
    """The preset ``preset`` with ``overrides`` (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
