"""Scoring segmentations: Dice per class, and the rotation-robustness experiment with its report."""
from e3fast.evaluation.dice import dice_per_class, mean_foreground_dice
from e3fast.evaluation.robustness import RotationScore, HeldOutCase, rotation_experiment
from e3fast.evaluation.rotation import pad_to_cube, rotate_case, rotate_volume

__all__ = ["RotationScore", "HeldOutCase", "dice_per_class", "mean_foreground_dice", "pad_to_cube", "rotate_case",
           "rotate_volume", "rotation_experiment"]
