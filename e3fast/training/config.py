"""What a training run is told: :class:`TrainConfig` (defaults: the paper's recipe)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from e3fast.models.factory import MODEL_KINDS
from e3fast.training.losses import LOSSES

ROTATION_AUGMENTATIONS = ("none", "rot90", "small", "both")
EQUIVARIANCES = ("SO3", "O3")


@dataclass
class TrainConfig:
    """A training run.

    Data: ``dataset`` (folder in the nnU-Net v2 or MSD layout), ``validation_fraction`` of the
    training cases held out for early stopping (none when < 2 cases), ``patch_size``,
    ``batch_size`` (per process), ``foreground_fraction`` (nnU-Net's 1/3), ``use_nonzero_mask``
    (z-score over the non-zero voxels), ``rotation_augmentation`` (``'none'``, ``'rot90'`` random
    90-degree rotations, ``'small'`` arbitrary angles up to ``rotation_degrees`` about one axis,
    or ``'both'``), ``num_workers`` loader processes.

    Model: ``model`` (``'equivariant'`` or ``'plain'``); equivariant ``width`` (EquivariantUNet's
    ``n``: ``4n x0e + 2n x1e + n x2e`` on top), ``equivariance``, ``lmax``, ``num_radial_basis``,
    ``scalar_upsampling``; plain ``features``; both ``n_downsample`` and ``kernel_voxels``.

    Optimization: Adam at ``lr``, ``loss`` (``'ce'`` or ``'dice_ce'``), at most ``steps`` steps
    (None: no limit) and ``minutes`` of training (None: no limit); validation every
    ``validate_every`` steps on ``validation_patches`` fixed patches, stopping after ``patience``
    validations without improvement.

    Run: ``output_dir`` (checkpoint.pt, metrics.csv), ``checkpoint_every`` steps, ``resume``
    (continue from output_dir's checkpoint), ``seed``, ``device`` (``'auto'``: CUDA if present),
    ``bf16`` and ``channels_last`` (None: on for CUDA), ``progress`` bar, ``threads`` (CPU threads,
    0: torch's default), ``check`` the dataset first.
    """

    dataset: str
    output_dir: str
    model: str = "equivariant"
    steps: int | None = 1000
    minutes: float | None = None
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (64, 64, 64)
    lr: float = 5e-3
    loss: str = "ce"
    width: int = 2
    features: int = 30
    n_downsample: int = 3
    kernel_voxels: int = 5
    num_radial_basis: int = 5
    lmax: int = 2
    equivariance: str = "SO3"
    scalar_upsampling: bool = False
    rotation_augmentation: str = "none"
    rotation_degrees: float = 15.0
    foreground_fraction: float = 0.33
    use_nonzero_mask: bool = True
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = None
    channels_last: bool | None = None
    checkpoint_every: int = 100
    validation_fraction: float = 0.2
    validate_every: int = 50
    validation_patches: int = 8
    patience: int = 10
    num_workers: int = 2
    progress: bool = True
    resume: bool = False
    threads: int = 0
    check: bool = True

    def __post_init__(self):
        self.dataset, self.output_dir = str(self.dataset), str(self.output_dir)
        self.patch_size = tuple(int(size) for size in self.patch_size)
        _require(len(self.patch_size) == 3 and min(self.patch_size) >= 1,
                 f"patch_size must be 3 positive sizes, got {self.patch_size}")
        _require(self.model in MODEL_KINDS, f"model must be one of {MODEL_KINDS}, got {self.model!r}")
        _require(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        _require(self.equivariance in EQUIVARIANCES, f"equivariance must be one of {EQUIVARIANCES}, "
                 f"got {self.equivariance!r}")
        _require(self.rotation_augmentation in ROTATION_AUGMENTATIONS,
                 f"rotation_augmentation must be one of {ROTATION_AUGMENTATIONS}, got {self.rotation_augmentation!r}")
        _require(self.steps is None or self.steps >= 1, f"steps must be >= 1 or None, got {self.steps}")
        _require(self.minutes is None or self.minutes > 0, f"minutes must be > 0 or None, got {self.minutes}")
        _require(self.steps is not None or self.minutes is not None, "give steps or minutes (or both): "
                 "a run limited by neither would only end by early stopping, if ever")
        for name in ("batch_size", "width", "features", "kernel_voxels", "num_radial_basis", "checkpoint_every",
                     "validate_every", "validation_patches", "patience"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_downsample", "lmax", "num_workers", "threads"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(0 <= self.validation_fraction < 1, f"validation_fraction must be in [0, 1), "
                 f"got {self.validation_fraction}")
        _require(0 <= self.foreground_fraction <= 1, f"foreground_fraction must be in [0, 1], "
                 f"got {self.foreground_fraction}")

    def to_dict(self) -> dict:
        """Plain types only (what checkpoints store)."""
        values = dataclasses.asdict(self)
        values["patch_size"] = list(self.patch_size)
        return values


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"TrainConfig: {message}")
