"""The paper's robustness experiment: Dice of each model on test cases rotated about each axis.

Every case is centred on a cubic canvas, rotated about x, y and z through each angle
(:mod:`e3fast.evaluation.rotation`; 0 degrees is done once and shared by the three axes),
segmented by every model and scored against its equally rotated label map. The result is one
:class:`RotationScore` per (model, case, axis, angle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from e3fast.evaluation.dice import dice_per_class, mean_foreground_dice
from e3fast.evaluation.rotation import AXES, cube_edge, pad_to_cube, rotate_case


@dataclass
class HeldOutCase:
    """A held-out case: raw image ``[C, x, y, z]`` and labels ``[x, y, z]`` (label values)."""

    name: str
    image: np.ndarray
    labels: np.ndarray


@dataclass
class RotationScore:
    """Dice per foreground class and their mean, for one model, case, axis and angle."""

    model: str
    case: str
    axis: str
    degrees: float
    dice: np.ndarray
    mean_dice: float


def parse_angles(text: str) -> list[float]:
    """``"0,45,90"`` -> ``[0.0, 45.0, 90.0]`` (ValueError naming the bad entry)."""
    angles = []
    for item in text.split(","):
        try:
            angles.append(float(item))
        except ValueError:
            raise ValueError(f"angles must be numbers separated by commas, got {item!r} in {text!r}") from None
    return angles


def parse_axes(text: str) -> list[str]:
    """``"x,y,z"`` -> ``["x", "y", "z"]`` (ValueError for other names)."""
    axes = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ValueError(f"axes must be a comma-separated subset of x,y,z, got {text!r}")
    return axes


def rotation_jobs(axes: Sequence[str], angles: Sequence[float]) -> list[tuple[str, float]]:
    """(axis, angle) pairs to run; an angle that is a multiple of 360 is run once (axis ``"-"``)."""
    jobs = []
    if any(angle % 360 == 0 for angle in angles):
        jobs.append(("-", 0.0))
    jobs += [(axis, float(angle)) for angle in angles if angle % 360 for axis in axes]
    return jobs


def resampled_rotation(case: HeldOutCase, axis: int, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The case (already on a cubic canvas) turned by resampling its image and labels (:func:`rotate_case`)."""
    return rotate_case(case.image, case.labels, axis, degrees)


def rotation_experiment(segmenters: Mapping[str, object], cases: Sequence[HeldOutCase], label_values: Sequence[int],
                        axes: Sequence[str] = ("x", "y", "z"), angles: Sequence[float] = (0, 45, 90, 135, 180),
                        progress: Callable[[str], None] | None = None,
                        rotate: Callable[[HeldOutCase, int, float], tuple[np.ndarray, np.ndarray]] = resampled_rotation,
                        ) -> list[RotationScore]:
    """Score every model of ``segmenters`` (name -> object with ``segment(image) -> labels`` and
    ``patch_size``) on every case rotated through ``angles`` about ``axes``.

    ``label_values`` are the foreground values scored. ``progress(text)`` is called after each
    prediction. ``rotate(case, axis, degrees)`` turns a case centred on its cubic canvas
    (default: :func:`resampled_rotation`; the demo re-synthesises its subjects in the new pose).
    """
    windows = [getattr(s, "patch_size", None) for s in segmenters.values()]
    window = max((w for w in windows if w is not None), key=max, default=None)
    scores = []
    for case in cases:
        edge = cube_edge(case.labels.shape, window)
        cube = HeldOutCase(case.name, pad_to_cube(case.image, edge), pad_to_cube(case.labels, edge))
        for axis, degrees in rotation_jobs(axes, angles):
            if axis == "-":
                rotated_image, rotated_labels = cube.image, cube.labels
            else:
                rotated_image, rotated_labels = rotate(cube, AXES[axis], degrees)
            for name, segmenter in segmenters.items():
                prediction = segmenter.segment(rotated_image)
                dice = dice_per_class(prediction, rotated_labels, label_values)
                shared_axes = axes if axis == "-" else [axis]
                for shared in shared_axes:
                    scores.append(RotationScore(name, case.name, shared, degrees, dice, mean_foreground_dice(dice)))
                if progress is not None:
                    progress(f"{name} {case.name} {axis} {degrees:g} deg: mean Dice {scores[-1].mean_dice:.3f}")
    return scores


def mean_dice_by_angle(scores: Sequence[RotationScore], per_axis: bool = False) -> dict[tuple, float]:
    """Mean Dice averaged over cases (and axes unless ``per_axis``), keyed by
    ``(model, degrees)`` or ``(model, axis, degrees)``."""
    groups: dict[tuple, list[float]] = {}
    for score in scores:
        key = (score.model, score.axis, score.degrees) if per_axis else (score.model, score.degrees)
        groups.setdefault(key, []).append(score.mean_dice)
    return {key: float(np.nanmean(values)) for key, values in groups.items()}


def class_dice_by_angle(scores: Sequence[RotationScore]) -> dict[tuple, np.ndarray]:
    """Dice per class averaged over cases and axes, keyed by ``(model, degrees)``."""
    groups: dict[tuple, list[np.ndarray]] = {}
    for score in scores:
        groups.setdefault((score.model, score.degrees), []).append(score.dice)
    return {key: np.nanmean(np.stack(values), axis=0) for key, values in groups.items()}
