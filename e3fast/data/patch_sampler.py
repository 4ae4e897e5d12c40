"""Training patches drawn reproducibly, with foreground oversampling and optional rotations.

Every random choice of sample ``index`` in the batch of ``step`` on process ``rank`` comes from a
generator seeded with ``(seed, stream, step, rank, index)`` alone (``stream`` separates the training
draws from the validation draws). A batch is therefore a pure function of
the step: a run resumed at step ``t`` draws exactly the batches an uninterrupted run draws, with
no sampler state to save, and each rank of a multi-process run draws its own patches.

Foreground oversampling (nnU-Net's scheme, per sample): with probability ``foreground_fraction``
the patch is centred on a voxel of a foreground class picked uniformly among the classes present
in the case -- so small structures are seen as often as large ones; otherwise the centre is
uniform over the volume. Patches reaching past the volume are zero-padded (label 0).

Rotation augmentation (off by default, as in the paper's equivariant runs), two kinds that combine:

* ``rotation_degrees > 0``: the patch is rotated about one random axis by a uniform angle in
  ``[-rotation_degrees, rotation_degrees]`` (trilinear image, nearest-neighbour labels), cut from
  a crop large enough that no padding enters its corners. The rotation is in voxel units, so it is
  a rigid rotation only where the voxels are isotropic in its plane.
* ``rotate90=True``: in each plane where the patch has equal sizes and the voxels equal spacing,
  a rotation by a random multiple of 90 degrees (exact, no interpolation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

MAX_LOCATIONS_PER_CLASS = 10_000


@dataclass
class TrainingCase:
    """One preprocessed case: normalized image ``[channels, x, y, z]`` (float32, may be a memmap),
    labels ``[x, y, z]`` (integer), per foreground class sampled voxel coordinates ``[n, 3]``, and
    the voxel spacing."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    class_locations: dict[int, np.ndarray] = field(default_factory=dict)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def class_locations(labels: np.ndarray, classes, seed: int = 0,
                    limit: int = MAX_LOCATIONS_PER_CLASS) -> dict[int, np.ndarray]:
    """Up to ``limit`` voxel coordinates of each class in ``classes`` present in ``labels``."""
    rng = np.random.default_rng(seed)
    locations = {}
    for label in classes:
        coords = np.argwhere(labels == label)
        if len(coords) > limit:
            coords = coords[np.sort(rng.choice(len(coords), limit, replace=False))]
        if len(coords):
            locations[int(label)] = coords.astype(np.int32)
    return locations


TRAINING_STREAM, VALIDATION_STREAM = 0, 1


def sample_generator(seed: int, step: int, rank: int, index: int, stream: int = TRAINING_STREAM
                     ) -> np.random.Generator:
    """The generator of one sample: a function of its coordinates only."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, step, rank, index]))


def crop_with_padding(array: np.ndarray, start, size) -> np.ndarray:
    """``array[..., start:start+size]`` over the last 3 axes, zero where it reaches outside."""
    spatial = array.shape[-3:]
    out = np.zeros(array.shape[:-3] + tuple(size), dtype=array.dtype)
    source, target = [], []
    for axis in range(3):
        lo, hi = max(start[axis], 0), min(start[axis] + size[axis], spatial[axis])
        if hi <= lo:
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - start[axis], hi - start[axis]))
    out[(...,) + tuple(target)] = array[(...,) + tuple(source)]
    return out


def rotation_crop_size(size: int, plane_size: int | None = None) -> int:
    """Edge of the crop along an axis of patch edge ``size`` whose rotation by any angle in a plane
    of largest patch edge ``plane_size`` (default ``size``) covers the patch: the plane's diagonal
    ``sqrt(2) plane_size`` plus a margin, of the parity of ``size`` so the two share their centre."""
    plane_size = size if plane_size is None else max(plane_size, size)
    extra = int(math.ceil(plane_size * math.sqrt(2) - size)) + 2
    return size + extra + extra % 2


def rotation90_planes(patch_size, spacing, tolerance: float = 1e-3) -> list[tuple[int, int]]:
    """Axis pairs where a 90-degree rotation maps the patch (equal sizes) and the voxels (equal
    spacing) onto themselves."""
    planes = []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        same_spacing = abs(spacing[a] - spacing[b]) <= tolerance * max(spacing[a], spacing[b])
        if patch_size[a] == patch_size[b] and same_spacing:
            planes.append((a, b))
    return planes


def rotate_patch(image: torch.Tensor, labels: torch.Tensor, axis: int, degrees: float,
                 size) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``image [C, ...]`` and ``labels [...]`` about ``axis`` through their centre, cut ``size``."""
    angle = math.radians(degrees)
    plane = [a for a in range(3) if a != axis]
    rotation = torch.eye(3, dtype=torch.float32)
    rotation[plane[0], plane[0]] = rotation[plane[1], plane[1]] = math.cos(angle)
    rotation[plane[0], plane[1]], rotation[plane[1], plane[0]] = -math.sin(angle), math.sin(angle)
    crop = torch.tensor(image.shape[-3:], dtype=torch.float32)
    half = (torch.tensor(size, dtype=torch.float32) - 1) / 2
    axes = [torch.arange(n, dtype=torch.float32) - h for n, h in zip(size, half)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) @ rotation.T  # voxels from the centre
    grid = (points / ((crop - 1) / 2)).flip(-1)[None]
    rotated = F.grid_sample(image[None].float(), grid, mode="bilinear", align_corners=True)[0]
    rotated_labels = F.grid_sample(labels[None, None].float(), grid, mode="nearest", align_corners=True)[0, 0]
    return rotated, rotated_labels.to(labels.dtype)


class PatchSampler:
    """Draws the training batch of any step (see the module docstring)."""

    def __init__(self, cases: list[TrainingCase], patch_size, foreground_fraction: float = 0.33, seed: int = 0,
                 rotation_degrees: float = 0.0, rotate90: bool = False, spacing=(1.0, 1.0, 1.0),
                 stream: int = TRAINING_STREAM):
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        if len(tuple(patch_size)) != 3 or min(int(s) for s in patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive sizes, got {patch_size!r}")
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        if rotation_degrees < 0:
            raise ValueError(f"rotation_degrees must be >= 0, got {rotation_degrees}")
        self.cases = cases
        self.patch_size = tuple(int(s) for s in patch_size)
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        self.rotation_degrees = rotation_degrees
        self.stream = stream
        self.rotation90_planes = rotation90_planes(self.patch_size, spacing) if rotate90 else []

    def _centre(self, case: TrainingCase, rng: np.random.Generator) -> np.ndarray:
        if case.class_locations and rng.random() < self.foreground_fraction:
            classes = sorted(case.class_locations)
            locations = case.class_locations[classes[rng.integers(len(classes))]]
            return locations[rng.integers(len(locations))].astype(np.int64)
        return np.array([rng.integers(n) for n in case.labels.shape], dtype=np.int64)

    def sample(self, step: int, rank: int = 0, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``[C, *patch]`` float32 and labels ``[*patch]`` int64 of one sample."""
        rng = sample_generator(self.seed, step, rank, index, self.stream)
        case = self.cases[rng.integers(len(self.cases))]
        centre = self._centre(case, rng)
        rotate = self.rotation_degrees > 0
        if rotate:
            axis = int(rng.integers(3))
            degrees = float(rng.uniform(-self.rotation_degrees, self.rotation_degrees))
            # The rotated patch's corners reach sqrt(2) further in the plane of rotation.
            plane_size = max(n for a, n in enumerate(self.patch_size) if a != axis)
            size = [n if a == axis else rotation_crop_size(n, plane_size) for a, n in enumerate(self.patch_size)]
        else:
            size = list(self.patch_size)
        start = centre - np.array(size) // 2
        image = torch.from_numpy(crop_with_padding(case.image, start, size).astype(np.float32, copy=False))
        labels = torch.from_numpy(crop_with_padding(case.labels, start, size).astype(np.int64))
        if rotate:
            image, labels = rotate_patch(image, labels, axis, degrees, self.patch_size)
        for plane in self.rotation90_planes:
            quarter_turns = int(rng.integers(4))
            image = torch.rot90(image, quarter_turns, [plane[0] + 1, plane[1] + 1])
            labels = torch.rot90(labels, quarter_turns, list(plane))
        return image.contiguous(), labels.contiguous()

    def batch(self, step: int, batch_size: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, *patch]`` images and ``[B, *patch]`` labels of training step ``step``."""
        samples = [self.sample(step, rank, index) for index in range(batch_size)]
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
