"""A trained network ready to segment whole volumes: normalization, sliding window, argmax.

:class:`Segmenter` holds the model and what inference needs from training (the patch size, the
label values of the classes, the channel normalization) and turns a raw image
``[channels, x, y, z]`` into a label map. Windows are the training patch size, which must be a
multiple of the network's pooling factor: the network then never pads a window itself (it pads at
the start of each axis only, which would break the symmetry that makes rotated predictions exact
rotations; see :mod:`e3fast.inference.sliding_window`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from e3fast.inference.sliding_window import DEFAULT_OVERLAP, DEFAULT_SIGMA_SCALE, sliding_window_inference


def freeze_if_available(model: torch.nn.Module) -> bool:
    """Freeze ``model`` for inference with ``e3fast.freeze`` when this build has it; whether it did."""
    import e3fast

    freeze = getattr(e3fast, "freeze", None)
    if freeze is None:
        return False
    freeze(model)
    return True


def pooling_factors(model: torch.nn.Module) -> tuple[int, int, int]:
    """The total pooling factor of ``model`` along each axis (1s for a model without pooling)."""
    down = getattr(model, "down", None)
    factor = down.pooling_factor if down is not None and hasattr(down, "pooling_factor") else \
        getattr(model, "pooling_factor", 1)
    return tuple(int(f) for f in factor) if isinstance(factor, (tuple, list)) else (int(factor),) * 3


def default_normalization(image: np.ndarray) -> np.ndarray:
    """The training pipeline's per-channel z-score normalization over the non-zero voxels."""
    from e3fast.data import normalize_channels

    return normalize_channels(image)


@dataclass
class Segmenter:
    """Segments raw volumes with ``model``.

    ``label_values[k]`` is the value written for class ``k``; ``patch_size`` is the window.
    ``voxels`` and ``seconds`` accumulate the volume segmented and the sliding-window time
    (:attr:`voxels_per_second`).
    """

    model: torch.nn.Module
    patch_size: Sequence[int]
    label_values: Sequence[int]
    device: str | torch.device = "cpu"
    overlap: float = DEFAULT_OVERLAP
    sigma_scale: float = DEFAULT_SIGMA_SCALE
    batch_size: int = 1
    normalize: Callable[[np.ndarray], np.ndarray] = default_normalization
    voxels: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    def __post_init__(self):
        self.patch_size = tuple(int(s) for s in self.patch_size)
        factors = pooling_factors(self.model)
        if len(self.patch_size) != 3 or any(s % f for s, f in zip(self.patch_size, factors)):
            raise ValueError(f"Segmenter: the window {self.patch_size} must be 3 sizes, multiples of the "
                             f"network's pooling factors {factors}")
        self.model.to(self.device).eval()

    @property
    def voxels_per_second(self) -> float:
        """Voxels segmented per second of sliding-window time so far (0 before any)."""
        return self.voxels / self.seconds if self.seconds else 0.0

    def logits(self, image: np.ndarray, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Class logits ``[classes, x, y, z]`` (float32, CPU) of a normalized image ``[channels, x, y, z]``."""
        if image.ndim != 4:
            raise ValueError(f"Segmenter: image must be [channels, x, y, z], got shape {image.shape}")
        volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = sliding_window_inference(volume, self.patch_size, self.model, self.overlap, self.sigma_scale,
                                              self.batch_size, progress)
        self.seconds += time.perf_counter() - start
        self.voxels += int(np.prod(image.shape[1:]))
        return logits[0].cpu()

    def segment(self, raw_image: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Label map ``[x, y, z]`` (int64 label values) of a raw image ``[channels, x, y, z]``."""
        classes = self.logits(self.normalize(raw_image), progress).argmax(0).numpy()
        values = np.asarray(self.label_values, dtype=np.int64)
        if classes.max(initial=0) >= len(values):
            raise ValueError(f"Segmenter: the network has more outputs than the {len(values)} label values")
        return values[classes]


def segmenter_from_checkpoint(path, device: str = "cpu", weights: str = "best", freeze: bool = True,
                              overlap: float = DEFAULT_OVERLAP, sigma_scale: float = DEFAULT_SIGMA_SCALE,
                              batch_size: int = 1, window=None) -> tuple[Segmenter, object]:
    """A :class:`Segmenter` for an ``e3fast train`` checkpoint, and the checkpoint's info.

    ``freeze``: assemble the kernels once (``e3fast.freeze``) when this build has it.
    ``window``: the sliding window's size (default: the training patch size).
    """
    from functools import partial

    from e3fast.data import normalize_channels
    from e3fast.training import load_checkpoint

    model, info = load_checkpoint(path, map_location=device, weights=weights)
    if freeze:
        freeze_if_available(model)
    normalize = partial(normalize_channels, use_nonzero_mask=info.use_nonzero_mask)
    segmenter = Segmenter(model, info.patch_size if window is None else window, info.label_values, device=device, overlap=overlap,
                          sigma_scale=sigma_scale, batch_size=batch_size, normalize=normalize)
    return segmenter, info
